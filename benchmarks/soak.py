"""Soak test and reliability report: many clients against the real server for a bounded time, then the figures.

    python benchmarks/soak.py --clients 64 --duration 600 --report RELIABILITY.md

starts `python -m entrypoint serve` on the embedded model on a loopback port (or uses `--url`, which must be
a loopback address), runs `--clients` concurrent clients for `--duration` seconds, each sending one request
after another, mixing:
  - short and long prompts (a sentence / ~1,100 characters),
  - streaming (jsonlines on /invocations, SSE on /v1/completions) and non-streaming,
  - sampled (do_sample with a seed) and greedy,
  - clients that disconnect mid-stream on purpose (`--disconnect-share` of the streams).
It stops sending at the deadline and waits (bounded by --drain) for what is in flight, so it always ends by
itself; `--max-requests` bounds the count too.

Every request ends in exactly one of: completed (200 with the full answer), errored (an explicit error: a
4xx/5xx status with the error body, or a stream ending with an error object; counted by type), disconnected
(the client hung up on purpose), or lost (no answer: a client timeout, a connection dropped without a
response, a stream that stopped without its final object). Lost must be 0.

Figures: requests sent, completed, errored (by status and type), disconnected, lost; p50/p99 end-to-end
latency of completed requests that started in the first and in the last minute; resident memory of the
server (with its children) at the start (after a warm-up) and at the end, and its growth (must stay under
10%). The report (markdown) records the date, machine (including its load: other work may share it),
versions, command and figures; the raw per-request log goes next to it (.jsonl.gz).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import ipaddress
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_benchmark import versions, percentile, start_server, wait_ready  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHORT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "def fibonacci(n):",
                 "List three primary colours.", "Once upon a time"]
LONG_TEXT = ("The history of Paris spans more than two thousand years. It began as a settlement of the Parisii, "
             "a Celtic tribe, on an island in the Seine, and grew under Roman rule into the town of Lutetia. "
             "Kings, revolutions and world fairs shaped its streets, bridges, churches and museums. ") * 3
GROWTH_LIMIT = 0.10
MEMORY_EVERY_S = 15.0


@dataclass
class Outcome:
    client: int
    kind: str  # e.g. "lmi-stream-long-sampled"
    started: float  # seconds since the soak began
    seconds: float = 0.0
    result: str = "lost"  # completed | errored | disconnected | lost
    status: int | None = None
    error: str | None = None  # the error type (errored) or why it was lost
    tokens: int = 0
    extra: dict = field(default_factory=dict)


def chat_prompt(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def error_type(body: dict) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "no error object"
    code = error.get("code")  # OpenAI's shape names the failure in `code` ("predict_timeout"), LMI's in `type`
    return str(code if isinstance(code, str) else error.get("type"))


async def one_request(client: httpx.AsyncClient, url: str, model: str, rng: random.Random, outcome: Outcome,
                      disconnect_share: float, timeout: float) -> None:
    long = rng.random() < 0.3
    stream = rng.random() < 0.5
    sampled = rng.random() < 0.5
    openai = rng.random() < 0.3
    max_tokens = rng.choice([8, 16, 32])
    prompt = LONG_TEXT + "\nSummarise the text above." if long else rng.choice(SHORT_PROMPTS)
    disconnect_after = rng.randint(1, 4) if stream and rng.random() < disconnect_share else None
    outcome.kind = "-".join(["openai" if openai else "lmi", "stream" if stream else "json", "long" if long else "short",
                             "sampled" if sampled else "greedy"] + (["disconnect"] if disconnect_after else []))
    if openai:
        path = "/v1/completions"
        body = {"model": model, "prompt": chat_prompt(prompt), "max_tokens": max_tokens,
                "stream": stream, "temperature": 0.8 if sampled else 0.0, "seed": rng.randint(0, 2**31)}
    else:
        path = "/invocations"
        parameters = {"max_new_tokens": max_tokens}
        if sampled:
            parameters.update(do_sample=True, temperature=0.8, top_p=0.95, seed=rng.randint(0, 2**31))
        body = {"inputs": chat_prompt(prompt), "parameters": parameters, "stream": stream}
    began = time.monotonic()
    try:
        if not stream:
            response = await client.post(url + path, json=body, timeout=timeout)
            outcome.status = response.status_code
            try:
                data = response.json()
            except ValueError:  # an answer, but not in the documented shape: explicit, yet worth seeing
                outcome.result, outcome.error = "errored", f"{response.status_code} undocumented non-JSON body"
                return
            if response.status_code == 200 and ("generated_text" in data or "choices" in data):
                outcome.result = "completed"
            else:
                outcome.result, outcome.error = "errored", f"{response.status_code} {error_type(data)}"
            return
        async with client.stream("POST", url + path, json=body, timeout=timeout) as response:
            outcome.status = response.status_code
            if response.status_code != 200:
                outcome.result = "errored"
                outcome.error = f"{response.status_code} {error_type(json.loads(await response.aread()))}"
                return
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                text = line[len("data: "):] if line.startswith("data: ") else line
                if text == "[DONE]":
                    outcome.result = "completed"
                    return
                event = json.loads(text)
                if "error" in event:
                    outcome.result, outcome.error = "errored", f"stream {error_type(event)}"
                    return
                outcome.tokens += 1
                if not openai and "generated_text" in event:
                    outcome.result = "completed"
                    return
                if disconnect_after is not None and outcome.tokens >= disconnect_after:
                    outcome.result = "disconnected"
                    return  # leaving the block closes the connection mid-stream
            outcome.error = "the stream ended without its final object"
    except httpx.TimeoutException:
        outcome.error = f"no answer within {timeout:g} s"
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    except (ValueError, KeyError) as exc:
        outcome.result, outcome.error = "lost", f"unreadable answer: {exc}"
    finally:
        outcome.seconds = time.monotonic() - began


async def soak(url: str, clients: int, duration: float, drain: float, max_requests: int, disconnect_share: float,
               timeout: float, seed: int, pid: int, memory: list[tuple[float, int]]) -> tuple[list[Outcome], float]:
    """Run the clients; `memory` receives (seconds, server RSS) every MEMORY_EVERY_S seconds meanwhile."""
    outcomes: list[Outcome] = []
    started = time.monotonic()
    deadline = started + duration
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)

    async def sample_memory() -> None:
        while True:
            memory.append((round(time.monotonic() - started, 1), rss_bytes(pid)))
            await asyncio.sleep(MEMORY_EVERY_S)

    async def client_loop(index: int, client: httpx.AsyncClient, model: str) -> None:
        rng = random.Random(seed * 1000 + index)
        while time.monotonic() < deadline and len(outcomes) < max_requests:
            outcome = Outcome(index, "", time.monotonic() - started)
            outcomes.append(outcome)
            await one_request(client, url, model, rng, outcome, disconnect_share, timeout)

    async with httpx.AsyncClient(limits=limits) as client:
        model = (await client.get(url + "/v1/models", timeout=30)).json()["data"][0]["id"]
        sampler = asyncio.ensure_future(sample_memory())
        tasks = [asyncio.ensure_future(client_loop(index, client, model)) for index in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=duration + drain)
        for task in pending:  # bounded: whatever is still waiting stays "lost"
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        sampler.cancel()
    return outcomes, time.monotonic() - started


def rss_bytes(pid: int) -> int:
    process = psutil.Process(pid)
    return process.memory_info().rss + sum(child.memory_info().rss for child in process.children(recursive=True))


def summarise(outcomes: list[Outcome], elapsed: float, rss_start: int, rss_end: int) -> dict:
    results = Counter(outcome.result for outcome in outcomes)
    window = 60.0
    last_start = max((o.started for o in outcomes), default=0.0) - window

    def latencies(first: bool) -> dict:
        chosen = [o.seconds for o in outcomes if o.result == "completed"
                  and (o.started < window if first else o.started >= last_start)]
        return {"count": len(chosen), "p50_s": round(percentile(chosen, 50), 3), "p99_s": round(percentile(chosen, 99), 3)}

    return {
        "sent": len(outcomes), "completed": results["completed"], "errored": results["errored"],
        "disconnected_on_purpose": results["disconnected"], "lost": results["lost"],
        "errors_by_type": dict(Counter(o.error for o in outcomes if o.result == "errored").most_common()),
        "lost_reasons": dict(Counter(o.error or "still waiting when the drain ended" for o in outcomes
                                     if o.result == "lost").most_common()),
        "kinds": dict(Counter(o.kind.replace("-disconnect", "") for o in outcomes).most_common()),
        "latency_first_minute": latencies(True), "latency_last_minute": latencies(False),
        "rss_start_mib": round(rss_start / 2**20, 1), "rss_end_mib": round(rss_end / 2**20, 1),
        "rss_growth": round((rss_end - rss_start) / rss_start, 4) if rss_start else None,
        "elapsed_s": round(elapsed, 1), "requests_per_s": round(len(outcomes) / elapsed, 2) if elapsed else None,
    }


def machine() -> dict:
    info = {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "load_average": os.getloadavg()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(path: Path, meta: dict, figures: dict, raw_name: str, server_log: str) -> None:
    ok = figures["lost"] == 0 and figures["rss_growth"] is not None and figures["rss_growth"] < GROWTH_LIMIT
    first, last = figures["latency_first_minute"], figures["latency_last_minute"]
    lines = [
        "# Reliability report",
        "",
        f"Produced by `{meta['command']}` (see benchmarks/soak.py); raw per-request log: `{raw_name}`.",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine'].get('cpu', '?')}, {meta['machine']['cpus']} CPUs, "
        f"{meta['machine']['memory_gib']} GiB; load average at start {_load(meta['load_start'])}, at end "
        f"{_load(meta['load_end'])}. The machine is shared with other work, so latencies include waiting for CPU.",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}; commit {meta['commit']}",
        f"- server: `python -m entrypoint serve` on the embedded SmolLM2-135M-Instruct (CPU), "
        f"{', '.join(f'{k}={v}' for k, v in meta['server_env'].items()) or 'defaults'}",
        f"- load: {meta['clients']} clients for {meta['duration']:g} s, each sending one request after another; "
        f"{meta['disconnect_share']:.0%} of streams disconnect on purpose after 1-4 tokens; then it waits (at most "
        f"{meta['drain']:g} s) for the requests in flight. The start RSS is taken {meta['warmup']['seconds']:g} s "
        f"into the load (allocators and caches at their working size), the end RSS after the drain",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests sent | {figures['sent']} |",
        f"| completed | {figures['completed']} |",
        f"| errored (explicit) | {figures['errored']} |",
        f"| disconnected on purpose | {figures['disconnected_on_purpose']} |",
        f"| **lost** (sent, never answered; must be 0) | **{figures['lost']}** |",
        f"| latency p50 / p99, first minute ({first['count']} completed) | {first['p50_s']} s / {first['p99_s']} s |",
        f"| latency p50 / p99, last minute ({last['count']} completed) | {last['p50_s']} s / {last['p99_s']} s |",
        f"| server RSS at start / end | {figures['rss_start_mib']} MiB / {figures['rss_end_mib']} MiB |",
        f"| RSS growth (must stay under {GROWTH_LIMIT:.0%}) | {figures['rss_growth']:.2%} |",
        f"| throughput | {figures['requests_per_s']} requests/s over {figures['elapsed_s']} s |",
        f"| server exit after SIGTERM | {meta.get('server_exit', 'n/a')} |",
        "",
        f"Verdict: {'PASS' if ok else 'FAIL'} (lost = 0 and RSS growth under {GROWTH_LIMIT:.0%}).",
        "",
        "Errors by type: " + (", ".join(f"{k}: {v}" for k, v in figures["errors_by_type"].items()) or "none"),
        "",
        "Lost, by reason: " + (", ".join(f"{k}: {v}" for k, v in figures["lost_reasons"].items()) or "none"),
        "",
        "Request mix: " + ", ".join(f"{k}: {v}" for k, v in figures["kinds"].items()),
    ]
    if meta.get("tests"):
        lines += ["", "## Fault, fuzz and security tests", "", f"`{meta['tests']['command']}`", "", "```",
                  meta["tests"]["summary"], "```"]
    if meta.get("memory"):
        lines += ["", f"Server RSS every {MEMORY_EVERY_S:g} s (seconds: MiB): "
                  + ", ".join(f"{seconds:g}: {mib}" for seconds, mib in meta["memory"])]
    if server_log:
        lines += ["", "## Server log (last lines)", "", "```", server_log.rstrip(), "```"]
    path.write_text("\n".join(lines) + "\n")


def _load(values: tuple) -> str:
    return " / ".join(f"{value:.2f}" for value in values) + " (1/5/15 min)"


FAULT_TESTS = ["tests/integration/test_server_faults.py", "tests/integration/test_embedded_shutdown.py",
               "tests/integration/test_api_fuzz.py", "tests/integration/test_s3_resolution.py",
               "tests/unit/test_configuration_fuzz.py", "tests/unit/test_model_checks.py",
               "tests/unit/test_http_reliability.py",
               "tests/integration/test_tensor_parallel.py::test_killing_a_rank_fails_the_request_and_the_server_exits_non_zero"]


def run_fault_tests() -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *FAULT_TESTS]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith("FAILED ")]  # with -rf: the test and its first error line
    summary = "\n".join(failed + (lines[-1:] or ["(no output)"]))
    return {"command": "python -m pytest -q -rf " + " ".join(FAULT_TESTS), "summary": summary,
            "returncode": result.returncode}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server on a loopback address; default: start one")
    parser.add_argument("--port", type=int, default=18080, help="port for the server started here")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds to keep sending")
    parser.add_argument("--drain", type=float, default=600.0, help="most seconds to wait for in-flight requests")
    parser.add_argument("--max-requests", type=int, default=100_000, help="stop sending after this many")
    parser.add_argument("--disconnect-share", type=float, default=0.15, help="share of streams that hang up early")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="client timeout per request (above the server's predict_timeout, 300 s by default)")
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="seconds of the same load before the start RSS is taken (allocators and caches grow to "
                             "their working size first, so growth after that is what a leak would show)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, default=REPO / "RELIABILITY.md", help="markdown report to write")
    parser.add_argument("--tests", action="store_true", help="also run the fault/fuzz/security tests into the report")
    args = parser.parse_args()

    command = "python benchmarks/soak.py " + " ".join(sys.argv[1:])
    server_env = {"OPTION_MAX_TOKENS": "1024", "OPTION_MAX_ROLLING_BATCH_SIZE": "32"}
    process = None
    if args.url:
        url = args.url.rstrip("/")
        if not ipaddress.ip_address(urlparse(url).hostname or "0.0.0.0").is_loopback:
            parser.error("--url must be a loopback address (127.0.0.1, ::1): the soak is local only")
        pid = None
    else:
        url = f"http://127.0.0.1:{args.port}"
        process = start_server(None, args.port, server_env, Path(f"/tmp/soak-server-{args.port}.log"))
        pid = process.pid
    meta: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
                  "versions": versions(), "commit": git_commit(), "command": command, "clients": args.clients,
                  "duration": args.duration, "disconnect_share": args.disconnect_share, "drain": args.drain,
                  "server_env": server_env if process else {}}
    server_log = ""
    try:
        wait_ready(url, process)
        if pid is None:  # a server started elsewhere on this machine: find it by its port
            pid = next(c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == urlparse(url).port
                       and c.status == psutil.CONN_LISTEN)
        meta["load_start"] = os.getloadavg()
        print(f"soak: {args.clients} clients for {args.duration:g} s against {url}", file=sys.stderr)
        memory: list[tuple[float, int]] = []
        outcomes, elapsed = asyncio.run(soak(url, args.clients, args.duration, args.drain, args.max_requests,
                                             args.disconnect_share, args.timeout, args.seed, pid, memory))
        time.sleep(2)  # let the server finish cancelled work before measuring memory
        rss_end = rss_bytes(pid)
        # The start figure is taken once the same load has run for --warmup seconds: allocators and caches
        # have grown to their working size by then, so growth after that is what a leak would show.
        rss_start = next((rss for seconds, rss in memory if seconds >= args.warmup), memory[-1][1])
        meta["warmup"] = {"seconds": args.warmup}
        meta["memory"] = [(seconds, round(rss / 2**20, 1)) for seconds, rss in memory]
        meta["load_end"] = os.getloadavg()
        healthy = httpx.get(url + "/ping", timeout=10).status_code == 200
    finally:
        if process is not None:
            process.terminate()
            try:
                meta["server_exit"] = f"status {process.wait(timeout=60)}"
            except subprocess.TimeoutExpired:
                process.kill()
                meta["server_exit"] = "did not exit within 60 s (killed)"
            server_log = "\n".join(Path(process.log_path).read_text().splitlines()[-12:])
    figures = summarise(outcomes, elapsed, rss_start, rss_end)
    figures["healthy_after"] = healthy
    if args.tests:
        meta["tests"] = run_fault_tests()
    raw = args.report.with_name(args.report.stem + "-raw.jsonl.gz")
    with gzip.open(raw, "wt") as file:
        file.write(json.dumps({"meta": meta, "figures": figures}, default=str) + "\n")
        for outcome in outcomes:
            file.write(json.dumps(asdict(outcome)) + "\n")
    write_report(args.report, meta, figures, raw.name, server_log)
    print(json.dumps(figures, indent=2))
    passed = figures["lost"] == 0 and figures["rss_growth"] < GROWTH_LIMIT and healthy
    return 0 if passed and (not args.tests or meta["tests"]["returncode"] == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
