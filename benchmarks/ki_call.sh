#!/usr/bin/env bash
# One GPU call for kernel injection (RESULTS.md section 12): install the carried wheels, build DeepSpeed's
# transformer_inference op, then the driver's GPU tests, benchmarks/engine_compare.py and the HTTP GPU tests, each
# under its own time limit, every result written straight into OUT_DIR (a call cut short still returns them).
#   usage: bash benchmarks/ki_call.sh OUT_DIR [DRIVER_S=90] [BENCH_S=250] [HTTP_S=170] [FAMILIES...]
# A limit of 0 skips that part; KI_HTTP_K narrows the HTTP tests (a pytest -k expression).
set -uo pipefail
OUT=$1 DRIVER_S=${2:-90} BENCH_S=${3:-250} HTTP_S=${4:-170}; shift $(( $# < 4 ? $# : 4 ))
FAMILIES=${*:-gptj opt bloom gpt_neox gpt2 gpt_neo llama}
export TORCH_CUDA_ARCH_LIST=9.0 DS_SKIP_CUDA_CHECK=1 DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1  # FACTS.md: "9.0a"
[ -d /tmp/site/deepspeed ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/*.whl > $OUT/build.txt 2>&1
export PYTHONPATH=/tmp/site:$PWD
{ date -u; python3 -c "import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__, deepspeed.__version__)"
  nvidia-smi --query-gpu=name,memory.total --format=csv; } > $OUT/versions.txt 2>&1
( time python3 -c "from deepspeed.ops.op_builder import InferenceBuilder as B; B().load()" ) >> $OUT/build.txt 2>&1
tests() {  # tests SECONDS NAME -k-EXPRESSION
  [ "$1" -gt 0 ] && KI_RESULTS=$OUT/ki-logits.jsonl timeout "$1" python3 -m pytest -q -p no:cacheprovider -o addopts="" \
      --tb=short -rA tests/gpu/test_gpu_kernel_injection.py -k "$3" > $OUT/$2.txt 2>&1
}
tests $DRIVER_S tests-driver "not http"
[ "$BENCH_S" -gt 0 ] && timeout $BENCH_S python3 benchmarks/engine_compare.py --families $FAMILIES \
    --out $OUT/engine-compare.jsonl > $OUT/bench.txt 2>&1
tests $HTTP_S tests-http "${KI_HTTP_K:-http}"
date -u >> $OUT/versions.txt
