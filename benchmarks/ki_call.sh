#!/usr/bin/env bash
# One GPU call for kernel injection (see RESULTS.md): install the carried wheels, build DeepSpeed's
# transformer_inference op, run tests/gpu/test_gpu_kernel_injection.py and benchmarks/engine_compare.py; everything
# lands in $OUT/r.tgz.   usage: [KI_K="pytest -k expression"] bash benchmarks/ki_call.sh OUT_DIR [TEST_SECONDS] [BENCH_SECONDS]
# [FAMILIES...]  (BENCH_SECONDS 0: no benchmark)
set -uo pipefail
OUT=$1 TESTS_S=${2:-240} BENCH_S=${3:-300}; shift $(( $# < 3 ? $# : 3 ))
FAMILIES=${*:-gptj opt bloom gpt_neox gpt2 gpt_neo llama}
O=/tmp/o; mkdir -p $O
export TORCH_CUDA_ARCH_LIST=9.0 DS_SKIP_CUDA_CHECK=1 DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1  # FACTS.md: "9.0a"
[ -d /tmp/site/deepspeed ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/*.whl > $O/pip.txt 2>&1
export PYTHONPATH=/tmp/site:$PWD
{ python3 -c "import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__, deepspeed.__version__)"
  nvidia-smi --query-gpu=name,memory.total --format=csv; } > $O/versions.txt 2>&1
( time python3 -c "from deepspeed.ops.op_builder import InferenceBuilder as B; B().load()" ) > $O/build.txt 2>&1
KI_RESULTS=$O/ki-logits.jsonl timeout $TESTS_S python3 -m pytest -q -p no:cacheprovider -o addopts="" --tb=short -rA \
    tests/gpu/test_gpu_kernel_injection.py ${KI_K:+-k "$KI_K"} > $O/tests.txt 2>&1
[ "$BENCH_S" -gt 0 ] && timeout $BENCH_S python3 benchmarks/engine_compare.py --families $FAMILIES --out $O/engine-compare.jsonl \
    > $O/bench.txt 2>&1
tar czf $OUT/r.tgz -C $O .
