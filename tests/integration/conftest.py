"""The real server (`python -m entrypoint serve`, a subprocess) on the embedded SmolLM2-135M-Instruct, started
once per session and shared by the test modules that talk to it: loading the model costs seconds each time,
and the modules only add their own requests to it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.ports import free_port



@pytest.fixture(scope="session")
def embedded_server(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """{"url", "ping_codes" (status and seconds of every /ping while it started), "log", "process"}."""
    port = free_port()
    model_dir = tmp_path_factory.mktemp("no-model")  # no model here: the embedded default is served
    env = {**os.environ, "SAGEMAKER_BIND_TO_PORT": str(port),
           # the converted model (embedded/<name> under this cache), so nothing converts again
           "OPTION_MODEL_CACHE_DIR": str(embedded_model_dir.parent.parent),
           "OPTION_MAX_ROLLING_BATCH_SIZE": "16", "OPTION_MAX_TOKENS": "512", "OPTION_MAX_REQUEST_SIZE": "65536"}
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "entrypoint", "serve", "--model-dir", str(model_dir)],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    codes = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, tail(log)
        try:
            started = time.monotonic()
            code = httpx.get(f"{url}/ping", timeout=5).status_code
            codes.append((code, time.monotonic() - started))
            if code == 200:
                break
        except httpx.ConnectError:
            pass
        time.sleep(0.2)
    yield {"url": url, "ping_codes": codes, "log": log, "process": process}
    process.terminate()
    assert process.wait(timeout=60) == 0, tail(log)
    log.close()


def tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-3000:]
