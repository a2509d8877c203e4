"""Serving benchmark: N concurrent streaming clients against the running server, compared in the same run
with Hugging Face `generate` on the same requests (one at a time, and as one static batch).

Flags follow DeepSpeed's inference benchmark (prompt, max_tokens, repetitions, concurrency, log file,
device). Typical use on a CPU machine, starting the server on the embedded model itself:

    python benchmarks/serving_benchmark.py --start-server --concurrency 32 --prompt-tokens 64 --max-tokens 64

`--sampling greedy sampled` measures both workloads in the same run (sampled: temperature 0.8, top_p 0.95,
repetition penalty 1.1, a seed per request) and reports their ratio; `--server-env OPTION_X=...` configures
the server it starts. Errors are counted per request (overload runs report them instead of stopping).

or against a server that is already up: `--url http://127.0.0.1:8080`. Results are appended as one JSON
line per run to --log-file and printed as a table; copy them into RESULTS.md with the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

SEED_TEXT = ("The history of Paris spans more than two thousand years. It began as a settlement of the Parisii, "
             "a Celtic tribe, on an island in the Seine, and grew under Roman rule into the town of Lutetia. "
             "Kings, revolutions and world fairs shaped its streets, bridges, churches and museums. ")


def build_prompts(tokenizer, count: int, prompt_tokens: int) -> list[str]:
    """`count` different prompts of exactly `prompt_tokens` tokens each (they re-tokenize to that length)."""
    ids = tokenizer(SEED_TEXT * (1 + (prompt_tokens + count) // 40), add_special_tokens=False)["input_ids"]
    prompts = []
    offset = 0
    while len(prompts) < count:
        text = tokenizer.decode(ids[offset:offset + prompt_tokens])
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == prompt_tokens:
            prompts.append(text)
        offset += 1
    return prompts


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# ---- Hugging Face generate baseline --------------------------------------------------------------------
def hf_baseline(model_path: str, prompts: list[str], max_tokens: int, static_batch: int, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32 if device == "cpu" else torch.float16)
    model = model.to(device).eval()
    encoded = [tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device) for p in prompts]
    common = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id or 0)
    results = {}
    with torch.inference_mode():
        model.generate(encoded[0], max_new_tokens=4, do_sample=False, pad_token_id=common["pad_token_id"])  # warm-up
        sequential = encoded[:max(1, min(len(encoded), 8))]  # batch 1 is slow: a sample of 8 is enough
        started = time.perf_counter()
        for ids in sequential:
            model.generate(ids, **common)
        elapsed = time.perf_counter() - started
        results["hf_batch1_tok_s"] = len(sequential) * max_tokens / elapsed
        batch = torch.cat(encoded[:static_batch])  # all prompts have the same length: no padding
        started = time.perf_counter()
        model.generate(batch, attention_mask=torch.ones_like(batch), **common)
        elapsed = time.perf_counter() - started
        results[f"hf_static_batch{batch.shape[0]}_tok_s"] = batch.shape[0] * max_tokens / elapsed
    del model
    return results


# ---- the server under load ------------------------------------------------------------------------------
#: the sampled workload of the engine-core issue: what a chat client with a seed sends
SAMPLED = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.1}


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int,
                      sampling: str = "greedy", seed: int = 0) -> dict:
    parameters = {"max_new_tokens": max_tokens, "ignore_eos": True, "do_sample": False}
    if sampling == "sampled":
        parameters.update(SAMPLED, seed=seed)
    body = {"inputs": prompt, "stream": True, "parameters": parameters}
    started = time.perf_counter()
    stamps: list[float] = []
    error = None
    try:
        async with client.stream("POST", f"{url}/invocations", json=body,
                                 headers={"Accept": "application/jsonlines"}) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                record = json.loads(line)
                if "error" in record:
                    raise RuntimeError(str(record["error"])[:300])
                if record.get("token") is not None:
                    stamps.append(time.perf_counter())
    except (RuntimeError, httpx.HTTPError) as failure:  # counted, not fatal: overload runs report them
        error = f"{type(failure).__name__}: {failure}"
    ended = time.perf_counter()
    return {"ttft": stamps[0] - started if stamps else float("nan"),
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps), "latency": ended - started,
            "error": error}


async def load_test(url: str, prompts: list[str], max_tokens: int, concurrency: int, sampling: str = "greedy") -> dict:
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for index, prompt in enumerate(prompts):
        queue.put_nowait((index, prompt))
    records: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                index, prompt = queue.get_nowait()
                records.append(await one_request(client, url, prompt, max_tokens, sampling, seed=index))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in records)
    itl = [gap for r in records for gap in r["itl"]]
    ttft = [r["ttft"] for r in records]
    errors = [r["error"] for r in records if r["error"]]
    return {"requests": len(records), "errors": len(errors), "first_errors": errors[:3],
            "output_tokens": tokens, "seconds": elapsed, "sampling": sampling,
            "server_tok_s": tokens / elapsed,
            "ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99),
            "itl_p50_ms": 1000 * percentile(itl, 50), "itl_p99_ms": 1000 * percentile(itl, 99)}


def start_server(model_dir: str | None, port: int, env_extra: dict[str, str],
                 log_path: Path = Path("/tmp/serving-benchmark-server.log")) -> subprocess.Popen:
    """The server as a subprocess; its log goes to a file (a pipe nobody reads would block it)."""
    env = {**os.environ, "SAGEMAKER_BIND_TO_PORT": str(port), **env_extra}
    command = [sys.executable, "-m", "entrypoint", "serve"] + (["--model-dir", model_dir] if model_dir else [])
    log = open(log_path, "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    process.log_path = log_path  # type: ignore[attr-defined]
    return process


def wait_ready(url: str, process: subprocess.Popen | None, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            log = Path(process.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
            raise RuntimeError(f"server exited with {process.returncode}:\n{log}")
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server at {url} not ready after {timeout} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server; default: start one (--start-server)")
    parser.add_argument("--start-server", action="store_true", help="start `python -m entrypoint serve` here")
    parser.add_argument("--model-dir", default=None, help="model directory for the server and the HF baseline; "
                        "default: the embedded model")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--concurrency", type=int, default=32, help="simultaneous clients")
    parser.add_argument("--repetitions", type=int, default=2, help="requests per client")
    parser.add_argument("--device", default="cpu", help="device of the HF baseline (cpu or cuda)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--log-file", default="benchmarks/results.jsonl")
    parser.add_argument("--sampling", nargs="+", choices=["greedy", "sampled"], default=["greedy"],
                        help="workloads measured one after another in this run; sampled: do_sample, temperature 0.8, "
                             "top_p 0.95, repetition_penalty 1.1, a seed per request")
    parser.add_argument("--server-env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra environment for the started server (OPTION_DTYPE=fp16, ...)")
    parser.add_argument("--sequential-requests", type=int, default=4,
                        help="requests sent one at a time after each concurrent run (the batch-1 figure)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    model_path = args.model_dir
    if model_path is None:
        from entrypoint.embedded_model import ensure_embedded_model
        from entrypoint.model_resolution import default_cache_dir
        model_path = str(ensure_embedded_model(default_cache_dir()))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = build_prompts(tokenizer, args.concurrency * args.repetitions, args.prompt_tokens)

    result: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
                    "cpus": os.cpu_count(), "command": " ".join(sys.argv), "prompt_tokens": args.prompt_tokens,
                    "max_tokens": args.max_tokens, "concurrency": args.concurrency,
                    "versions": versions()}
    if not args.skip_baseline:
        result.update(hf_baseline(model_path, prompts, args.max_tokens, args.concurrency, args.device))

    url = args.url or f"http://127.0.0.1:{args.port}"
    server_env = dict(item.split("=", 1) for item in args.server_env)
    process = start_server(args.model_dir, args.port, server_env) if (args.start_server or args.url is None) else None
    try:
        wait_ready(url, process)
        asyncio.run(load_test(url, prompts[:4], args.max_tokens, 4))  # warm-up
        for mode in args.sampling:
            prefix = "" if mode == args.sampling[0] else f"{mode}_"
            result.update({f"{prefix}{k}": v for k, v in
                           asyncio.run(load_test(url, prompts, args.max_tokens, args.concurrency, mode)).items()})
            result.update({f"{prefix}server_batch1_{k}": v for k, v in
                           asyncio.run(load_test(url, prompts[:args.sequential_requests], args.max_tokens, 1,
                                                 mode)).items()
                           if k in ("server_tok_s", "ttft_p50_ms", "itl_p50_ms", "errors")})
        result.update(_kv_metrics(url))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
    for mode in args.sampling[1:]:
        result[f"{mode}_vs_{args.sampling[0]}"] = result[f"{mode}_server_tok_s"] / result["server_tok_s"]
        result[f"{mode}_vs_its_batch1"] = (result[f"{mode}_server_tok_s"]
                                           / result[f"{mode}_server_batch1_server_tok_s"])
    if "hf_batch1_tok_s" in result:
        result["ratio_vs_hf_batch1"] = result["server_tok_s"] / result["hf_batch1_tok_s"]
        static = next(v for k, v in result.items() if k.startswith("hf_static_batch"))
        result["ratio_vs_hf_static_batch"] = result["server_tok_s"] / static
    Path(args.log_file).parent.mkdir(parents=True, exist_ok=True)
    with open(args.log_file, "a", encoding="utf-8") as log:
        log.write(json.dumps(result) + "\n")
    width = max(len(k) for k in result)
    for key, value in result.items():
        shown = f"{value:.2f}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    return 0


def _kv_metrics(url: str) -> dict[str, float]:
    """The server's KV capacity (sized by its memory budget) from /metrics."""
    found = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        for name in ("lmi_kv_cache_capacity_tokens", "lmi_kv_cache_used_tokens"):
            if line.startswith(name + " "):
                found[name] = float(line.split()[1])
    return found


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    found = {}
    for name in ("torch", "transformers", "deepspeed"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    found["python"] = platform.python_version()
    return found


if __name__ == "__main__":
    sys.exit(main())
