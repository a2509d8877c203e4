"""Long prompts and bursts end to end against a running server: greedy requests sent all at once, each then
sent again alone, texts compared.

    python benchmarks/fastgen_long_prompts.py --url http://127.0.0.1:8080 --vocab 49152 --out results/long.json

Three workloads (prompts are seeded random token ids, sent as ids to /v1/completions; greedy, ignore_eos):
  burst-long   64 requests of 3,400 prompt tokens x 400 new tokens at once (more KV than the cache holds)
  burst-short  64 requests of 32 prompt tokens x 64 new tokens at once
  spread       8 requests whose prompts span 100-8,000 tokens x 128 new tokens at once
Batched and alone, the numerics of a step differ (other GEMM shapes, other chunk boundaries), so greedy text
may part where the two most likely tokens are within rounding of each other; every request that differs is
reported with the first token that differs and the top-2 log-probability gap the alone run saw there.
A garbage step (the attention-atom defect) differs from the first token on, with large gaps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_benchmark import versions  # noqa: E402

WORKLOADS = {
    "burst-long": [(3400, 400)] * 64,
    "burst-short": [(32, 64)] * 64,
    "spread": [(n, 128) for n in (100, 700, 1500, 2600, 3800, 5000, 6400, 8000)],
}
#: log-probability gap (nats) within which the alone run's two most likely tokens count as a near-tie: fp16
#: logits of magnitude 4-8 are spaced 1/256 (0.0039) apart, and this is five such steps
NEAR_TIE = 0.02


async def complete(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": 2}
    started = time.perf_counter()
    response = await client.post(f"{url}/v1/completions", json=body)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        return {"status": response.status_code, "error": response.text[:300], "seconds": seconds}
    choice = response.json()["choices"][0]
    return {"status": 200, "text": choice["text"], "tokens": choice["logprobs"]["tokens"],
            "top": choice["logprobs"]["top_logprobs"], "seconds": seconds}


def divergence(batched: dict, alone: dict) -> dict:
    """Where the two token streams part, and how close the alone run's top two were there."""
    index = next((i for i, (a, b) in enumerate(zip(batched["tokens"], alone["tokens"])) if a != b),
                 min(len(batched["tokens"]), len(alone["tokens"])))
    top = alone["top"][index] if index < len(alone["top"]) and alone["top"][index] else {}
    values = sorted(top.values(), reverse=True)
    chosen = batched["tokens"][index] if index < len(batched["tokens"]) else None
    return {"first_different_token": index,
            "alone_top2_gap": round(values[0] - values[1], 4) if len(values) >= 2 else None,
            "batched_token_in_alone_top2": chosen in top}


async def workload(url: str, model: str, name: str, shapes: list[tuple[int, int]], vocab: int, seed: int) -> dict:
    rng = random.Random(f"{seed}-{name}")
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n, _ in shapes]
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600)) as client:
        started = time.perf_counter()
        batched = await asyncio.gather(*(complete(client, url, model, p, m) for p, (_, m) in zip(prompts, shapes)))
        burst_seconds = time.perf_counter() - started
        alone = [await complete(client, url, model, p, m) for p, (_, m) in zip(prompts, shapes)]
    rows = []
    for index, ((n, m), b, a) in enumerate(zip(shapes, batched, alone)):
        row = {"request": index, "prompt_tokens": n, "max_tokens": m, "batched_status": b["status"],
               "alone_status": a["status"], "batched_seconds": round(b["seconds"], 2)}
        if b["status"] == 200 and a["status"] == 200:
            row["identical"] = b["text"] == a["text"] and b["tokens"] == a["tokens"]
            row["generated"] = len(b["tokens"])
            if not row["identical"]:
                row.update(divergence(b, a))
        else:
            row["error"] = b.get("error") or a.get("error")
        rows.append(row)
    ok = [r for r in rows if r["batched_status"] == 200 and r["alone_status"] == 200]
    differ = [r for r in ok if not r["identical"]]
    near_ties = [r for r in differ if r["alone_top2_gap"] is not None and r["alone_top2_gap"] <= NEAR_TIE
                 and r["batched_token_in_alone_top2"]]
    return {"workload": name, "requests": len(rows), "all_200": len(ok) == len(rows),
            "identical": sum(r["identical"] for r in ok), "burst_seconds": round(burst_seconds, 1),
            "parted_only_at_near_ties": len(near_ties) == len(differ),
            "differing": [{k: r[k] for k in ("request", "prompt_tokens", "first_different_token", "alone_top2_gap",
                                    "batched_token_in_alone_top2")}
                          for r in differ], "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True, help="the model name or path the server answers to")
    parser.add_argument("--vocab", type=int, required=True, help="the model's vocabulary size (prompt ids below it)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
               "versions": versions(), "command": " ".join(sys.argv), "workloads": []}
    for name in args.workloads:
        result = asyncio.run(workload(args.url, args.model, name, WORKLOADS[name], args.vocab, args.seed))
        results["workloads"].append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0 if all(w["all_200"] for w in results["workloads"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
