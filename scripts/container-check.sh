#!/usr/bin/env bash
# Build the bids_cl image from this repository and run it, on a machine without an image registry:
#
#   bash scripts/container-check.sh [--work DIR] [--base IMAGE] [--synthstrip-image IMAGE]
#                                   [--ca FILE|none] [--no-cache] [--skip-build] [--keep]
#
# 1. A Debian bookworm base made with debootstrap (python3.11, venv, ca-certificates; Debian listed
#    over https) that stands in for python:3.11-slim-bookworm, unless --base names a real one.
# 2. A stand-in freesurfer/synthstrip image: FROM scratch with /freesurfer/models/synthstrip.1.pt, a
#    loadable StripModel checkpoint (bids_cl.engine.testing.write_synthstrip_checkpoint, random weights
#    but for an intensity-threshold path, so that the mask is a plausible one), unless
#    --synthstrip-image names a real image.
# 3. The extra CA bundle (--ca, default $SSL_CERT_FILE or the host's /etc/ssl/certs/ca-certificates.crt,
#    e.g. a TLS-intercepting proxy's root): a small build shows that https fails without the
#    ca_bundle secret and works with it.
# 4. The Dockerfile built with buildah (build time measured; --no-cache: no layer reused), its size
#    and the largest folders.
# 5. bids_cl-demo inside it as an arbitrary non-root UID with --network none; the derivatives must
#    say SkullStripStrategy synthstrip (the baked weights).
# 6. A participant run on the demo's dataset bind-mounted read-only (again no network, another UID),
#    and the dataset's checksums unchanged.
#
# Results go to WORK/results.txt; every step's log to WORK/logs/. Needs root (buildah/podman as root,
# debootstrap) and network for the base and the Python packages; installs buildah, podman and
# debootstrap with apt-get when they are missing. CI does not run it (no container engine there).
#
# Engine options for awkward hosts (the defaults suit the VMs this was written on: cgroups v1 with a
# v2 hierarchy holding a controller, which crun refuses, and no CAP_SYS_RESOURCE, so podman's default
# rlimits cannot be set):
#   BUILDAH_ISOLATION  buildah's RUN isolation (default chroot: no OCI runtime, host network only)
#   PODMAN             the podman command (default: podman --runtime runc)
#   RUN_OPTS           extra podman run options (default: the current hard rlimits)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work=/tmp/bids_cl-container-check
base=""
synthstrip_image=""
ca="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
skip_build=0
keep=0
cache=()
while [ $# -gt 0 ]; do
    case "$1" in
        --work) work="$2"; shift 2 ;;
        --base) base="$2"; shift 2 ;;
        --synthstrip-image) synthstrip_image="$2"; shift 2 ;;
        --ca) ca="$2"; shift 2 ;;
        --no-cache) cache=(--no-cache); shift ;;
        --skip-build) skip_build=1; shift ;;
        --keep) keep=1; shift ;;
        *) echo "container-check.sh: unknown option $1" >&2; exit 64 ;;
    esac
done

version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$here/bids_cl/_version.py")"
image="localhost/bids_cl:$version"
python="${PYTHON:-$here/.venv/bin/python}"
logs="$work/logs"
results="$work/results.txt"
mkdir -p "$logs"
: > "$results"

say() { echo "$*" | tee -a "$results"; }
step() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$results"; }
fail() { say "FAILED: $*"; exit 1; }

# Run with the log in $logs/NAME.log; on failure show its tail.
logged() {
    local name="$1"; shift
    if ! "$@" > "$logs/$name.log" 2>&1; then
        tail -40 "$logs/$name.log" >&2
        fail "$name (log: $logs/$name.log)"
    fi
}

[ "$(id -u)" = 0 ] || fail "run as root (buildah, podman and debootstrap need it)"
missing=""
for tool in buildah podman debootstrap runc; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
    step "installing$missing"
    logged apt apt-get install -y -q --no-install-recommends $missing fuse-overlayfs uidmap
fi
say "buildah $(buildah --version | awk '{print $3}'), podman $(podman --version | awk '{print $3}')"
export BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"
nproc_max=$(ulimit -Hu)  # podman lowers its own hard limit to 32768, so no more than that
if [ "$nproc_max" = unlimited ] || [ "$nproc_max" -gt 32768 ]; then nproc_max=32768; fi
read -r -a run_opts <<< "${RUN_OPTS:---ulimit nofile=$(ulimit -Hn):$(ulimit -Hn) --ulimit nproc=$nproc_max:$nproc_max}"
read -r -a podman <<< "${PODMAN:-podman --runtime runc}"
say "buildah isolation: $BUILDAH_ISOLATION; podman: ${podman[*]} run ${run_opts[*]}"

# ---- 1. the base -------------------------------------------------------------------------------
if [ -z "$base" ]; then
    base=localhost/bids_cl-base:bookworm
    if ! podman image exists "$base"; then
        step "debootstrap: a Debian bookworm base for $base"
        start=$(date +%s)
        rootfs="$work/rootfs"
        rm -rf "$rootfs"
        logged debootstrap debootstrap --variant=minbase \
            --include=python3,python3-venv,ca-certificates bookworm "$rootfs" http://deb.debian.org/debian
        # Debian over https, so that apt in the build goes through the TLS proxy too (step 3's CA).
        rm -f "$rootfs/etc/apt/sources.list"
        cat > "$rootfs/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: https://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: https://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        chroot "$rootfs" apt-get clean
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* \
            "$rootfs"/usr/share/man/*
        tar -C "$rootfs" -c . | podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
            - "$base" > "$logs/import-base.log"
        rm -rf "$rootfs"
        say "  debootstrap and import: $(( $(date +%s) - start )) s"
    fi
fi
say "base image: $base"

# ---- 2. SynthStrip ------------------------------------------------------------------------------
if [ -z "$synthstrip_image" ]; then
    synthstrip_image=localhost/synthstrip-standin:latest
    step "stand-in SynthStrip image $synthstrip_image (random weights, intensity threshold 0.5)"
    ctx="$work/synthstrip-context"
    rm -rf "$ctx"
    mkdir -p "$ctx"
    logged synthstrip-weights "$python" -c 'import sys
from bids_cl.engine.testing import write_synthstrip_checkpoint
print(write_synthstrip_checkpoint(sys.argv[1], seed=0, intensity_threshold=0.5))' "$ctx/synthstrip.1.pt"
    printf 'FROM scratch\nCOPY synthstrip.1.pt /freesurfer/models/synthstrip.1.pt\n' > "$ctx/Containerfile"
    logged synthstrip-image buildah bud -f "$ctx/Containerfile" -t "$synthstrip_image" "$ctx"
fi
say "SynthStrip image: $synthstrip_image"

# ---- 3. the CA bundle ---------------------------------------------------------------------------
secret=()
if [ "$ca" != none ]; then
    [ -s "$ca" ] || fail "--ca $ca: no such file"
    secret=(--secret "id=ca_bundle,src=$ca")
    step "CA bundle $ca: https from a build step without and with the ca_bundle secret"
    probe="$work/ca-probe"
    rm -rf "$probe"
    mkdir -p "$probe"
    cp "$here/scripts/container-build-env.sh" "$probe/"
    cat > "$probe/Containerfile" <<EOF
FROM $base
COPY container-build-env.sh /tmp/
RUN --mount=type=secret,id=ca_bundle sh /tmp/container-build-env.sh python3 -c \\
    "import urllib.request; urllib.request.urlopen('https://pypi.org/simple/pip/', timeout=60)" \\
    && sh /tmp/container-build-env.sh apt-get update -qq
EOF
    if buildah bud --no-cache --network host -f "$probe/Containerfile" "$probe" \
            > "$logs/ca-probe-without.log" 2>&1; then
        say "  without the secret: https works (no TLS interception here; the secret is not needed)"
    elif grep -q CERTIFICATE_VERIFY_FAILED "$logs/ca-probe-without.log"; then
        say "  without the secret: $(grep -o -m1 'CERTIFICATE_VERIFY_FAILED[^(]*' "$logs/ca-probe-without.log")"
    else
        tail -20 "$logs/ca-probe-without.log" >&2
        fail "the CA probe failed for another reason than the certificate ($logs/ca-probe-without.log)"
    fi
    logged ca-probe-with buildah bud --no-cache --network host "${secret[@]}" \
        -f "$probe/Containerfile" "$probe"
    say "  with the secret: pip's index (Python ssl) and apt over https work"
fi

# ---- 4. the build -------------------------------------------------------------------------------
if [ "$skip_build" = 0 ]; then
    step "building $image (log: $logs/build.log)"
    start=$(date +%s)
    logged build buildah bud --layers "${cache[@]}" --network host "${secret[@]}" \
        --build-arg "PYTHON_IMAGE=$base" --build-arg "SYNTHSTRIP_IMAGE=$synthstrip_image" \
        --build-arg "VCS_REF=$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
        --build-arg "BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        -t "$image" -f "$here/Dockerfile" "$here"
    say "  build time: $(( $(date +%s) - start )) s"
    # buildah keeps the working container of a stage that only serves COPY --from: remove it.
    buildah containers --format '{{.ContainerID}} {{.ImageName}}' \
        | awk -v img="$synthstrip_image" '$2 == img {print $1}' | xargs -r buildah rm > /dev/null
fi
size=$(podman image inspect --format '{{.Size}}' "$image")
say "image size: $(( size / 1000000 )) MB ($size bytes, uncompressed, as podman image inspect reports)"
say "largest folders in the image (du -sm, MB):"
"${podman[@]}" run --rm "${run_opts[@]}" --network none --entrypoint sh "$image" -c \
    'du -sm /opt/venv/lib/python3*/site-packages/* /opt/bids_cl-src /opt/templateflow /opt/freesurfer \
         /usr 2>/dev/null | sort -rn | head -12' | sed 's/^/  /' | tee -a "$results"
podman image inspect --format '{{range $k, $v := .Labels}}{{$k}}={{$v}}{{"\n"}}{{end}}' "$image" \
    > "$logs/labels.txt"
grep -q 'org.bids_cl.synthstrip.license=FreeSurfer' "$logs/labels.txt" \
    || fail "the image has no FreeSurfer licence label (see $logs/labels.txt)"
say "labels: $(grep -E 'licenses=|synthstrip.image=' "$logs/labels.txt" | tr '\n' ' ')"

# Any UID: the image must not depend on being 1000 or root.
uid=54321
run_out="$work/run"
rm -rf "$run_out"
mkdir -p "$run_out/demo" "$run_out/participant" "$run_out/work"
chown -R "$uid:$uid" "$run_out"

# ---- 5. the demo --------------------------------------------------------------------------------
step "bids_cl-demo as UID $uid, --network none (log: $logs/demo.log)"
start=$(date +%s)
logged demo "${podman[@]}" run --rm "${run_opts[@]}" --network none -u "$uid:$uid" -v "$run_out/demo:/out" \
    --entrypoint bids_cl-demo "$image" /out
say "  demo time: $(( $(date +%s) - start )) s"
grep -E '^\s+sub-.*found' "$logs/demo.log" | sed 's/^/  /' | tee -a "$results"
strategies=$(grep -rhoE '"SkullStripStrategy": "[a-z]+"' "$run_out/demo/derivatives" | sort | uniq -c)
say "  skull stripping recorded in the derivatives: $(echo "$strategies" | tr -s ' \n' ' ')"
echo "$strategies" | grep -q '"synthstrip"' || fail "the demo did not use SynthStrip"
if echo "$strategies" | grep -v '"synthstrip"' | grep -q Strategy; then
    fail "the demo used another skull stripping besides SynthStrip"
fi

# ---- 6. a participant on a read-only dataset ----------------------------------------------------
step "participant 01 on the demo dataset bind-mounted read-only, UID $((uid + 1)) (log: $logs/participant.log)"
chown -R "$((uid + 1)):$((uid + 1))" "$run_out/participant" "$run_out/work"
before=$(cd "$run_out/demo/bids" && find . -type f -exec sha256sum {} + | sort | sha256sum)
start=$(date +%s)
logged participant "${podman[@]}" run --rm "${run_opts[@]}" --network none -u "$((uid + 1)):$((uid + 1))" \
    -v "$run_out/demo/bids:/data:ro" -v "$run_out/participant:/out" -v "$run_out/work:/work" \
    "$image" /data /out participant --participant-label 01 -w /work --model demo --sloppy \
    --nprocs 2 --omp-nthreads 1
say "  participant time: $(( $(date +%s) - start )) s"
after=$(cd "$run_out/demo/bids" && find . -type f -exec sha256sum {} + | sort | sha256sum)
[ "$before" = "$after" ] || fail "the input dataset changed"
n=$(find "$run_out/participant" -name '*_label-CL_desc-summary_stats.json' | wc -l)
[ "$n" -gt 0 ] || fail "no summary statistics written"
say "  $n summary file(s) written; the read-only dataset is unchanged"
owner=$(stat -c %u "$(find "$run_out/participant" -name '*_label-CL_desc-summary_stats.json' | head -1)")
say "  outputs owned by UID $owner"

if [ "$keep" = 0 ]; then
    rm -rf "$run_out/work"
fi
say "OK: $image built and run"
