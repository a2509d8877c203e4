"""benchmarks/engine_overhead.py: its stand-in device behaves like a GPU stream, and a short run (in-process
and through the real HTTP server) delivers every token and prints the promised JSON line. No assertion is
made on the speed itself: CI is a loaded 2-core machine."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "engine_overhead.py"
SEQUENCES, DEVICE_MS, STEPS = 4, 5, 20


def load_benchmark():
    """The benchmark script as a module (benchmarks/ is not a package)."""
    if "engine_overhead" not in sys.modules:
        spec = importlib.util.spec_from_file_location("engine_overhead", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
        spec.loader.exec_module(module)
    return sys.modules["engine_overhead"]


def test_a_pass_returns_at_once_queues_behind_the_last_and_a_host_read_waits_for_it():
    bench = load_benchmark()
    stream = bench.StandInStream(0.5)
    before = time.perf_counter()
    first = stream.launch(lambda: torch.ones(2, 3))
    second = stream.launch(lambda: torch.zeros(2, 3))
    assert time.perf_counter() < first.ready_at  # launched, not waited for
    assert first.ready_at >= before + 0.5 and second.ready_at == pytest.approx(first.ready_at + 0.5)
    summed = (first * 2).sum(dim=-1)  # queued behind the pass: no wait, ready when its input is
    assert isinstance(summed, bench.DeviceTensor) and summed.ready_at == first.ready_at
    assert time.perf_counter() < first.ready_at
    assert summed.tolist() == [6.0, 6.0]
    assert time.perf_counter() >= first.ready_at  # the host read waited for the device
    assert type(second.cpu()) is torch.Tensor and time.perf_counter() >= second.ready_at


def test_a_pass_with_a_launch_cost_holds_the_host_and_ends_no_sooner_than_its_last_kernel():
    bench = load_benchmark()
    stream = bench.StandInStream(0.002, launch_seconds=0.05)  # launch-bound: the device waits for the host
    before = time.perf_counter()
    result = stream.launch(lambda: torch.ones(1))
    after = time.perf_counter()
    assert after - before >= 0.05  # the launch held the host
    # not ready before its last kernel, launched at the launch's end, has run (not at start + 2 ms)
    assert before + 0.05 + bench.StandInStream.TAIL_SECONDS <= result.ready_at <= after + bench.StandInStream.TAIL_SECONDS
    device_bound = bench.StandInStream(0.2, launch_seconds=0.01)
    start = time.perf_counter()
    ready = device_bound.launch(lambda: torch.ones(1)).ready_at
    assert start + 0.2 <= ready <= start + 0.2 + 0.05  # the device started at the launch's first kernel


def test_the_stand_in_runner_decodes_the_successor_of_each_last_token():
    bench = load_benchmark()
    runner = bench.StandInRunner(device_ms=1)
    logits = runner.ragged_forward([0, 1], [[1, 2, 3], [254]])
    assert logits.argmax(dim=-1).tolist() == [bench.successor(3), bench.successor(254)] == [4, 1]
    tokenizer = bench.word_tokenizer()
    assert tokenizer.encode(bench.PROMPT) == [1, 2, 3, 4] and tokenizer.decode([4, 5]) == "w4 w5"


def run_benchmark(*extra: str) -> dict:
    command = [sys.executable, str(SCRIPT), "--sequences", str(SEQUENCES), "--device-ms", str(DEVICE_MS),
               "--steps", str(STEPS), "--json", "--timeout", "300", *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_bare_loop_generates_every_token_at_the_device_speed():
    line = run_benchmark("--bare", "--launch-ms", "1")
    assert line["mode"] == "bare" and line["launch_ms"] == 1 and line["errors"] == 0
    assert line["tokens"] == line["expected_tokens"] == SEQUENCES * STEPS
    assert line["device_passes"] == STEPS + 1  # one prefill, then a decode pass per token
    assert line["mean_step_ms"] >= DEVICE_MS  # a pass never takes less than the device's time


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["in-process", "http"])
def test_a_short_run_delivers_every_token_and_prints_its_numbers(mode):
    line = run_benchmark(*(["--http"] if mode == "http" else []))
    assert line["mode"] == mode and line["benchmark"] == "engine_overhead"
    assert (line["sequences"], line["device_ms"], line["steps"]) == (SEQUENCES, DEVICE_MS, STEPS)
    assert line["errors"] == 0 and line["tokens"] == line["expected_tokens"] == SEQUENCES * STEPS
    assert line["ideal_tok_s"] == pytest.approx(SEQUENCES / (DEVICE_MS / 1000))
    assert line["tok_s"] > 0 and line["efficiency"] == pytest.approx(line["tok_s"] / line["ideal_tok_s"], rel=1e-3)
    assert line["mean_step_ms"] > 0 and line["window_tokens"] == [2, 18]
    assert line["machine"]["cpu_count"] >= 1 and {"python", "torch"} <= set(line["versions"])
    assert line["command"].startswith("python benchmarks/engine_overhead.py") and line["date"].startswith("20")
    if mode == "http":
        assert line["server_exit_status"] == 0  # SIGTERM: a graceful shutdown
    else:
        assert line["engine_steps"] >= STEPS
