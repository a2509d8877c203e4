"""Tensor-parallel benchmark: the same server at several tensor_parallel_degree values, under the same
streaming load, with peak host memory per rank. Degrees run one after another in the same call, so their
ratios are comparable (these machines are noisy).

    python benchmarks/tp_benchmark.py --model-dir /path/to/model --degrees 1 2 --concurrency 1 32 \
        --prompt-tokens 128 --max-tokens 128 --dtype fp16

`--make-random-llama7b DIR --tokenizer-dir TOK` first writes a Llama-2-7B-shaped model with random
weights (hidden 4096, 32 layers, 32 heads, MLP 11008; the tokenizer's vocabulary) as fp16 safetensors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_benchmark import build_prompts, load_test, start_server, wait_ready  # noqa: E402


def make_random_llama7b(target: Path, tokenizer_dir: Path, context: int = 4096) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (target / "config.json").is_file():
        return
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=len(tokenizer), max_position_embeddings=context,
                         rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(target, max_shard_size="5GB")
    tokenizer.save_pretrained(target)
    del model
    print(f"wrote random Llama-2-7B-shaped model to {target} in {time.perf_counter() - started:.0f} s", flush=True)


def peak_memory_per_rank(log_text: str) -> dict[str, dict[str, float]]:
    """GiB per rank (private, and RSS including the mapped checkpoint), from the start-up summary (rank 0)
    and the other ranks' "rank ready" lines; see handlers/memory_probe.py."""
    found: dict[str, dict[str, float]] = {}
    for line in log_text.splitlines():
        rank = re.search(r"(?:rank (\d+) )?INFO ", line)
        for name, pattern in (("peak_private_memory_loading", r"peak_private_memory=([\d.]+)GiB"),
                              ("peak_rss_loading", r"peak_rss_incl_mapped_checkpoint=([\d.]+)GiB"),
                              ("peak_rss_whole_run", r"peak_rss over the whole run: ([\d.]+)GiB")):
            match = re.search(pattern, line)
            if rank and match:
                found.setdefault(f"rank{rank.group(1) or 0}", {})[name] = float(match.group(1))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--make-random-llama7b", action="store_true", help="create --model-dir first")
    parser.add_argument("--tokenizer-dir", default=None)
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--log-file", default="benchmarks/results.jsonl")
    args = parser.parse_args()

    model_dir = Path(args.model_dir)
    if args.make_random_llama7b:
        make_random_llama7b(model_dir, Path(args.tokenizer_dir))
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = build_prompts(tokenizer, max(args.concurrency) * args.requests_per_client, args.prompt_tokens)
    url = f"http://127.0.0.1:{args.port}"
    empty_dir = Path("/tmp/tp-benchmark-no-properties")
    empty_dir.mkdir(exist_ok=True)

    rows = []
    for degree in args.degrees:
        env = {"OPTION_MODEL_ID": str(model_dir), "OPTION_TENSOR_PARALLEL_DEGREE": str(degree),
               "OPTION_DTYPE": args.dtype, "OPTION_MAX_ROLLING_BATCH_SIZE": str(max(args.concurrency)),
               # the same engine at every degree: FastGen serves degree 1 on a GPU by default, AutoTP degree > 1
               "OPTION_FASTGEN": "false"}
        log_path = Path(f"/tmp/tp-benchmark-server-tp{degree}.log")
        started = time.perf_counter()
        process = start_server(str(empty_dir), args.port, env, log_path=log_path)
        try:
            wait_ready(url, process, timeout=900)
            ready_s = time.perf_counter() - started
            asyncio.run(load_test(url, prompts[:2], args.max_tokens, 2))  # warm-up
            for concurrency in args.concurrency:
                count = concurrency * args.requests_per_client
                result = asyncio.run(load_test(url, prompts[:count], args.max_tokens, concurrency))
                row = {"degree": degree, "concurrency": concurrency, "ready_s": round(ready_s, 1), **result}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            process.terminate()
            process.wait(timeout=120)
        memory = peak_memory_per_rank(log_path.read_text())
        for row in rows:
            if row["degree"] == degree:
                row["peak_host_memory_gib"] = memory
        print(f"tp={degree} peak host memory per rank (GiB): {memory}", flush=True)

    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
              "command": " ".join(sys.argv), "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
              "dtype": args.dtype, "rows": rows, "gpus": _gpus()}
    Path(args.log_file).parent.mkdir(parents=True, exist_ok=True)
    with open(args.log_file, "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")
    return 0


def _gpus() -> list[str]:
    try:
        import torch
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - informational only
        return []


if __name__ == "__main__":
    sys.exit(main())
