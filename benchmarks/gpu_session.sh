#!/usr/bin/env bash
# One call on the GPU machine (see RESULTS.md): install the carried wheels, run the GPU tests, then the
# tensor-parallel benchmark (degree 1 vs 2) on a Llama-2-7B-shaped random-weight model.
#   usage: bash benchmarks/gpu_session.sh WHEELS_DIR TOKENIZER_DIR OUT_DIR [tests|bench|all]
set -uo pipefail
WHEELS=$1 TOKENIZER=$2 OUT=$3 WHAT=${4:-all}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0 DS_SKIP_CUDA_CHECK=1  # DeepSpeed 0.19.8 cannot parse the machine's "9.0a"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
python3 -c "import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__, deepspeed.__version__)" | tee "$OUT/versions.txt"
if [ "$WHAT" != bench ]; then
  python3 -m pytest -q -rs tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.txt"
fi
if [ "$WHAT" != tests ]; then
  python3 benchmarks/tp_benchmark.py --model-dir /tmp/llama7b-random --make-random-llama7b \
      --tokenizer-dir "$TOKENIZER" --degrees 1 2 --concurrency 1 32 --requests-per-client 2 \
      --prompt-tokens 128 --max-tokens 128 --dtype fp16 --log-file "$OUT/tp-results.jsonl" 2>&1 | tee "$OUT/tp-bench.txt"
  cp /tmp/tp-benchmark-server-tp*.log "$OUT/" 2>/dev/null
fi
