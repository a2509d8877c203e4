"""The engine's host overhead, measured on a CPU: the real engine against a stand-in device of known speed.

    python benchmarks/engine_overhead.py --sequences 64 --device-ms 10 --steps 200 [--http] --json \
        [--out benchmarks/results/some.jsonl]

What runs: the real `RollingBatchEngine` (handlers/rolling_batch.py) with its sampler, detokenizer and stop
matching, driven by the real `EngineLoop` (handlers/engine_loop.py) on its own thread, warmed up as the server
warms it up (entrypoint/warm_up.py). Only the model is replaced, by `StandInRunner`, a ragged runner (as
FastGen's) over `StandInStream`, a device that takes exactly `--device-ms` per forward pass:

  - a forward pass returns at once (as a CUDA launch does) with a `DeviceTensor` of logits whose `ready_at`
    is when the device finishes it; the device runs one pass at a time, so a pass launched while the
    previous one is still running starts when that one ends (one CUDA stream);
  - torch operations on a `DeviceTensor` do not wait: their results are `DeviceTensor`s ready when their
    inputs are (work queued behind the pass on the same stream; on the CPU it is computed at once, which
    costs microseconds for [rows, 256] logits);
  - reading one on the host (`tolist`, `item`, `cpu`, `numpy`, `bool`/`int`/`float`) sleeps until it is
    ready (asleep, then polling for the last 0.3 ms, as a CUDA synchronisation spins), letting other
    threads take the GIL meanwhile.
So today's engine, which samples and reads the token ids back right after each forward pass, waits the
whole `--device-ms` in every step and adds its host work after it; an engine that launches pass n+1 before
reading pass n's ids hides its host work behind the device, and this benchmark shows it. A wait that
still wakes up late (a loaded machine) counts as overhead, as a late host reaction to a finished GPU step
would.

The logits row of a sequence is peaked on the successor of its last token (`successor`), so greedy decoding
is deterministic and never picks the end-of-sequence token; the tokenizer is a 256-word WordLevel vocabulary
("w1".."w254") built in code, so detokenization does real, cheap work. Every request is greedy with
`ignore_eos`, a 4-token prompt and `max_new_tokens` = `--steps`, and all `--sequences` are submitted at once.

Consumers: in-process, one asyncio task per request reads its `EngineLoop.stream()` on the main thread's
event loop, as the HTTP handlers do. With `--http`, the real server (`entrypoint.launch.serve`, the app of
entrypoint/http on uvicorn, with this engine) runs in a subprocess, and this process runs one streaming
HTTP/1.1 client per request (POST /invocations, jsonlines) on asyncio with plain sockets, the lightest client
that reads every chunk, because on a 2-core machine the clients compete with the server for the CPU.

The number: `tok_s` is measured over the middle of the run, where every request is admitted and decoding:
with a = max(1, steps // 10) and b = steps - a, and T(i) the time the slowest consumer held its i-th token,
tok_s = sequences * (b - a) / (T(b) - T(a)). Counting between two "every consumer has token i" moments
excludes admission and prefill at the start and the staggered ends, and it is exact whatever the size of
the bursts in which tokens arrive (one per step per consumer), which a count of tokens inside a fixed time
window is not. `ideal_tok_s` = sequences / device-ms (the device never idle, the host free), `efficiency`
= tok_s / ideal_tok_s, and `mean_step_ms` - `device_ms` is the host's time per step on the critical path.
`whole_run_tok_s` (every token over the time from submission to the last token) is reported alongside.

What the stand-in itself costs the host: `DeviceTensor`'s `__torch_function__` wraps each of the ~10 torch
operations of a step in a few Python lines; measured on the sampler alone, ~50 us a step at 1 sequence and
~50-170 us at 64 (0.5-1.7% of a 10 ms step), about what launching those kernels costs on a GPU. The
polling before a result is ready keeps one core busy for up to 0.3 ms a step. torch runs on one thread
here: on a GPU these small operations would not use the host's cores at all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from handlers.engine import GenerationRequest, SamplingParams  # noqa: E402
from handlers.kv_blocks import BlockAllocator, KVBudget  # noqa: E402
from handlers.rolling_batch import RollingBatchEngine  # noqa: E402
from handlers.runner import Runner  # noqa: E402

VOCAB = 256
EOS_ID = 0
UNK_ID = VOCAB - 1
PROMPT = "w1 w2 w3 w4"
PROMPT_TOKENS = 4
BLOCK_SIZE = 64
MODEL_NAME = "engine-overhead-stand-in"
#: a host read of a device result sleeps until this long before the result is ready, then polls
SPIN_SECONDS = 0.0003


# ---- the stand-in device ------------------------------------------------------------------------------
def _sleep_until(deadline: float) -> None:
    """Block until `deadline`: asleep (the GIL released) until SPIN_SECONDS before it, then polling, so the
    wake-up is as prompt as a CUDA synchronisation's (which spins) rather than late by a sleep's overshoot
    (~0.1 ms on an idle machine: 1% of a 10 ms step)."""
    left = deadline - time.perf_counter()
    if left > SPIN_SECONDS:
        time.sleep(left - SPIN_SECONDS)
    while time.perf_counter() < deadline:
        time.sleep(0)  # lets other threads take the GIL


def _latest_ready(value: Any) -> float:
    """The latest `ready_at` among the DeviceTensors in `value` (nested in lists, tuples and dicts)."""
    if isinstance(value, DeviceTensor):
        return value.__dict__.get("ready_at", 0.0)
    if isinstance(value, (list, tuple)):
        return max((_latest_ready(item) for item in value), default=0.0)
    if isinstance(value, dict):
        return max((_latest_ready(item) for item in value.values()), default=0.0)
    return 0.0


def _on_device(value: Any, ready_at: float) -> Any:
    """`value` with every tensor in it a DeviceTensor ready at `ready_at`."""
    if isinstance(value, torch.Tensor):
        tensor = value if isinstance(value, DeviceTensor) else value.as_subclass(DeviceTensor)
        tensor.ready_at = ready_at
        return tensor
    if isinstance(value, (list, tuple)) and any(isinstance(item, torch.Tensor) for item in value):
        return type(value)(_on_device(item, ready_at) for item in value)
    return value


class DeviceTensor(torch.Tensor):
    """A tensor "on the stand-in device": computed already, but not readable by the host before `ready_at`
    (a `time.perf_counter()` value). See the module docstring."""

    ready_at: float

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        ready_at = max(_latest_ready(args), _latest_ready(kwargs))
        reads = func in HOST_READS
        if reads:
            _sleep_until(ready_at)
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        if reads:
            return result.as_subclass(torch.Tensor) if isinstance(result, torch.Tensor) else result
        return _on_device(result, ready_at)


#: the operations through which the host reads a device tensor (each a synchronisation on a GPU)
HOST_READS = frozenset({
    torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
    torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.__repr__,
    torch.Tensor.__format__,
})


_KERNEL_ARGUMENT = torch.zeros(8)


def _hold_the_host(seconds: float) -> None:
    """The host's work of launching a pass for `seconds`: Python, and one small torch operation after another
    (as DeepSpeed's put() launches its kernels), each of which releases the GIL and takes it back."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        torch.add(_KERNEL_ARGUMENT, 1.0)


class StandInStream:
    """One device stream whose every pass takes `seconds` on the device, after `launch_seconds` of the host's
    time to launch it: passes run one after the other."""

    #: the device time of the last kernel of a pass, which can start only once the launch has ended
    TAIL_SECONDS = 0.0005

    def __init__(self, seconds: float, launch_seconds: float = 0.0):
        self.seconds = seconds
        self.launch_seconds = launch_seconds
        self.free_at = 0.0  # when the last launched pass ends
        self.passes = 0

    def launch(self, compute: Callable[[], torch.Tensor]) -> DeviceTensor:
        """Queue a pass computing `compute()` and return once it is launched; its result is ready when the
        pass ends: `seconds` after it starts, and not before its last kernel, launched last, has run."""
        start = max(time.perf_counter(), self.free_at)
        if self.launch_seconds:
            _hold_the_host(self.launch_seconds)
            self.free_at = max(start + self.seconds, time.perf_counter() + min(self.TAIL_SECONDS, self.seconds))
        else:
            self.free_at = start + self.seconds
        self.passes += 1
        return _on_device(compute(), self.free_at)


def successor(token: int) -> int:
    """The token greedy decoding picks after `token`: the words w1..w254 in a cycle (never EOS or UNK)."""
    return token % (VOCAB - 2) + 1


def successor_logits() -> torch.Tensor:
    """[VOCAB, VOCAB]: row t is the logits of a sequence whose last token is t, peaked on successor(t)."""
    table = torch.zeros((VOCAB, VOCAB))
    table[torch.arange(VOCAB), torch.tensor([successor(t) for t in range(VOCAB)])] = 10.0
    return table


class StandInRunner(Runner):
    """A `Runner` whose passes run on a `StandInStream`; ragged (one pass for decodes and prefill chunks, as
    FastGen) unless `ragged=False` (a decode pass and a prefill pass per step, as AutoTP)."""

    #: its passes return before the stand-in device has computed them, as CUDA launches do
    asynchronous = True

    def __init__(self, device_ms: float, ragged: bool = True, launch_ms: float = 0.0):
        self.device = torch.device("cpu")
        self.cache = None
        self.ragged = ragged
        self.stream = StandInStream(device_ms / 1000.0, launch_ms / 1000.0)
        self._table = successor_logits()

    def assign(self, sequence: int, blocks: list[int]) -> None:
        pass  # the stand-in keeps no per-sequence state

    def ragged_forward(self, sequences: list[int], tokens: list[list[int]]) -> DeviceTensor:
        last = torch.tensor([ids[-1] for ids in tokens])
        return self.stream.launch(lambda: self._table.index_select(0, last))

    def prefill(self, sequences: list[int], chunks: list[list[int]], starts: list[int],
                all_logits: bool = False) -> DeviceTensor:
        if all_logits:
            raise NotImplementedError("the stand-in returns last-token logits only (no prompt log-probabilities)")
        return self.ragged_forward(sequences, chunks)

    def decode(self, sequences: list[int], token_ids: list[int], positions: list[int]) -> DeviceTensor:
        return self.ragged_forward(sequences, [[token] for token in token_ids])


# ---- the engine ---------------------------------------------------------------------------------------
def word_tokenizer() -> Any:
    """A WordLevel tokenizer over "</s>" (EOS, id 0), "w1".."w254" and "[UNK]", built without files."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": EOS_ID} | {f"w{i}": i for i in range(1, UNK_ID)} | {"[UNK]": UNK_ID}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")


def build_engine(sequences: int, steps: int, device_ms: float, ragged: bool = True,
                 overlap: bool = True, launch_ms: float = 0.0) -> RollingBatchEngine:
    """The engine as the FastGen loader builds it (handlers/fastgen_engine.py), over the stand-in runner,
    with KV blocks for every request at once; `overlap=False` runs the steps in the order a CPU runner gets
    (each pass read back and processed before the next is launched), the baseline of the overlap."""
    max_total = PROMPT_TOKENS + steps
    per_request = -(-max_total // BLOCK_SIZE)
    budget = KVBudget(block_size=BLOCK_SIZE, num_blocks=per_request * sequences + 1, bytes_per_token=1,
                      basis="stand-in: every request fits")
    return RollingBatchEngine(StandInRunner(device_ms, ragged, launch_ms), word_tokenizer(), allocator=BlockAllocator(budget),
                              max_batch=sequences, max_prefill_tokens=4096, max_total_tokens=max_total,
                              eos_token_ids=[EOS_ID], vocab_size=VOCAB, name="stand-in", overlap=overlap)


def generation_requests(sequences: int, steps: int, prompt_ids: list[int]) -> list[GenerationRequest]:
    params = SamplingParams(max_new_tokens=steps, ignore_eos=True)
    return [GenerationRequest(request_id=f"bench-{i}", prompt=PROMPT, prompt_token_ids=list(prompt_ids), params=params)
            for i in range(sequences)]


# ---- measurement --------------------------------------------------------------------------------------
@dataclass
class Run:
    """Token arrival times (time.perf_counter) per consumer, and what else the run observed."""

    started: float
    arrivals: list[list[float]]
    errors: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def steady_window(steps: int) -> tuple[int, int]:
    """Token counts a < b between which every request is decoding (see the module docstring)."""
    edge = max(1, steps // 10)
    return edge, steps - edge


def measure(run: Run, sequences: int, steps: int, device_ms: float) -> dict[str, Any]:
    """The result's numbers from the arrival times; tok_s is None when a consumer fell short of token b."""
    tokens = sum(len(times) for times in run.arrivals)
    a, b = steady_window(steps)
    ideal = sequences / (device_ms / 1000.0)
    result: dict[str, Any] = {"tokens": tokens, "expected_tokens": sequences * steps, "errors": len(run.errors),
                              "ideal_tok_s": round(ideal, 1), "window_tokens": [a, b]}
    last = max((times[-1] for times in run.arrivals if times), default=run.started)
    result["whole_run_tok_s"] = round(tokens / (last - run.started), 1) if last > run.started else None
    if all(len(times) >= b for times in run.arrivals):
        t_a = max(times[a - 1] for times in run.arrivals)
        t_b = max(times[b - 1] for times in run.arrivals)
        tok_s = sequences * (b - a) / (t_b - t_a)
        step_ms = (t_b - t_a) / (b - a) * 1000.0
        result.update(tok_s=round(tok_s, 1), efficiency=round(tok_s / ideal, 4), mean_step_ms=round(step_ms, 3),
                      host_ms_per_step=round(step_ms - device_ms, 3))
    else:
        result.update(tok_s=None, efficiency=None, mean_step_ms=None, host_ms_per_step=None)
    return result


# ---- in-process consumers -----------------------------------------------------------------------------
async def consume(stream: Any, arrivals: list[float], errors: list[str]) -> None:
    """Read one request's outputs as the HTTP handlers do, noting when each token arrives."""
    async for output in stream:
        now = time.perf_counter()
        arrivals.extend([now] * len(output.tokens))
        if output.finished and output.error:
            errors.append(f"{output.request_id}: {output.error}")


async def consume_all(loop: Any, requests: list[GenerationRequest], run: Run) -> None:
    streams = [loop.stream(request) for request in requests]  # one submission per request, as HTTP does
    await asyncio.gather(*(consume(stream, times, run.errors) for stream, times in zip(streams, run.arrivals)))


def run_in_process(args: argparse.Namespace) -> Run:
    from entrypoint.warm_up import warm_up
    from handlers.engine_loop import EngineLoop

    engine = build_engine(args.sequences, args.steps, args.device_ms, ragged=not args.split_passes,
                          overlap=not args.sequential, launch_ms=args.launch_ms)
    loop = EngineLoop(engine, job_queue_size=args.sequences + 1).start()
    try:
        warm_up(loop, engine.tokenizer, timeout=args.timeout)
        prompt_ids = list(engine.tokenizer.encode(PROMPT))
        requests = generation_requests(args.sequences, args.steps, prompt_ids)
        steps_before = loop.stats().steps
        run = Run(time.perf_counter(), [[] for _ in requests])
        asyncio.run(asyncio.wait_for(consume_all(loop, requests, run), args.timeout))
        run.extra["engine_steps"] = loop.stats().steps - steps_before
        run.extra["device_passes"] = engine.runner.stream.passes
    finally:
        loop.stop()
    return run


# ---- the bare loop --------------------------------------------------------------------------------------
def run_bare(args: argparse.Namespace) -> Run:
    """The loop an engine is compared with (as `benchmarks/fastgen_loop.py` is on the GPU): the stand-in
    runner driven directly, every sequence prefilled in one pass, then one decode pass per step, each token
    the argmax read back before the next pass, nothing else (no scheduler, no sampler, no text, no clients)."""
    runner = StandInRunner(args.device_ms, launch_ms=args.launch_ms)
    prompt = [successor(t) for t in range(PROMPT_TOKENS)]
    sequences = list(range(args.sequences))
    run = Run(time.perf_counter(), [[] for _ in sequences])
    logits = runner.prefill(sequences, [prompt] * len(sequences), [0] * len(sequences))
    for _ in range(args.steps):
        tokens = logits.argmax(dim=-1).tolist()
        now = time.perf_counter()
        for times in run.arrivals:
            times.append(now)
        logits = runner.decode(sequences, tokens, [0] * len(sequences))
    run.extra["device_passes"] = runner.stream.passes
    return run


# ---- the HTTP server (a subprocess) and its clients ---------------------------------------------------
def serve(args: argparse.Namespace) -> int:
    """The subprocess: the real server (entrypoint.launch.serve) on the stand-in engine."""
    from entrypoint.configuration import Configuration
    from entrypoint.launch import serve as serve_http
    from handlers.serving_properties import ServingProperties

    properties = ServingProperties(port=args.serve_port, model_id=MODEL_NAME, max_rolling_batch_size=args.sequences,
                                   job_queue_size=max(1000, args.sequences + 1), max_tokens=PROMPT_TOKENS + args.steps)
    configuration = Configuration(properties=properties, sources={}, model_dir=Path("/nonexistent/model"))

    def factory(configuration: Configuration, progress: Callable[[str], None]) -> RollingBatchEngine:
        return build_engine(args.sequences, args.steps, args.device_ms, ragged=not args.split_passes,
                            overlap=not args.sequential, launch_ms=args.launch_ms)

    return serve_http(configuration, engine_factory=factory, host="127.0.0.1")


def start_server(args: argparse.Namespace, port: int, log: Any) -> subprocess.Popen:
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-port", str(port),
               "--sequences", str(args.sequences), "--device-ms", str(args.device_ms), "--steps", str(args.steps),
               "--launch-ms", str(args.launch_ms)]
    if args.split_passes:
        command.append("--split-passes")
    if args.sequential:
        command.append("--sequential")
    return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float, log_text: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log_text()}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready within {timeout:g} s:\n{log_text()}")


def request_bytes(port: int, steps: int) -> bytes:
    body = json.dumps({"inputs": PROMPT, "stream": True,
                       "parameters": {"max_new_tokens": steps, "ignore_eos": True, "do_sample": False}}).encode()
    head = (f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: application/jsonlines\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


async def read_chunks(reader: asyncio.StreamReader) -> Any:
    """The chunks of a chunked HTTP/1.1 body, as they arrive."""
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        yield (await reader.readexactly(size + 2))[:-2]


async def http_stream(port: int, payload: bytes, arrivals: list[float], errors: list[str]) -> None:
    """One streaming client: each jsonlines line is one token; the last line must carry generated_text."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        status = await reader.readline()
        headers = []
        while (line := await reader.readline()) not in (b"\r\n", b""):
            headers.append(line.lower())
        if b" 200 " not in status or b"transfer-encoding: chunked\r\n" not in headers:
            errors.append(f"{status.decode().strip()}: {(await reader.read()).decode(errors='replace')[:300]}")
            return
        pending, last_line = b"", b""
        async for chunk in read_chunks(reader):
            now = time.perf_counter()
            lines = (pending + chunk).split(b"\n")
            pending = lines[-1]
            if len(lines) > 1:
                arrivals.extend([now] * (len(lines) - 1))
                last_line = lines[-2]
        last = json.loads(last_line) if last_line else {}
        if "generated_text" not in last or "error" in last:
            errors.append(f"the stream ended with {last_line[:300]!r}")
    finally:
        writer.close()


async def http_clients(port: int, steps: int, run: Run) -> None:
    payload = request_bytes(port, steps)
    await asyncio.gather(*(http_stream(port, payload, times, run.errors) for times in run.arrivals))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_http(args: argparse.Namespace) -> Run:
    port = free_port()
    with tempfile.NamedTemporaryFile("w+", prefix="engine-overhead-server-", suffix=".log") as log:
        def log_text() -> str:
            log.flush()
            return Path(log.name).read_text()[-4000:]

        process = start_server(args, port, log)
        try:
            wait_until_ready(f"http://127.0.0.1:{port}", process, args.timeout, log_text)
            run = Run(time.perf_counter(), [[] for _ in range(args.sequences)])
            asyncio.run(asyncio.wait_for(http_clients(port, args.steps, run), args.timeout))
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        if run.errors:
            run.errors.append(f"server log:\n{log_text()}")
    run.extra["server_exit_status"] = process.returncode
    return run


# ---- the result line ----------------------------------------------------------------------------------
def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "fastapi", "uvicorn", "deepspeed"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def machine(load: list[float]) -> dict[str, Any]:
    """This machine, and its load average (1, 5, 15 min) when the run started: CI machines are shared."""
    return {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
            "load_average_at_start": load}


def result_line(args: argparse.Namespace, run: Run, load: list[float]) -> dict[str, Any]:
    line: dict[str, Any] = {
        "benchmark": "engine_overhead", "mode": "bare" if args.bare else "http" if args.http else "in-process",
        "sequences": args.sequences, "device_ms": args.device_ms, "launch_ms": args.launch_ms, "steps": args.steps,
        "prompt_tokens": PROMPT_TOKENS, "passes": "split" if args.split_passes else "ragged",
        "step_order": "sequential" if args.sequential else "overlapped",
    }
    line.update(measure(run, args.sequences, args.steps, args.device_ms))
    line.update(run.extra)
    if run.errors:
        line["error_messages"] = run.errors[:5]
    line.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                machine=machine(load), versions=package_versions(),
                command="python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]))
    return line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, required=True, help="concurrent requests (N)")
    parser.add_argument("--device-ms", type=float, required=True, help="the stand-in device's time per pass (D)")
    parser.add_argument("--steps", type=int, required=True, help="tokens generated per request (S, at least 4)")
    parser.add_argument("--http", action="store_true", help="through the real HTTP server, clients in this process")
    parser.add_argument("--launch-ms", type=float, default=0.0,
                        help="the host's time to launch a pass, holding the GIL (DeepSpeed's put() is Python): the "
                             "device starts at once and cannot end before the launch has; default 0")
    parser.add_argument("--bare", action="store_true",
                        help="no engine: the stand-in runner in a bare loop (prefill, then argmax and decode), the "
                             "baseline the engine is compared with on the GPU")
    parser.add_argument("--split-passes", action="store_true",
                        help="a decode pass and a prefill pass per step (AutoTP's runner) instead of one ragged pass")
    parser.add_argument("--sequential", action="store_true",
                        help="read back and process each pass before launching the next (the engine's order on a "
                             "CPU runner) instead of overlapping them: the baseline")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    parser.add_argument("--out", type=Path, help="also append the JSON line to this file")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the run (and server start) may take")
    parser.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)  # internal: be the --http server
    args = parser.parse_args(argv)
    if args.steps < 4 or args.sequences < 1 or args.device_ms <= 0 or args.launch_ms < 0:
        parser.error("need --steps >= 4, --sequences >= 1, --device-ms > 0 and --launch-ms >= 0")
    if args.bare and args.http:
        parser.error("--bare runs no server: it cannot be combined with --http")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.serve_port is not None:
        return serve(args)
    load = [round(x, 2) for x in os.getloadavg()]
    run = run_bare(args) if args.bare else run_http(args) if args.http else run_in_process(args)
    line = result_line(args, run, load)
    text = json.dumps(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a", encoding="utf-8") as out:
            out.write(text + "\n")
    if args.json:
        print(text)
    else:
        for key, value in line.items():
            print(f"{key:<20} {value}")
    complete = not run.errors and line["tokens"] == line["expected_tokens"]
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
