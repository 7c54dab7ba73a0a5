#!/bin/sh
# Run one build step of the Dockerfile / Singularity.def with the site's network settings:
#
#   sh scripts/container-build-env.sh COMMAND [ARG...]
#
# An extra CA bundle (a TLS-intercepting proxy's root, PEM): the file $BIDS_CL_BUILD_CA, by default
# /run/secrets/ca_bundle (docker/podman/buildah build --secret id=ca_bundle,src=FILE). When it is there,
# COMMAND runs with a bundle of the image's own CAs plus that file, trusted by pip (PIP_CERT), Python's
# ssl, requests and urllib (SSL_CERT_FILE, REQUESTS_CA_BUNDLE: TemplateFlow, the published model),
# curl (CURL_CA_BUNDLE) and apt's https sources (Acquire::https::CAInfo). Bundle and apt setting are
# removed afterwards: nothing of the site's proxy stays in the image (bids_cl needs no network to run).
# (BIDS_CL_APT_CONF_DIR: apt's configuration folder, for tests.)
#
# pip settings passed as build arguments (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST,
# PIP_FIND_LINKS, PIP_CONSTRAINT, PIP_DEFAULT_TIMEOUT) reach pip as its own environment variables;
# empty ones are unset here so that an unset build argument means pip's default, not "no index".
set -eu

for name in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_FIND_LINKS PIP_CONSTRAINT \
            PIP_DEFAULT_TIMEOUT; do
    eval "value=\${$name:-}"
    # shellcheck disable=SC2154  # value is set by the eval above
    [ -n "$value" ] || unset "$name"
done

extra="${BIDS_CL_BUILD_CA:-/run/secrets/ca_bundle}"
if [ ! -s "$extra" ]; then
    exec "$@"
fi

bundle="$(mktemp /tmp/bids_cl-build-ca.XXXXXX)"
apt_dir="${BIDS_CL_APT_CONF_DIR:-/etc/apt/apt.conf.d}"
apt_conf="$apt_dir/99bids-cl-build-ca"
trap 'rm -f "$bundle" "$apt_conf"' EXIT
system=/etc/ssl/certs/ca-certificates.crt
if [ -s "$system" ]; then
    cat "$system" > "$bundle"
fi
cat "$extra" >> "$bundle"
chmod 644 "$bundle"  # apt fetches as the unprivileged _apt user
if [ -d "$apt_dir" ]; then
    printf 'Acquire::https::CAInfo "%s";\n' "$bundle" > "$apt_conf"
fi
export PIP_CERT="$bundle" SSL_CERT_FILE="$bundle" REQUESTS_CA_BUNDLE="$bundle" CURL_CA_BUNDLE="$bundle"
echo "container-build-env: trusting the extra CA bundle $extra for this step" >&2
"$@"
