"""What a user reads at start-up: the summary's layout, and third-party lines that say nothing to a user
kept out of the log (DeepSpeed's CPU-accelerator warning, checked on the real DeepSpeed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from entrypoint.startup_report import StartupTimeline, render_summary

REPO = Path(__file__).resolve().parents[2]


def test_summary_has_one_aligned_line_per_fact_with_readable_sizes() -> None:
    text = render_summary("ready in 9.0 s: serving m on http://0.0.0.0:8080",
                          {"engine": "autotp", "weights_bytes_this_rank": 538060032, "kv_bytes_per_token": 46080,
                           "tensor_parallel_degree": 1, "rolling_batch": True, "load_seconds": 2.35})
    assert text.splitlines() == [
        "ready in 9.0 s: serving m on http://0.0.0.0:8080",
        "  engine                   autotp",
        "  weights_bytes_this_rank  513.1 MiB",
        "  kv_bytes_per_token       45.0 KiB",
        "  tensor_parallel_degree   1",
        "  rolling_batch            yes",
        "  load_seconds             2.35",
    ]


def test_a_long_value_wraps_under_itself() -> None:
    reason = " ".join(["because"] * 40)
    lines = render_summary("ready", {"reason": reason}).splitlines()[1:]
    assert len(lines) > 1 and all(len(line) <= 110 for line in lines)
    assert lines[0].startswith("  reason  because") and all(line.startswith(" " * 10 + "because") for line in lines[1:])
    assert " ".join(" ".join(lines).split()) == f"reason {reason}"  # nothing lost


def test_phases_that_took_the_time_are_listed_in_order() -> None:
    now = [100.0]
    timeline = StartupTimeline(clock=lambda: now[0])
    for phase, seconds in (("resolving the model", 0.1), ("converting the model " + "into a directory " * 10, 30.0), ("loading weights", 2.5)):
        timeline.enter(phase)
        now[0] += seconds
    assert [round(seconds, 1) for _, seconds in timeline.durations()] == [0.1, 30.0, 2.5]
    assert round(timeline.elapsed(), 1) == 32.6
    timing = render_summary("ready", {"engine": "autotp"}, timeline).splitlines()[2:]
    assert len(timing) == 2  # the 0.1 s phase is not worth a line
    assert timing[0].startswith("  time     30.0 s  converting the model into") and timing[0].endswith(" ...")
    assert len(timing[0]) <= 110
    assert timing[1] == " " * 10 + "  2.5 s  loading weights"


def test_deepspeed_cpu_accelerator_warning_is_not_logged() -> None:
    """On a machine without CUDA, DeepSpeed logs "Setting accelerator to CPU ..." (on stdout) when its
    accelerator is first asked for; the server's logging setup drops it."""
    program = ("from entrypoint.cli import configure_logging; configure_logging(); "
               "from deepspeed.accelerator import get_accelerator; print('device', get_accelerator().device_name())")
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "device cpu" in result.stdout  # the case in which DeepSpeed warns
    assert "Setting accelerator to CPU" not in result.stdout + result.stderr
