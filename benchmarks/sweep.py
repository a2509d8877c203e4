"""Load sweep against any OpenAI-compatible server: this one, or a peer (vLLM, TGI) measured with the same
client, so the numbers compare.

    python benchmarks/sweep.py run --url http://127.0.0.1:8080 --model MODEL --tokenizer DIR \
        --concurrency 1 8 32 64 128 --shapes 128/128 1024/128 --out results/sweep.jsonl --label lmi-deepspeed
    python benchmarks/sweep.py plot results/sweep.jsonl results/peer.jsonl --out results/plots

`run` sends streaming `/v1/completions` requests (prompts of exactly N tokens of `--tokenizer`, M new tokens
with `ignore_eos`, greedy or sampled), `requests-per-client` per client at each concurrency, and writes one
JSON line per (shape, concurrency): output tok/s, TTFT and inter-token latency p50/p99, requests, errors
(each counted, none fatal). `plot` draws throughput against latency and latency percentiles against
concurrency, one line per label and shape (PNG; needs matplotlib: `pip install -e ".[bench]"`).

Token counts come from the server's `usage` (`stream_options.include_usage`) when it sends it, otherwise
from the number of streamed chunks that carried text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_benchmark import versions, build_prompts, percentile  # noqa: E402

SAMPLED = {"temperature": 0.8, "top_p": 0.95}


async def one_completion(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                         sampled: bool, seed: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}, "seed": seed,
            **(SAMPLED if sampled else {"temperature": 0.0})}
    started = time.perf_counter()
    stamps: list[float] = []
    usage_tokens = None
    error = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(str(chunk["error"])[:300])
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                if any(choice.get("text") for choice in chunk.get("choices") or []):
                    stamps.append(time.perf_counter())
    except (RuntimeError, httpx.HTTPError, json.JSONDecodeError) as failure:
        error = f"{type(failure).__name__}: {failure}"
    tokens = usage_tokens if usage_tokens is not None else len(stamps)
    return {"ttft": stamps[0] - started if stamps else None, "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": tokens if error is None else len(stamps), "error": error}


async def level(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int, sampled: bool,
                progress) -> dict:
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for index, prompt in enumerate(prompts):
        queue.put_nowait((index, prompt))
    records: list[dict] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0),
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def worker() -> None:
            while not queue.empty():
                index, prompt = queue.get_nowait()
                records.append(await one_completion(client, url, model, prompt, max_tokens, sampled, index))
                progress.update(1)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ttft = [r["ttft"] for r in records if r["ttft"] is not None]
    itl = [gap for r in records for gap in r["itl"]]
    errors = [r["error"] for r in records if r["error"]]
    tokens = sum(r["tokens"] for r in records)
    return {"concurrency": concurrency, "requests": len(records), "errors": len(errors), "first_errors": errors[:3],
            "output_tokens": tokens, "seconds": round(elapsed, 3), "output_tok_s": tokens / elapsed,
            "ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99),
            "itl_p50_ms": 1000 * percentile(itl, 50), "itl_p99_ms": 1000 * percentile(itl, 99)}


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    shapes = [tuple(int(n) for n in shape.split("/")) for shape in args.shapes]
    total = sum(c * args.requests_per_client for c in args.concurrency) * len(shapes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    common = {"label": args.label, "url": args.url, "model": args.model, "sampled": args.sampled,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
              "command": " ".join(sys.argv), "versions": versions()}
    rows = []
    with tqdm(total=total, desc="requests", unit="req") as progress:
        for prompt_tokens, max_tokens in shapes:
            prompts = build_prompts(tokenizer, max(args.concurrency) * args.requests_per_client, prompt_tokens)
            if args.warmup:
                asyncio.run(level(args.url, args.model, prompts[:2], max_tokens, 2, args.sampled, tqdm(disable=True)))
            for concurrency in args.concurrency:
                result = asyncio.run(level(args.url, args.model, prompts[:concurrency * args.requests_per_client],
                                           max_tokens, concurrency, args.sampled, progress))
                row = {**common, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, **result}
                rows.append(row)
                with open(out, "a", encoding="utf-8") as log:
                    log.write(json.dumps(row) + "\n")
                progress.write(f"{prompt_tokens}/{max_tokens} x{concurrency}: {row['output_tok_s']:.1f} tok/s, "
                               f"TTFT p50 {row['ttft_p50_ms']:.0f} ms, ITL p50 {row['itl_p50_ms']:.1f} ms, "
                               f"errors {row['errors']}")
    if args.plots:
        plot_rows(rows, Path(args.plots))
    return 1 if any(row["errors"] for row in rows) and args.fail_on_error else 0


def plot_rows(rows: list[dict], directory: Path) -> list[Path]:
    """Two PNG figures from sweep rows (any number of labels and shapes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    series: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        series.setdefault((row.get("label") or "server", f"{row['prompt_tokens']}/{row['max_tokens']}"), []).append(row)
    for points in series.values():
        points.sort(key=lambda row: row["concurrency"])

    figure, axis = plt.subplots(figsize=(7, 5))
    for (label, shape), points in series.items():
        axis.plot([p["itl_p50_ms"] for p in points], [p["output_tok_s"] for p in points], marker="o",
                  label=f"{label} {shape}")
        for p in points:
            axis.annotate(str(p["concurrency"]), (p["itl_p50_ms"], p["output_tok_s"]), fontsize=7)
    axis.set_xlabel("inter-token latency p50 (ms)")
    axis.set_ylabel("output tokens/s")
    axis.set_title("Throughput against latency (points: concurrency)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    throughput = _save(plt, figure, directory / "throughput_vs_latency.png")

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for (label, shape), points in series.items():
        concurrency = [p["concurrency"] for p in points]
        for axis, metric in zip(axes, ("ttft", "itl")):
            line, = axis.plot(concurrency, [p[f"{metric}_p50_ms"] for p in points], marker="o",
                              label=f"{label} {shape} p50")
            axis.plot(concurrency, [p[f"{metric}_p99_ms"] for p in points], marker="x", linestyle="--",
                      color=line.get_color(), label=f"{label} {shape} p99")
    for axis, title in zip(axes, ("time to first token (ms)", "inter-token latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    latency = _save(plt, figure, directory / "latency_vs_concurrency.png")
    return [throughput, latency]


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot(args: argparse.Namespace) -> int:
    rows = [json.loads(line) for path in args.files for line in Path(path).read_text().splitlines() if line.strip()]
    for path in plot_rows(rows, Path(args.out)):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("run", help="measure a server")
    sweep.add_argument("--url", required=True)
    sweep.add_argument("--model", required=True, help="the model name the server expects in the body")
    sweep.add_argument("--tokenizer", required=True, help="tokenizer directory (prompts of exact token counts)")
    sweep.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    sweep.add_argument("--shapes", nargs="+", default=["128/128", "1024/128"], help="PROMPT/NEW token counts")
    sweep.add_argument("--requests-per-client", type=int, default=2)
    sweep.add_argument("--sampled", action="store_true", help="temperature 0.8, top_p 0.95 (default: greedy)")
    sweep.add_argument("--label", default="server", help="name of this server in the results and plots")
    sweep.add_argument("--out", default="benchmarks/results/sweep.jsonl")
    sweep.add_argument("--plots", default=None, help="directory for PNG plots of this run")
    sweep.add_argument("--no-warmup", dest="warmup", action="store_false")
    sweep.add_argument("--fail-on-error", action="store_true", help="exit 1 if any request failed")
    drawing = commands.add_parser("plot", help="plot JSON lines of earlier runs (peers side by side)")
    drawing.add_argument("files", nargs="+")
    drawing.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else plot(args)


if __name__ == "__main__":
    sys.exit(main())
