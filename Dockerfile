# syntax=docker/dockerfile:1
# bids_cl: cortical lesion segmentation in MS (nnU-Net v2) as a BIDS-App container.
#
# Build (from the repository root; BuildKit, the default since Docker 23, or podman/buildah):
#   docker build -t bids_cl:0.1.0 .
#   docker build -t bids_cl:0.1.0 --build-arg MODEL_ZIP=models/published.zip .   # model from a file
#   docker build -t bids_cl:0.1.0 --build-arg INSTALL_PUBLISHED_MODEL=1 .        # model from the net
#   docker build ... --build-arg EXTRA_TEMPLATE_SPACES="MNI152NLin2009cAsym"      # more templates
# Behind a TLS-intercepting proxy (the proxy's CA in PEM), or with a site's PyPI mirror:
#   docker build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt ...
#   docker build --build-arg PIP_INDEX_URL=https://pypi.example.org/simple ...
# SynthStrip's weights (FreeSurfer licence) come from the freesurfer/synthstrip image, pinned below;
# a site mirror or a local image with /freesurfer/models/synthstrip.1.pt: --build-arg SYNTHSTRIP_IMAGE=...
# scripts/container-check.sh builds and runs all this on a machine without a registry (docs/hpc.md).
# Run (GPU needs the NVIDIA container toolkit; without --gpus it runs on the CPU):
#   docker run --rm --gpus all --network none -u "$(id -u):$(id -g)" \
#       -v /data/bids:/data:ro -v /data/derivatives/bids_cl:/out -v /scratch/work:/work \
#       bids_cl:0.1.0 /data /out participant --participant-label 01 -w /work
# Apptainer: apptainer build bids_cl.sif docker-daemon://bids_cl:0.1.0 (see docs/hpc.md).
#
# The Python environment comes from scripts/install.sh, the same script CI and users run: one source
# of truth for the pinned torch/torchvision (CUDA wheels that also run on CPU-only nodes).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# SynthStrip's weights, copied out of FreeSurfer's own image as MRIQC's Dockerfile does (and with the
# digest it pins: nipreps/mriqc, Dockerfile at commit 81b9e22). Not checked against Docker Hub here
# (no registry was reachable); the image must hold /freesurfer/models/synthstrip.1.pt.
ARG SYNTHSTRIP_IMAGE=docker.io/freesurfer/synthstrip@sha256:f19578e5f033f2c707fa66efc8b3e11440569facb46e904b45fd52f1a12beb8b

FROM ${SYNTHSTRIP_IMAGE} AS synthstrip

FROM ${PYTHON_IMAGE}

# The version for the labels; tests/test_containers.py keeps this default equal to
# bids_cl/_version.py, and the build fails below if a --build-arg VERSION disagrees with the code.
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
# A published-model archive inside the build context (path relative to it), or empty.
ARG MODEL_ZIP=
# 1: download and install the published model at build time (needs network during the build).
ARG INSTALL_PUBLISHED_MODEL=0
# TemplateFlow spaces to fetch from the network besides the default, seeded offline from nilearn.
ARG EXTRA_TEMPLATE_SPACES=
ARG SYNTHSTRIP_IMAGE
# pip's own settings for a site mirror / local wheel store (unset: PyPI); used by
# scripts/container-build-env.sh, which also trusts the ca_bundle secret (see above).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_FIND_LINKS

LABEL org.opencontainers.image.title="bids_cl" \
      org.opencontainers.image.description="BIDS-App: cortical lesion segmentation and measurement in multiple sclerosis on T1-weighted MRI (nnU-Net v2)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0 AND LicenseRef-FreeSurfer" \
      org.bids_cl.synthstrip.image="${SYNTHSTRIP_IMAGE}" \
      org.bids_cl.synthstrip.weights="/opt/freesurfer/models/synthstrip.1.pt" \
      org.bids_cl.synthstrip.license="FreeSurfer Software License Agreement (the SynthStrip weights; https://surfer.nmr.mgh.harvard.edu/fswiki/FreeSurferSoftwareLicense); bids_cl itself: Apache-2.0" \
      org.label-schema.schema-version="1.0" \
      org.label-schema.name="bids_cl" \
      org.label-schema.version="${VERSION}"

# Build-time settings: no pip cache in the layers, no interactive apt.
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Everything the package needs, and nothing else of the repository (no tests, docs or model zips
# in the layers). The source stays in the image: install.sh installs it editable.
COPY pyproject.toml setup.cfg README.md /opt/bids_cl-src/
COPY scripts/install.sh scripts/container-build-env.sh /opt/bids_cl-src/scripts/
COPY bids_cl /opt/bids_cl-src/bids_cl

# The ca_bundle secret is read by scripts/container-build-env.sh and never stored in a layer.
# Trimmed in the same layer (docs/hpc.md, "Image size"): static libraries (*.a, only for linking
# at build time; ~170 MB, most of it CUDA's and Triton's) and the packages' own test suites
# (~250 MB; nilearn's kept: one of its modules imports them).
RUN --mount=type=secret,id=ca_bundle \
    sh /opt/bids_cl-src/scripts/container-build-env.sh \
        bash /opt/bids_cl-src/scripts/install.sh --venv /opt/venv \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log /root/.cache \
    && find /opt/venv -name '*.a' -type f -delete \
    && find /opt/venv/lib/python3*/site-packages -depth -type d -name tests \
        -not -path '*/site-packages/nilearn/*' -exec rm -rf {} + \
    && /opt/venv/bin/python -m compileall -q /opt/bids_cl-src/bids_cl

# SynthStrip's weights where FreeSurfer keeps them; bids_cl looks for
# $FREESURFER_HOME/models/synthstrip.1.pt, so --skull-strip auto uses SynthStrip, as the paper did.
COPY --from=synthstrip /freesurfer/models/synthstrip.1.pt /opt/freesurfer/models/synthstrip.1.pt

ENV PATH="/opt/venv/bin:${PATH}" \
    VIRTUAL_ENV=/opt/venv \
    BIDS_CL_HOME=/opt/bids_cl \
    FREESURFER_HOME=/opt/freesurfer \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0

# The code must be the version the labels say.
RUN test "$(python -c 'import bids_cl; print(bids_cl.__version__)')" = "${VERSION}" \
    || { echo "build arg VERSION=${VERSION} differs from bids_cl/_version.py" >&2; exit 1; }

# Templates baked in (offline compute nodes; shared/reference/bids-apps.md B.3): the default space is
# seeded from nilearn without network; EXTRA_TEMPLATE_SPACES are downloaded now, never at run time.
RUN --mount=type=secret,id=ca_bundle \
    mkdir -p "${TEMPLATEFLOW_HOME}" "${BIDS_CL_HOME}" \
    && bids_cl-fetch-templates --tf-dir "${TEMPLATEFLOW_HOME}" \
    && if [ -n "${EXTRA_TEMPLATE_SPACES}" ]; then \
           sh /opt/bids_cl-src/scripts/container-build-env.sh \
               bids_cl-fetch-templates --tf-dir "${TEMPLATEFLOW_HOME}" ${EXTRA_TEMPLATE_SPACES}; \
       fi

# The published model, when the build is given it; the demo model ships as package data anyway.
# A bind mount of the build context: the archive is read, never copied into a layer.
RUN --mount=type=bind,source=.,target=/tmp/build-context --mount=type=secret,id=ca_bundle \
    if [ -n "${MODEL_ZIP}" ]; then \
        bids_cl-models install published --from-file "/tmp/build-context/${MODEL_ZIP}"; \
    elif [ "${INSTALL_PUBLISHED_MODEL}" = 1 ]; then \
        sh /opt/bids_cl-src/scripts/container-build-env.sh bids_cl-models install published; \
    fi

# Run-time settings. Nipype schedules threads itself (bids_cl sets OMP_NUM_THREADS per run from
# --omp-nthreads), so libraries start single-threaded, as in NiPreps images. NIPYPE_NO_ET: no
# telemetry lookup on offline nodes. NVIDIA_*: the container toolkit injects the host driver for
# --gpus (the CUDA runtime comes with the torch wheels). BIDS_CL_CONTAINER tells the app (and its
# provenance) that it runs in a container.
ENV HOME=/home/bids_cl \
    BIDS_CL_CONTAINER=docker \
    NIPYPE_NO_ET=1 \
    NO_ET=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# A smoke test; HOME elsewhere so that nothing lands in the user's HOME as root before useradd.
RUN HOME=/tmp bids_cl --version

# Non-root user whose HOME, like the templates and models, any UID can read (Apptainer runs as the
# calling user; docker run -u UID too): chmod go=u gives group and others the owner's rights.
RUN groupadd --gid 1000 bids_cl \
    && useradd --create-home --home-dir /home/bids_cl --shell /bin/bash --uid 1000 --gid 1000 bids_cl \
    && chmod -R go=u /home/bids_cl "${TEMPLATEFLOW_HOME}" "${BIDS_CL_HOME}" \
    && chmod -R a+rX "${FREESURFER_HOME}"

# Numeric, so that runtimes can tell it is not root without reading the image's /etc/passwd.
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["bids_cl"]
CMD ["--help"]
