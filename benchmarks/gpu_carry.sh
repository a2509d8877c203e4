#!/usr/bin/env bash
# What a call on the GPU machine carries (it has no network): run here, then pass the two paths to the device
# tool's `carry` and to benchmarks/gpu_session.sh.
#   usage: bash benchmarks/gpu_carry.sh [WHEELS_DIR=.whl] [TOKENIZER_DIR=.gpu/tokenizer]
# WHEELS_DIR: DeepSpeed 0.19.8 as a pure-Python wheel (its ops JIT-build on the GPU machine), deepspeed-kernels
# (FastGen's blocked flash attention, a prebuilt wheel), and the server's packages the GPU image lacks (pydantic,
# fastapi, uvicorn and theirs, as this venv has them, built for the image's CPython 3.12; DeepSpeed's hjson,
# py-cpuinfo, msgpack and einops; opentelemetry-api,
# which fastapi 0.165 imports: shared/FACTS.md). The image brings torch, transformers, Triton, httpx, pytest;
# gpu_session.sh lists what is still missing there (boto3 and gguf are, and only S3 models and the embedded
# model need them).
# TOKENIZER_DIR: the embedded model's tokenizer (vocabulary 49,152), which the 7B-shaped random models use; it
# comes from the converted embedded model (`python -m entrypoint serve` or the test suite converts it once).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.whl} TOKENIZER=${2:-.gpu/tokenizer}
mkdir -p "$WHEELS" "$TOKENIZER"
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps deepspeed==0.19.8 -w "$WHEELS"
python3 -m pip download -q --no-deps deepspeed-kernels opentelemetry-api -d "$WHEELS"
pinned() { python3 -c "from importlib.metadata import version; print('$1==' + version('$1'))"; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --implementation cp -d "$WHEELS" "$(pinned pydantic)" "$(pinned pydantic_core)" "$(pinned fastapi)" \
    "$(pinned starlette)" "$(pinned uvicorn)" "$(pinned h11)" "$(pinned click)" annotated-types typing-inspection \
    annotated-doc hjson py-cpuinfo msgpack einops  # the last four: DeepSpeed's own dependencies
python3 - "$TOKENIZER" <<'EOF'
import shutil, sys
from pathlib import Path

from entrypoint.embedded_model import ensure_embedded_model
from quantization.calibration_cache import default_cache_dir

model = ensure_embedded_model(default_cache_dir())
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
    if (model / name).exists():
        shutil.copy(model / name, Path(sys.argv[1]) / name)
EOF
du -sh "$WHEELS" "$TOKENIZER"
ls -l "$WHEELS"
