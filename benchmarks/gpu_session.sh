#!/usr/bin/env bash
# One call on the GPU machine (see RESULTS.md): install the carried wheels, then run the parts asked for.
#   usage: bash benchmarks/gpu_session.sh WHEELS_DIR TOKENIZER_DIR OUT_DIR PART...
# parts: eng-gpu (the overlapped engine: GPU tests, the put-fence A/B, HTTP vs bare loop in two rounds),
# eng-gap (HTTP vs the bare put() loop over DeepSpeed's build, over the server's build, and over the server's build
# without its fp32-rotary bridge, at 1/32/64: where the gap to the bare loop comes from),
# int8 (the int8 unit tests compiled for the GPU, tests/gpu/test_gpu_int8.py but its servers, FastGen's fp16 and W8A8
# layers timed with the Triton block sweep), int8-loop (the bare loop over the 7B fp16 and int8 builds),
# int8-servers (its server tests), int8-serve (the 7B model: bare loop over the server's fp16 and int8 builds with their
# weight bytes, then the server fp16 and with quantize=dynamic_int8 through HTTP at 1/32/64, two rounds),
# fg-tests (FastGen's GPU tests and gate table), fg-serve (a 7B FastGen server: long prompts and bursts),
# fg-speed (HTTP vs bare put() loop at 1/32/64 clients), fg-fastmath (in the background: DeepSpeed's v2 ops built with
# and without --use_fast_math in parallel, then the gate table of every architecture with each build),
# fg-teacher (a 7B FastGen server: the long-prompt workloads, each batched output scored alone, teacher-forced);
# tests (tests/gpu), core (engine core on a Llama-2-7B-shaped random model: 64 clients x 3,500-token
# prompts x 500 new tokens, sampled), core128 (128/128 greedy and sampled at 1 and 32 clients), tp (degree 1 vs 2),
# fastgen (DeepSpeed's v2 ops built in parallel first, then the FastGen GPU tests, the HTTP sweep over
# concurrency 1-128 at 128/128 and 1024/128 with plots, and the bare put() loop and HF generate baselines).
# WHEELS_DIR must hold deepspeed-kernels' wheel for the fastgen part.
set -uo pipefail
WHEELS=$1 TOKENIZER=$2 OUT=$3; shift 3
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0 DS_SKIP_CUDA_CHECK=1  # DeepSpeed 0.19.8 cannot parse the machine's "9.0a"
export DS_ACCELERATOR=cuda  # the carried wheel was built on a CPU machine
# Installed once per machine: reinstalling gives DeepSpeed's sources new mtimes, and torch's JIT then rebuilds
# every op (~2 min) on a machine that had them built (measured 2026-12-04).
[ -d /tmp/site/deepspeed ] && [ -d /tmp/site/pydantic ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
python3 -c "import torch, transformers, deepspeed, triton; print(torch.__version__, transformers.__version__, deepspeed.__version__, 'triton', triton.__version__)" | tee "$OUT/versions.txt"
python3 -c "import importlib.util as u; m=[n for n in ('fastapi','uvicorn','pydantic','prometheus_client','boto3','yaml','tqdm','accelerate','safetensors','httpx','pytest','gguf') if u.find_spec(n) is None]; print('missing on this machine:', m or 'none')" | tee -a "$OUT/versions.txt"
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
T0=$(date +%s)
stamp() { echo "$(( $(date +%s) - T0 )) s: $*" | tee -a "$OUT/timeline.txt"; }
build_ops_into() {  # build_ops_into LABEL [no-fast-math]: the v2 ops in parallel into $TORCH_EXTENSIONS_DIR (or torch's)
  local label=$1 pre=""
  [ "${2:-}" = no-fast-math ] && pre="import ds_no_fast_math; ds_no_fast_math.apply(); "
  local pids=()  # waits for its own builds only (a bare `wait` would wait for every background job too)
  for op in InferenceCoreBuilder RaggedOpsBuilder RaggedUtilsBuilder InferenceCutlassBuilder; do
    python3 -c "import sys; sys.path.insert(0, 'benchmarks'); ${pre}from deepspeed.ops.op_builder import $op as B; B().load()" \
        > "$OUT/build-$label-$op.txt" 2>&1 &
    pids+=($!)
  done; wait "${pids[@]}"
}
FASTMATH_ARCHS=${FASTMATH_ARCHS:-llama llama3.1 mistral qwen2 phi3 phi falcon opt}
FASTMATH_LENGTHS=${FASTMATH_LENGTHS:-48 600 2000 4000 6000 8000}
start_server() {  # start_server PORT LOG KEY=VALUE...: python -m entrypoint serve on $MODEL, waits for /ping
  local port=$1 log=$2; shift 2
  env OPTION_MODEL_ID=$MODEL SAGEMAKER_BIND_TO_PORT=$port "$@" python3 -m entrypoint serve > "$log" 2>&1 &
  SERVER=$!
  for _ in $(seq 900); do curl -sf http://127.0.0.1:$port/ping > /dev/null && return 0
    kill -0 $SERVER 2>/dev/null || { echo "server exited"; tail -50 "$log"; return 1; }; sleep 1; done
  return 1
}
http_rounds() {  # http_rounds PORT LABEL NAME: the 128/128 sweep at 1/32/64 clients, two rounds, into $OUT/NAME.*
  local port=$1 label=$2 name=$3
  for round in 1 2; do
    python3 benchmarks/sweep.py run --url http://127.0.0.1:$port --model "$MODEL" --tokenizer "$TOKENIZER" \
        --concurrency 1 32 64 --shapes 128/128 --requests-per-client 3 --label "$label-round$round" \
        --out "$OUT/$name.jsonl" 2>&1 | tail -4 | tee -a "$OUT/$name.txt"
  done
}
for part in "$@"; do
  case $part in
    eng-gpu)
      # The overlapped engine on the H200: core GPU tests while the v2 ops build and the 7B model is made; the
      # FastGen GPU tests beside the put-fence A/B (6,000-token probes alone in 12 puts, with and without the
      # wait); then HTTP streaming vs DeepSpeed's bare put() loop at 1/32/64 clients (128/128), two rounds.
      stamp "start"
      build_ops_into normal & BUILD=$!
      make_model > /dev/null & MAKE=$!
      python3 -m pytest -q -rs tests/gpu/test_gpu_autotp.py tests/gpu/test_gpu_engine_core.py \
          tests/unit/test_token_sampler.py -p no:cacheprovider > "$OUT/gpu-tests-core.txt" 2>&1
      stamp "core tests done"; wait $BUILD; stamp "ops built"
      python3 benchmarks/fastgen_gate_table.py --archs llama opt --variants fixed no-put-fence --lengths 6000 \
          --max-sequences 2 --prefill-tokens 512 --out "$OUT/put-fence.jsonl" > "$OUT/put-fence.txt" 2>&1 & FENCE=$!
      python3 -m pytest -q -rs tests/gpu/test_gpu_fastgen.py -p no:cacheprovider > "$OUT/gpu-tests-fastgen.txt" 2>&1
      stamp "fastgen tests done"; wait $FENCE; wait $MAKE; stamp "put-fence rows and model done"
      tail -3 "$OUT"/gpu-tests-*.txt; cut -c1-300 "$OUT/put-fence.jsonl"
      start_server 8097 "$OUT/eng-speed-server.log" OPTION_DTYPE=fp16 OPTION_MAX_ROLLING_BATCH_SIZE=64 || exit 1
      stamp "server up"
      http_rounds 8097 fastgen-http eng-speed
      kill -TERM $SERVER; wait $SERVER; stamp "http rounds done"
      for round in 1 2; do
        python3 benchmarks/fastgen_loop.py --model-dir $MODEL --batches 1 32 64 --engines fastgen-bare-loop \
            --out "$OUT/eng-speed.jsonl" 2>&1 | tail -4 | tee -a "$OUT/eng-speed.txt"
      done; stamp "bare loop done" ;;
    eng-gap)
      # The server's gap to DeepSpeed's bare put() loop, split: the bare loop over DeepSpeed's own build, over
      # the build the server makes (its limits, atom room and bridges), and over that build without the fp32
      # rotary bridge, each in its own process (a built engine keeps its KV cache until the process ends),
      # then the server through HTTP; two rounds of everything, 128/128 greedy at 1/32/64.
      stamp "start"
      build_ops_into normal & BUILD=$!
      make_model > /dev/null; wait $BUILD; stamp "ops built, model made"
      for round in 1 2; do
        for engine in fastgen-bare-loop fastgen-project-build fastgen-project-build-hf-rotary-off; do
          python3 benchmarks/fastgen_loop.py --model-dir $MODEL --batches 1 32 64 --engines $engine \
              --server-batch 64 --out "$OUT/eng-gap.jsonl" 2>&1 | tail -4 | tee -a "$OUT/eng-gap.txt"
          stamp "round $round $engine done"
        done
      done
      start_server 8098 "$OUT/eng-gap-server.log" OPTION_DTYPE=fp16 OPTION_MAX_ROLLING_BATCH_SIZE=64 || exit 1
      stamp "server up"
      http_rounds 8098 fastgen-http eng-gap
      kill -TERM $SERVER; wait $SERVER; stamp "http rounds done" ;;
    int8)
      # int8 on the GPU: the Triton kernels' unit tests (compiled here; interpreted on the CPU) while the v2 ops
      # build, then the GPU tests, then the layer benchmark alone on the GPU.
      stamp "start"
      build_ops_into normal & BUILD=$!
      [ -d $MODEL ] || { make_model > /dev/null & }
      python3 -m pytest -q -rs tests/unit/test_int8_triton.py tests/unit/test_fastgen_int8.py tests/unit/test_int8_math.py \
          -p no:cacheprovider > "$OUT/int8-unit.txt" 2>&1
      wait $BUILD; stamp "unit tests done, ops built"
      python3 -m pytest -q -rs tests/gpu/test_gpu_int8.py -k "not server and not tensor_parallel" -p no:cacheprovider \
          > "$OUT/gpu-tests-int8.txt" 2>&1
      stamp "gpu tests done"; tail -n 3 "$OUT/int8-unit.txt" "$OUT/gpu-tests-int8.txt"
      python3 benchmarks/int8_linear_benchmark.py --configs --out "$OUT/int8-linear.jsonl" > "$OUT/int8-linear.txt" 2>&1
      stamp "layer benchmark done"; cut -c1-400 "$OUT/int8-linear.jsonl" | head -60; wait ;;
    int8-lite)
      # int8's unit tests (compiled) and the layer benchmark without the block sweep, the ops and the 7B model
      # made meanwhile.
      stamp "start"
      build_ops_into normal & BUILD=$!
      [ -d $MODEL ] || { make_model > /dev/null & }
      python3 -m pytest -q -rs tests/unit/test_int8_triton.py tests/unit/test_fastgen_int8.py -p no:cacheprovider \
          > "$OUT/int8-unit.txt" 2>&1
      wait $BUILD; stamp "unit tests done, ops built"; tail -n 3 "$OUT/int8-unit.txt"
      python3 benchmarks/int8_linear_benchmark.py --out "$OUT/int8-linear.jsonl" > "$OUT/int8-linear.txt" 2>&1
      stamp "layer benchmark done"; wait ;;
    int8-loop)
      # The bare put() loop over the server's fp16 build and its quantize=dynamic_int8 build of the 7B model
      # (weights bytes in each row), at 1/32/64 sequences.
      build_ops_into normal & BUILD=$!
      [ -d $MODEL ] || make_model > /dev/null
      wait $BUILD; stamp "ops built, model made"
      for engine in fastgen-project-build fastgen-project-build-int8; do
        python3 benchmarks/fastgen_loop.py --model-dir $MODEL --batches 1 32 64 --engines $engine \
            --server-batch 64 --out "$OUT/int8-loop.jsonl" 2>&1 | tail -4 | tee -a "$OUT/int8-loop.txt"
        stamp "$engine bare loop done"
      done ;;
    int8-servers)
      # The server with each quantize value on FastGen and on AutoTP (tests/gpu/test_gpu_int8.py), and degree 2
      # where two GPUs are present.
      [ -f "$OUT/build-normal-RaggedOpsBuilder.txt" ] || build_ops_into normal
      python3 -m pytest -q -rs tests/gpu/test_gpu_int8.py -k "server or tensor_parallel" -p no:cacheprovider \
          > "$OUT/gpu-tests-int8-servers.txt" 2>&1
      stamp "server tests done"; tail -n 5 "$OUT/gpu-tests-int8-servers.txt" ;;
    int8-serve)
      # The 7B-shaped model, fp16 against quantize=dynamic_int8 on FastGen: the bare loop over each build (weights
      # bytes in its rows), then each server through HTTP (its summary: weights, the gate against HF int8).
      stamp "start"
      build_ops_into normal & BUILD=$!
      make_model > /dev/null; wait $BUILD; stamp "ops built, model made"
      for engine in fastgen-project-build fastgen-project-build-int8; do
        python3 benchmarks/fastgen_loop.py --model-dir $MODEL --batches 1 32 64 --engines $engine \
            --server-batch 64 --out "$OUT/int8-serve.jsonl" 2>&1 | tail -4 | tee -a "$OUT/int8-serve.txt"
        stamp "$engine bare loop done"
      done
      for quantize in none dynamic_int8; do
        extra=(); [ $quantize = none ] || extra=(OPTION_QUANTIZE=$quantize)
        start_server 8099 "$OUT/int8-serve-$quantize.log" OPTION_DTYPE=fp16 OPTION_MAX_ROLLING_BATCH_SIZE=64 \
            "${extra[@]}" || { tail -40 "$OUT/int8-serve-$quantize.log"; continue; }
        stamp "server $quantize up"
        http_rounds 8099 "http-$quantize" int8-serve
        kill -TERM $SERVER; wait $SERVER; stamp "server $quantize done"
        grep -E "weights_bytes|quantization|correctness_gate|engine " "$OUT/int8-serve-$quantize.log" | cut -c1-300
      done ;;
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
    fg-fastmath)
      # DeepSpeed adds --use_fast_math to every CUDA op (CUDAOpBuilder.nvcc_args). Both builds at once, the one
      # without it niced so that the normal build (which the server needs) comes first; each build's gate table
      # as soon as it is there (after the fg-teacher server has sized its KV cache, if that part runs too).
      (
        ( export TORCH_EXTENSIONS_DIR=/tmp/ext-no-fast-math; renice -n 19 -p $BASHPID > /dev/null
          build_ops_into no-fast-math no-fast-math; stamp "ops built without fast math" ) &
        NOFAST=$!
        build_ops_into fast-math; touch /tmp/ops-fast-math.done; stamp "ops built (normal)"
        case " $* " in *" fg-teacher "*) for _ in $(seq 400); do [ -f /tmp/server-sized ] && break; sleep 1; done ;; esac
        python3 benchmarks/fastgen_gate_table.py --archs $FASTMATH_ARCHS --variants fixed --lengths $FASTMATH_LENGTHS \
            --out "$OUT/fastmath-on.jsonl" > "$OUT/fastmath-on.txt" 2>&1; stamp "gate table (fast math) done"
        wait $NOFAST
        TORCH_EXTENSIONS_DIR=/tmp/ext-no-fast-math python3 benchmarks/fastgen_gate_table.py --no-fast-math \
            --archs $FASTMATH_ARCHS --variants fixed --lengths $FASTMATH_LENGTHS --out "$OUT/fastmath-off.jsonl" \
            > "$OUT/fastmath-off.txt" 2>&1; stamp "gate table (no fast math) done"
        for f in $(find ~/.cache/torch_extensions /tmp/ext-no-fast-math -name build.ninja); do
          echo "$f: $(grep -c -- --use_fast_math "$f") lines with --use_fast_math"; done > "$OUT/fastmath-flags.txt"
      ) > "$OUT/fastmath.log" 2>&1 &
      FASTMATH=$! ;;
    fg-teacher)
      # Item 6 of issue 19, teacher-forced: the long-prompt workloads through a 7B FastGen server; each batched
      # output scored alone by greedy continuations from its own prefix, until SCORE_UNTIL s into the session.
      make_model; stamp "model made"
      if [ -n "${FASTMATH:-}" ]; then for _ in $(seq 500); do [ -f /tmp/ops-fast-math.done ] && break; sleep 1; done
      else build_v2_ops; fi
      start_server 8096 "$OUT/teacher-server.log" OPTION_DTYPE=fp16 OPTION_MAX_ROLLING_BATCH_SIZE=64 \
          OPTION_MAX_TOKENS=8192 OPTION_GPU_MEMORY_UTILIZATION=${SERVER_MEMORY:-0.8}; UP=$?
      touch /tmp/server-sized; stamp "server up ($UP)"
      if [ $UP = 0 ]; then
        timeout $(( ${SESSION_LIMIT:-500} - ($(date +%s) - T0) )) python3 benchmarks/fastgen_long_prompts.py \
            --url http://127.0.0.1:8096 --model $MODEL --vocab 49152 --workloads ${TEACHER_WORKLOADS:-burst-short spread burst-long} \
            --deadline $(( ${SCORE_UNTIL:-400} - ($(date +%s) - T0) )) --out "$OUT/teacher.json" 2>&1 \
            | cut -c1-1500 | tee "$OUT/teacher.txt"
        kill -TERM $SERVER; wait $SERVER
      fi; stamp "teacher-forced part done" ;;
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
[ -n "${FASTMATH:-}" ] && { wait $FASTMATH; stamp "fast-math part done"; }
exit 0
