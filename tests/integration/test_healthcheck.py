"""`python -m entrypoint.healthcheck`, the image's HEALTHCHECK command, against the real server process (on
the fake engine: the probe's job is HTTP, not generation): unhealthy while the model loads, healthy once
ready, unhealthy when nothing listens; the port comes from the server's own configuration rules."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def probe(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items()
               if not key.startswith("OPTION_") and key != "SAGEMAKER_BIND_TO_PORT"}
    return subprocess.run([sys.executable, "-m", "entrypoint.healthcheck", *args], cwd=ROOT,
                          env={**environ, **env}, capture_output=True, text=True, timeout=60)


@pytest.fixture
def server():
    """The real server on a free port, whose fake model takes 3 s to load."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tests.support.fake_server", "--port", str(port),
                                "--load-seconds", "3"], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        yield port
    finally:
        process.kill()
        process.wait(10)


def test_unhealthy_while_loading_then_healthy(server, tmp_path):
    empty_model_dir = str(tmp_path)
    deadline = time.monotonic() + 120
    saw_loading = None
    while time.monotonic() < deadline:
        result = probe("--model-dir", empty_model_dir, SAGEMAKER_BIND_TO_PORT=str(server))
        if result.returncode == 0:
            break
        if "HTTP 503" in result.stderr:
            saw_loading = result.stderr
        time.sleep(0.2)
    assert result.returncode == 0, result.stderr
    assert "healthy" in result.stdout
    assert saw_loading and "loading" in saw_loading  # 503 with the server's reason, while the load ran


def test_port_from_serving_properties(server, tmp_path):
    (tmp_path / "serving.properties").write_text(f"option.port={server}\n")
    deadline = time.monotonic() + 120
    while (result := probe("--model-dir", str(tmp_path))).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert result.returncode == 0, result.stderr


def test_unhealthy_when_nothing_listens(tmp_path):
    result = probe("--model-dir", str(tmp_path), SAGEMAKER_BIND_TO_PORT=str(free_port()))
    assert result.returncode == 1
    assert "unhealthy" in result.stderr and "/ping" in result.stderr
