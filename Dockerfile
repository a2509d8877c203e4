# LMI-style DeepSpeed serving container. SageMaker starts it as `docker run <image> serve` and sends
# traffic to port 8080 (or $SAGEMAKER_BIND_TO_PORT); the model is mounted at /opt/ml/model.
#
# CPU image (the default). For GPUs, build FROM an image with CUDA PyTorch, e.g.
#   docker build --build-arg BASE=nvcr.io/nvidia/pytorch:25.10-py3 .
# pip keeps the base image's torch when it satisfies pyproject's range.
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LMI_CACHE_DIR=/opt/lmi/cache \
    HF_HUB_OFFLINE=1

RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/lmi
COPY pyproject.toml README.md serving.properties.example ./
COPY entrypoint ./entrypoint
COPY handlers ./handlers
COPY quantization ./quantization
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu .

# Convert the embedded default model once at build time, so a container without a model starts in seconds.
RUN python -c "from pathlib import Path; from entrypoint.embedded_model import ensure_embedded_model; \
ensure_embedded_model(Path('/opt/lmi/cache'))"

EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s CMD python -c "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ping' % os.environ.get('SAGEMAKER_BIND_TO_PORT', '8080'))" || exit 1
ENTRYPOINT ["python", "-m", "entrypoint"]
CMD ["serve"]
