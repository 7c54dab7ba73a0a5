#!/usr/bin/env bash
# Install bids_cl and everything it needs from this repository's own files.
# One source of truth: .ci/run, the Dockerfile and Singularity.def all call this script.
#
#   bash scripts/install.sh [--venv DIR] [--extras test] [--system-test-deps] [--no-system-deps]
#
#   --venv DIR           create (or reuse) a virtual environment in DIR and install into it
#                        (default: the Python found as $PYTHON or python3, no venv)
#   --extras LIST        pip extras, e.g. "test" or "test,synthstrip"
#   --system-test-deps   also install the Debian packages the test-suite uses
#                        (chromium for report rendering; slurm-wlm and munge for the Slurm test)
#   --no-system-deps     skip apt-get entirely (no root, or packages already present)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv=""
extras=""
system_deps=1
system_test_deps=0
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) venv="$2"; shift 2 ;;
        --extras) extras="$2"; shift 2 ;;
        --system-test-deps) system_test_deps=1; shift ;;
        --no-system-deps) system_deps=0; shift ;;
        *) echo "install.sh: unknown option $1" >&2; exit 64 ;;
    esac
done

# Debian packages: mricron-data carries the Colin27 head (with skull) the phantom generator uses.
apt_packages="mricron-data"
if [ "$system_test_deps" = 1 ]; then
    apt_packages="$apt_packages chromium slurm-wlm munge"
fi
if [ "$system_deps" = 1 ] && command -v apt-get >/dev/null 2>&1; then
    missing=""
    for pkg in $apt_packages; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
    done
    if [ -n "$missing" ]; then
        SUDO=""
        [ "$(id -u)" = 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
    fi
fi

python="${PYTHON:-python3}"
if [ -n "$venv" ]; then
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    python="$venv/bin/python"
fi
"$python" -m pip install -q --upgrade pip
# torch is pinned together with torchvision: nnunetv2 -> timm -> torchvision, and an unpinned
# resolver fetches several GB (see docs/install.md). These are CUDA builds that also run on CPU.
"$python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
spec="$here"
[ -n "$extras" ] && spec="$here[$extras]"
"$python" -m pip install -q -e "$spec"
"$python" -m bids_cl --version
