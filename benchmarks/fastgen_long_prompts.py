"""Long prompts and bursts end to end against a running server: greedy requests sent all at once, then each
batched output scored alone, teacher-forced, through the same server.

    python benchmarks/fastgen_long_prompts.py --url http://127.0.0.1:8080 --model M --vocab 49152 --out long.json
    python benchmarks/fastgen_long_prompts.py ... --small --score echo     # tiny shapes, e.g. the CPU server

Three workloads (prompts are seeded random token ids, sent as ids to /v1/completions; greedy, ignore_eos):
  burst-long   64 requests of 3,400 prompt tokens x 400 new tokens at once (more KV than the cache holds)
  burst-short  64 requests of 32 prompt tokens x 64 new tokens at once
  spread       8 requests whose prompts span 100-8,000 tokens x 128 new tokens at once
Batched and alone, the numerics of a step differ (other GEMM shapes, other chunk boundaries), so greedy text
may part where the two most likely tokens are within rounding of each other. So each batched output is scored
alone, teacher-forced: at every generated position, the log-probability the server gives the batched token
when it computes that position alone on the batched prefix, against the most likely token's there. A garbage
batched step (the attention-atom defect) puts tokens there that the alone computation ranks nats below its
top token; a rounding tie, within NEAR_TIE. Reported per workload: the largest such gap over all positions,
and how many requests stay within NEAR_TIE at every position.

Two ways to score (--score), both through the server's own alone path, the generated ids sent back as ids
(`return_tokens_as_token_ids`):
  continue  a greedy request of prompt + the batched tokens so far, streamed; at the first position where the
            alone argmax is not the batched token, it is closed and a new one starts from one token further.
            Its first run is exactly the request served alone, so identity comes with it. Costs an alone
            decode plus one prefill per parting: what to use with FastGen, whose prompt scoring is one put
            per token (it unembeds only each sequence's last token).
  echo      one request of prompt + batched tokens, `max_tokens: 0`, `echo`, `logprobs`: every position
            scored in the prompt pass (cheap where the engine unembeds every position, as the CPU engine
            does). Identity then needs the alone decodes as well (--alone-decodes).
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
#: --small: the same three shapes scaled down for a CPU server
SMALL_WORKLOADS = {
    "burst-long": [(300, 24)] * 8,
    "burst-short": [(16, 16)] * 8,
    "spread": [(n, 16) for n in (10, 80, 250, 600)],
}
#: log-probability gap (nats) within which two tokens count as a near-tie: fp16 logits of magnitude 4-8 are
#: spaced 1/256 (0.0039) apart, and this is five such steps
NEAR_TIE = 0.02
#: top log-probabilities asked for per position (OpenAI's completions allow 5)
TOP = 5


def token_id(name: str) -> int:
    return int(name.removeprefix("token_id:"))


def ids_of(top: dict[str, float] | None) -> dict[int, float]:
    return {token_id(name): value for name, value in (top or {}).items()}


def base_body(model: str, prompt: list[int], max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": TOP, "return_tokens_as_token_ids": True}


async def complete(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    started = time.perf_counter()
    response = await client.post(f"{url}/v1/completions", json=base_body(model, prompt, max_tokens))
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        return {"status": response.status_code, "error": response.text[:300], "seconds": seconds}
    choice = response.json()["choices"][0]
    return {"status": 200, "text": choice["text"], "ids": [token_id(t) for t in choice["logprobs"]["tokens"]],
            "top": [ids_of(top) for top in choice["logprobs"]["top_logprobs"]], "seconds": seconds}


def gap_at(top: dict[int, float], wanted: int, logprob: float | None = None) -> tuple[float, bool]:
    """(most likely token's log-probability minus the wanted token's, whether that is exact): outside the
    top tokens returned, the gap is at least the top one's lead over the last one returned."""
    best = max(top.values())
    if logprob is not None:
        return best - logprob, True
    if wanted in top:
        return best - top[wanted], True
    return best - min(top.values()), False


def parting(position: int, top: dict[int, float], wanted: int) -> dict:
    values = sorted(top.values(), reverse=True)
    return {"position": position, "gap": round(gap_at(top, wanted)[0], 4),
            "alone_top2_gap": round(values[0] - values[1], 4) if len(values) >= 2 else None,
            "batched_token_in_alone_top2": wanted in sorted(top, key=top.get, reverse=True)[:2]}


async def score_continue(client: httpx.AsyncClient, url: str, model: str, prompt: list[int],
                         batched: list[int]) -> dict:
    """Teacher-forced alone by greedy continuations from the batched prefix (see the module's doc)."""
    gaps: list[float] = []
    partings: list[dict] = []
    inexact = 0
    position, runs = 0, 0
    started = time.perf_counter()
    while position < len(batched):
        body = {**base_body(model, prompt + batched[:position], len(batched) - position), "stream": True}
        runs += 1
        parted, before = False, position
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                return {"error": f"{response.status_code} {(await response.aread())[:300]!r}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    return {"error": json.dumps(chunk["error"])[:300]}
                logprobs = chunk["choices"][0].get("logprobs") if chunk.get("choices") else None
                for name, top in zip((logprobs or {}).get("tokens", ()), (logprobs or {}).get("top_logprobs", ())):
                    top = ids_of(top)
                    gap, exact = gap_at(top, batched[position])
                    gaps.append(gap)
                    inexact += not exact
                    if token_id(name) != batched[position]:
                        partings.append(parting(position, top, batched[position]))
                        parted = True
                    position += 1
                    if parted or position == len(batched):
                        break
                if parted or position == len(batched):
                    break  # closing the stream cancels the rest of an alone run that has parted
        if not parted and position < len(batched) and position == before:
            return {"error": f"the alone run at position {position} returned no tokens"}
    return {"gaps": gaps, "partings": partings, "inexact": inexact, "runs": runs,
            "seconds": time.perf_counter() - started}


async def score_echo(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], batched: list[int]) -> dict:
    """Teacher-forced alone by scoring prompt + batched tokens as one prompt (max_tokens 0, echo, logprobs)."""
    body = {**base_body(model, prompt + batched, 0), "echo": True}
    started = time.perf_counter()
    response = await client.post(f"{url}/v1/completions", json=body)
    if response.status_code != 200:
        return {"error": f"{response.status_code} {response.text[:300]}"}
    logprobs = response.json()["choices"][0]["logprobs"]
    gaps, partings = [], []
    for offset, wanted in enumerate(batched):
        index = len(prompt) + offset
        top = ids_of(logprobs["top_logprobs"][index])
        gap, _ = gap_at(top, wanted, logprobs["token_logprobs"][index])
        gaps.append(gap)
        if max(top, key=top.get) != wanted and gap > 0:
            partings.append(parting(offset, top, wanted))
    return {"gaps": gaps, "partings": partings, "inexact": 0, "runs": 1, "seconds": time.perf_counter() - started}


def divergence(batched: dict, alone: dict) -> dict:
    """Where the two token streams part, and how close the alone run's top two were there."""
    index = next((i for i, (a, b) in enumerate(zip(batched["ids"], alone["ids"])) if a != b),
                 min(len(batched["ids"]), len(alone["ids"])))
    top = alone["top"][index] if index < len(alone["top"]) and alone["top"][index] else {}
    values = sorted(top.values(), reverse=True)
    chosen = batched["ids"][index] if index < len(batched["ids"]) else None
    return {"first_different_token": index,
            "alone_top2_gap": round(values[0] - values[1], 4) if len(values) >= 2 else None,
            "batched_token_in_alone_top2": chosen in sorted(top, key=top.get, reverse=True)[:2]}


async def workload(url: str, model: str, name: str, shapes: list[tuple[int, int]], vocab: int, seed: int,
                   score: str, alone_decodes: bool, deadline: float, plant: bool = False) -> dict:
    rng = random.Random(f"{seed}-{name}")
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n, _ in shapes]
    scorer = score_continue if score == "continue" else score_echo
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600)) as client:
        started = time.perf_counter()
        batched = await asyncio.gather(*(complete(client, url, model, p, m) for p, (_, m) in zip(prompts, shapes)))
        burst_seconds = time.perf_counter() - started
        if plant:  # the check's own control: a garbage token in the middle of every output
            for b in batched:
                if b["status"] == 200:
                    b["ids"][len(b["ids"]) // 2] = rng.randrange(vocab)
        scored: list[dict | None] = []
        for prompt, b in zip(prompts, batched):
            late = time.monotonic() > deadline
            scored.append(None if late or b["status"] != 200 else await scorer(client, url, model, prompt, b["ids"]))
        alone = ([await complete(client, url, model, p, m) for p, (_, m) in zip(prompts, shapes)]
                 if alone_decodes else [None] * len(prompts))
    rows = []
    for index, ((n, m), b, a, s) in enumerate(zip(shapes, batched, alone, scored)):
        row: dict = {"request": index, "prompt_tokens": n, "max_tokens": m, "batched_status": b["status"],
                     "batched_seconds": round(b["seconds"], 2)}
        if b["status"] != 200:
            row["error"] = b.get("error")
        if b["status"] == 200 and s is not None:
            if "error" in s:
                row["score_error"] = s["error"]
            else:
                row.update({"max_gap": round(max(s["gaps"]), 4), "positions": len(s["gaps"]),
                            "partings": s["partings"], "gaps_outside_top": s["inexact"], "score_runs": s["runs"],
                            "score_seconds": round(s["seconds"], 2)})
                row["within_near_tie"] = row["max_gap"] <= NEAR_TIE and not s["inexact"]
                if score == "continue":  # its first run is the request served alone
                    row["identical"] = not s["partings"]
                    if s["partings"]:
                        first = s["partings"][0]
                        row.update({"first_different_token": first["position"],
                                    "alone_top2_gap": first["alone_top2_gap"],
                                    "batched_token_in_alone_top2": first["batched_token_in_alone_top2"]})
        if a is not None:
            row["alone_status"] = a["status"]
            if b["status"] == 200 and a["status"] == 200:
                row["identical"] = b["text"] == a["text"] and b["ids"] == a["ids"]
                if not row["identical"]:
                    row.update(divergence(b, a))
        rows.append(row)
    ok = [r for r in rows if r["batched_status"] == 200 and r.get("alone_status", 200) == 200]
    checked = [r for r in ok if "identical" in r]
    differ = [r for r in checked if not r["identical"]]
    near_ties = [r for r in differ if r["alone_top2_gap"] is not None and r["alone_top2_gap"] <= NEAR_TIE
                 and r["batched_token_in_alone_top2"]]
    teacher = [r for r in rows if "max_gap" in r]
    return {"workload": name, "requests": len(rows), "all_200": len(ok) == len(rows),
            "burst_seconds": round(burst_seconds, 1),
            "identity_checked": len(checked), "identical": len(checked) - len(differ),
            "parted_only_at_near_ties": len(near_ties) == len(differ),
            "teacher_forced": {
                "method": score, "scored": len(teacher), "score_errors": sum("score_error" in r for r in rows),
                "max_gap": max((r["max_gap"] for r in teacher), default=None),
                "within_near_tie": sum(r["within_near_tie"] for r in teacher),
                "positions": sum(r["positions"] for r in teacher),
                "positions_parted": sum(len(r["partings"]) for r in teacher),
                "gaps_outside_top": sum(r["gaps_outside_top"] for r in teacher),
                "seconds": round(sum(r["score_seconds"] for r in teacher), 1)},
            "differing": [{k: r[k] for k in ("request", "prompt_tokens", "first_different_token", "alone_top2_gap",
                                    "batched_token_in_alone_top2")}
                          for r in differ], "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True, help="the model name or path the server answers to")
    parser.add_argument("--vocab", type=int, required=True, help="the model's vocabulary size (prompt ids below it)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--small", action="store_true", help="tiny shapes (SMALL_WORKLOADS), for a CPU server")
    parser.add_argument("--score", choices=("continue", "echo"), default="continue",
                        help="how each batched output is scored alone (see above)")
    parser.add_argument("--alone-decodes", nargs="*", default=None, choices=list(WORKLOADS), metavar="WORKLOAD",
                        help="also decode each request alone and compare texts, for these workloads (default: "
                        "none with --score continue, whose first run is that decode; all with --score echo)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds from the start after which no further request is scored (the rest are "
                        "reported unscored)")
    parser.add_argument("--plant-garbage", action="store_true", help="the check's control: replace the middle "
                        "token of every batched output by a random id before scoring; every request must then "
                        "fail NEAR_TIE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    deadline = time.monotonic() + (args.deadline if args.deadline is not None else float("inf"))
    alone_decodes = args.alone_decodes if args.alone_decodes is not None else (
        [] if args.score == "continue" else list(WORKLOADS))
    shapes = SMALL_WORKLOADS if args.small else WORKLOADS
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
               "versions": versions(), "command": " ".join(sys.argv), "near_tie": NEAR_TIE, "workloads": []}
    for name in args.workloads:
        result = asyncio.run(workload(args.url, args.model, name, shapes[name], args.vocab, args.seed, args.score,
                                      name in alone_decodes, deadline, args.plant_garbage))
        results["workloads"].append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0 if all(w["all_200"] for w in results["workloads"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
