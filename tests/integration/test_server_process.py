"""The real server process (`entrypoint.launch.serve` on the fake engine): start-up, load, exit codes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]



def start(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tests.support.fake_server", "--port", str(port), *args],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return process, f"http://127.0.0.1:{port}"


def wait_listening(process: subprocess.Popen, url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url + "/ping", timeout=1)
            return
        except httpx.TransportError:
            assert process.poll() is None, f"server exited early: {process.communicate()[1]}"
            assert time.monotonic() < deadline, "server did not start listening"
            time.sleep(0.05)


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for process in started:  # never leave a server behind, whatever the test did
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_ping_answers_503_while_loading_then_200_and_sigterm_exits_0(processes):
    process, url = start("--load-seconds", "2", "--step-delay", "0.01")
    processes.append(process)
    wait_listening(process, url)

    started = time.monotonic()
    loading = httpx.get(url + "/ping", timeout=5)
    assert time.monotonic() - started < 1  # answered while the load runs, not after it
    assert loading.status_code == 503 and loading.json()["status"] == "loading"
    assert "loading fake weights" in loading.json()["progress"]

    deadline = time.monotonic() + 10
    while httpx.get(url + "/ping", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "model never became ready"
        time.sleep(0.05)
    response = httpx.post(url + "/invocations", json={"inputs": "hi", "parameters": {"max_new_tokens": 4}}, timeout=5)
    assert response.json() == {"generated_text": "abcd"}

    # SIGTERM while a stream is running: the stream still completes (graceful shutdown), then exit 0.
    lines: list[str] = []
    streaming = threading.Event()

    def stream() -> None:
        body = {"inputs": "hi", "stream": True, "parameters": {"max_new_tokens": 60}}
        with httpx.stream("POST", url + "/invocations", json=body, timeout=15) as response:
            for line in response.iter_lines():
                lines.append(line)
                streaming.set()

    client = threading.Thread(target=stream)
    client.start()
    assert streaming.wait(10)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=15)
    client.join(5)
    assert process.returncode == 0, stderr
    assert len(lines) == 60 and '"generated_text"' in lines[-1]
    assert "request_id=" in stderr
    # One start-up summary, after the warm-up phase; no other "ready" line.
    assert "loading: warming up: one 2-token generation" in stderr
    assert [line.split(" INFO ", 1)[1] for line in stderr.splitlines() if " ready in " in line] == [
        f"lmi.launch: ready in {line_value(stderr, 'ready in ')} s: serving fake-model on {url}"]


def line_value(text: str, after: str) -> str:
    """The word after `after` in `text` (the first occurrence)."""
    return text.split(after, 1)[1].split()[0]


def test_an_engine_that_cannot_generate_fails_at_start_up_not_on_the_first_request(processes):
    process, _ = start("--crash-at-step", "1")
    processes.append(process)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    failure = next(line for line in stderr.splitlines() if "could not be loaded, exiting" in line)
    assert "the warm-up generation failed" in failure and "fake engine crashed at step 1" in failure
    assert " ready in " not in stderr


def test_failing_load_exits_non_zero_with_the_reason(processes):
    process, _ = start("--load-seconds", "0.2", "--fail-load", "no weights at /opt/ml/model")
    processes.append(process)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode != 0
    assert "no weights at /opt/ml/model" in stderr


def test_an_engine_crash_fails_the_request_then_the_process_exits_non_zero(processes):
    process, url = start("--step-delay", "0.02", "--crash-at-step", "3")
    processes.append(process)
    wait_listening(process, url)
    deadline = time.monotonic() + 15
    while httpx.get(url + "/ping").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    response = httpx.post(url + "/invocations", json={"inputs": "hi", "parameters": {"max_new_tokens": 10}})
    assert response.status_code == 424 and "crashed" in response.json()["message"]
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 1
    assert "the engine failed, exiting" in stderr


def test_load_timeout_exits_non_zero(processes):
    process, _ = start("--load-seconds", "30", "--model-loading-timeout", "0.5")
    processes.append(process)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode != 0
    assert "model_loading_timeout=0.5 s" in stderr


def test_a_user_error_while_loading_is_re_raised_to_the_caller(processes):
    process, _ = start("--fail-load", "model_id=foo/bar is not in the local cache", "--user-error")
    processes.append(process)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 2
    assert "error: model_id=foo/bar is not in the local cache" in stderr and "Traceback" not in stderr
