"""SIGTERM during generation on the real server and the embedded model (`python -m entrypoint serve`), with
the optional API key set: requests that cannot finish within the grace period end with the documented
error shape (an error object ending each stream), each is logged, the process exits 0 within SageMaker's
30 s, and no secret (the API key, AWS credentials) appears in the log."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.integration.test_server_faults import wait_until
from tests.support.ports import free_port
from tests.support.server_process import wait_until_healthy

pytestmark = pytest.mark.slow

API_KEY = "sk-test-7f3a9c1e5b"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def test_sigterm_during_generation_ends_every_request_explicitly_and_exits_0(embedded_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SAGEMAKER_BIND_TO_PORT": str(port), "OPTION_MODEL_ID": str(embedded_model_dir),
           "OPTION_MAX_TOKENS": "4096", "OPTION_API_KEY": API_KEY, "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
           "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "entrypoint", "serve", "--model-dir", str(tmp_path)],
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_healthy(url, process, 300, lambda: log_path.read_text()[-3000:])
            auth = {"Authorization": f"Bearer {API_KEY}"}
            results: dict[str, object] = {}

            def call(name: str, stream: bool) -> None:
                body = {"inputs": f"Write a long story about {name}.", "stream": stream,
                        "parameters": {"max_new_tokens": 3000, "ignore_eos": True}}
                if stream:
                    with httpx.stream("POST", url + "/invocations", json=body, headers=auth, timeout=120) as response:
                        results[name] = (response.status_code,
                                         [json.loads(line) for line in response.iter_lines() if line])
                else:
                    response = httpx.post(url + "/invocations", json=body, headers=auth, timeout=120)
                    results[name] = (response.status_code, response.json())

            clients = [threading.Thread(target=call, args=(name, name.startswith("stream")))
                       for name in ("json-1", "json-2", "stream-1", "stream-2")]
            for client in clients:
                client.start()
            with httpx.Client(headers=auth) as client:
                wait_until(lambda: _active(client, url) == 4, timeout=120, what="four requests generating")
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=60)
            exited_after = time.monotonic() - signalled
            for client in clients:
                client.join(30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    assert exited_after < 30, exited_after
    for name in ("json-1", "json-2"):
        status, body = results[name]
        assert status == 503 and body["type"] == "ServerShuttingDown" and body["code"] == 503, results[name]
    for name in ("stream-1", "stream-2"):
        status, lines = results[name]
        assert status == 200 and len(lines) > 1 and "token" in lines[0]
        assert lines[-1]["type"] == "ServerShuttingDown", lines[-1]  # LMI's error token line
        assert lines[-1]["details"]["finish_reason"] == "error", lines[-1]
    assert re.findall(r"route=/invocations status=(\d+)", text) == ["503"] * 4, text[-3000:]
    assert "Traceback" not in text
    assert API_KEY not in text and AWS_SECRET not in text


def _active(client: httpx.Client, url: str) -> float:
    response = client.get(url + "/metrics", timeout=5)
    assert response.status_code == 200, response.text
    match = re.search(r"^lmi_num_requests_active (\S+)$", response.text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0
