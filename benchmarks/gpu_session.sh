#!/usr/bin/env bash
# One call on the GPU machine (see RESULTS.md): install the carried wheels, then run the parts asked for.
#   usage: bash benchmarks/gpu_session.sh WHEELS_DIR TOKENIZER_DIR OUT_DIR PART...
# parts: fg-tests (FastGen's GPU tests and gate table), fg-serve (a 7B FastGen server: long prompts and bursts),
# fg-speed (HTTP vs bare put() loop at 1/32/64 clients); tests (tests/gpu), core (engine core on a Llama-2-7B-shaped random model: 64 clients x 3,500-token
# prompts x 500 new tokens, sampled), core128 (128/128 greedy and sampled at 1 and 32 clients), tp (degree 1 vs 2),
# fastgen (DeepSpeed's v2 ops built in parallel first, then the FastGen GPU tests, the HTTP sweep over
# concurrency 1-128 at 128/128 and 1024/128 with plots, and the bare put() loop and HF generate baselines).
# WHEELS_DIR must hold deepspeed-kernels' wheel for the fastgen part.
set -uo pipefail
WHEELS=$1 TOKENIZER=$2 OUT=$3; shift 3
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0 DS_SKIP_CUDA_CHECK=1  # DeepSpeed 0.19.8 cannot parse the machine's "9.0a"
export DS_ACCELERATOR=cuda  # the carried wheel was built on a CPU machine
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
python3 -c "import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__, deepspeed.__version__)" | tee "$OUT/versions.txt"
MODEL=/tmp/llama7b-random
make_model() {
  python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from tp_benchmark import make_random_llama7b
make_random_llama7b(Path('$MODEL'), Path('$TOKENIZER'), context=8192)" 2>&1 | tee -a "$OUT/core.txt"
}
build_v2_ops() {  # DeepSpeed's v2 ops in parallel (~2 min on 16 cores); JIT-cached for later calls on this machine
  for op in InferenceCoreBuilder RaggedOpsBuilder RaggedUtilsBuilder InferenceCutlassBuilder; do
    python3 -c "from deepspeed.ops.op_builder import $op as B; B().load()" > "$OUT/build-$op.txt" 2>&1 &
  done; wait
}
start_server() {  # start_server PORT LOG KEY=VALUE...: python -m entrypoint serve on $MODEL, waits for /ping
  local port=$1 log=$2; shift 2
  env OPTION_MODEL_ID=$MODEL SAGEMAKER_BIND_TO_PORT=$port "$@" python3 -m entrypoint serve > "$log" 2>&1 &
  SERVER=$!
  for _ in $(seq 900); do curl -sf http://127.0.0.1:$port/ping > /dev/null && return 0
    kill -0 $SERVER 2>/dev/null || { echo "server exited"; tail -50 "$log"; return 1; }; sleep 1; done
  return 1
}
for part in "$@"; do
  case $part in
    fg-tests)
      # FastGen's correctness (issue 19): AutoTP/engine-core tests while the v2 ops build, then the FastGen
      # tests beside the per-architecture gate table (before/after the fixes) and the atom-boundary rows.
      build_v2_ops &
      BUILD=$!
      python3 -m pytest -q -rs tests/gpu/test_gpu_autotp.py tests/gpu/test_gpu_engine_core.py \
          tests/unit/test_token_sampler.py -p no:cacheprovider > "$OUT/gpu-tests-core.txt" 2>&1
      wait $BUILD
      ;&
    fg-fastgen)
      [ -f "$OUT/build-RaggedOpsBuilder.txt" ] || build_v2_ops
      python3 benchmarks/fastgen_gate_table.py --out "$OUT/gate-table.jsonl" > "$OUT/gate-table.txt" 2>&1 &
      TABLE=$!
      python3 -m pytest -q -rs tests/gpu/test_gpu_fastgen.py -p no:cacheprovider > "$OUT/gpu-tests-fastgen.txt" 2>&1
      wait $TABLE
      tail -5 "$OUT"/gpu-tests-*.txt; cat "$OUT/gate-table.jsonl" | cut -c1-400 ;;
    fg-serve)
      # A 7B-shaped Llama (context 8192) served by FastGen with its gate; long prompts and bursts (item 6).
      ls ~/.cache/torch_extensions/*/ 2>/dev/null | head; build_v2_ops
      make_model
      start_server 8094 "$OUT/fastgen-7b-server.log" OPTION_DTYPE=fp16 OPTION_MAX_ROLLING_BATCH_SIZE=64 \
          OPTION_MAX_TOKENS=8192 || exit 1
      python3 benchmarks/fastgen_long_prompts.py --url http://127.0.0.1:8094 --model $MODEL --vocab 49152 \
          --out "$OUT/long-prompts.json" 2>&1 | tee "$OUT/long-prompts.txt"
      kill -TERM $SERVER; wait $SERVER ;;
    fg-speed)
      # HTTP streaming vs DeepSpeed's bare put() loop, 128/128 greedy, c = 1/32/64, same call (item 7).
      build_v2_ops; make_model
      start_server 8095 "$OUT/fastgen-speed-server.log" OPTION_DTYPE=fp16 OPTION_MAX_ROLLING_BATCH_SIZE=64 || exit 1
      python3 benchmarks/sweep.py run --url http://127.0.0.1:8095 --model "$MODEL" --tokenizer "$TOKENIZER" \
          --concurrency 1 32 64 --shapes 128/128 --label fastgen-http --out "$OUT/speed.jsonl" 2>&1 | tee "$OUT/speed.txt"
      kill -TERM $SERVER; wait $SERVER
      python3 benchmarks/fastgen_loop.py --model-dir $MODEL --batches 1 32 64 --engines fastgen-bare-loop \
          --out "$OUT/speed.jsonl" 2>&1 | tee -a "$OUT/speed.txt" ;;
    tests) python3 -m pytest -q -rs tests/gpu tests/unit/test_token_sampler.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.txt" ;;
    core128)
      make_model
      python3 benchmarks/serving_benchmark.py --start-server --model-dir $MODEL --skip-baseline --port 8091 \
          --prompt-tokens 128 --max-tokens 128 --concurrency 32 --repetitions 2 --sampling greedy sampled \
          --server-env OPTION_DTYPE=fp16 OPTION_FASTGEN=false --log-file "$OUT/core.jsonl" 2>&1 | tee -a "$OUT/core.txt"
      cp /tmp/serving-benchmark-server.log "$OUT/core-server-128.log" ;;
    core)
      make_model
      python3 benchmarks/serving_benchmark.py --start-server --model-dir $MODEL --skip-baseline --port 8092 \
          --prompt-tokens 3500 --max-tokens 500 --concurrency 64 --repetitions 1 --sequential-requests 1 \
          --sampling sampled --server-env OPTION_DTYPE=fp16 OPTION_FASTGEN=false OPTION_MAX_ROLLING_BATCH_SIZE=64 \
          --log-file "$OUT/core.jsonl" 2>&1 | tee -a "$OUT/core.txt"
      cp /tmp/serving-benchmark-server.log "$OUT/core-server-overload.log" ;;
    fastgen)
      # Build the v2 ops in parallel (~2 min) so that neither the tests nor the server JIT-build them serially.
      for op in InferenceCoreBuilder RaggedOpsBuilder RaggedUtilsBuilder InferenceCutlassBuilder; do
        python3 -c "from deepspeed.ops.op_builder import $op as B; B().load()" > "$OUT/build-$op.txt" 2>&1 &
      done; wait
      make_model
      LMI_TEST_TOKENIZER="$TOKENIZER" python3 -m pytest -q -rs tests/gpu/test_gpu_fastgen.py -p no:cacheprovider \
          2>&1 | tee "$OUT/fastgen-tests.txt"
      OPTION_MODEL_ID=$MODEL OPTION_DTYPE=fp16 OPTION_MAX_ROLLING_BATCH_SIZE=128 SAGEMAKER_BIND_TO_PORT=8093 \
          python3 -m entrypoint serve > "$OUT/fastgen-server.log" 2>&1 &
      SERVER=$!
      for _ in $(seq 600); do curl -sf http://127.0.0.1:8093/ping > /dev/null && break; sleep 1; done
      python3 benchmarks/sweep.py run --url http://127.0.0.1:8093 --model "$MODEL" --tokenizer "$TOKENIZER" \
          --label fastgen-http --out "$OUT/sweep.jsonl" --plots "$OUT/plots" 2>&1 | tee "$OUT/sweep.txt"
      kill -TERM $SERVER; wait $SERVER
      python3 benchmarks/fastgen_loop.py --model-dir $MODEL --out "$OUT/baselines.jsonl" 2>&1 | tee "$OUT/baselines.txt" ;;
    tp)
      python3 benchmarks/tp_benchmark.py --model-dir $MODEL --make-random-llama7b \
          --tokenizer-dir "$TOKENIZER" --degrees 1 2 --concurrency 1 32 --requests-per-client 2 \
          --prompt-tokens 128 --max-tokens 128 --dtype fp16 --log-file "$OUT/tp-results.jsonl" 2>&1 | tee "$OUT/tp-bench.txt"
      cp /tmp/tp-benchmark-server-tp*.log "$OUT/" 2>/dev/null ;;
  esac
done
