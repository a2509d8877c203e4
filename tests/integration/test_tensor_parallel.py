"""Tensor parallelism on CPU: `tensor_parallel_degree=3` runs three ranks under DeepSpeed's launcher (the
embedded model has 9 attention heads and 3 KV heads), serves the same greedy text as degree 1, and a rank
killed during generation fails the in-flight request with an error, turns /ping unhealthy, and ends every
process with a non-zero status."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.ports import free_port
from tests.support.server_process import wait_until_healthy

pytestmark = pytest.mark.slow

PROMPTS = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "The history of Paris", "def fibonacci(n):", "Once upon a time"]



class Server:
    def __init__(self, model: Path, degree: int, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server-tp{degree}.log"
        env = {**os.environ, "SAGEMAKER_BIND_TO_PORT": str(self.port), "OPTION_MODEL_ID": str(model),
               "OPTION_TENSOR_PARALLEL_DEGREE": str(degree), "OPTION_MAX_TOKENS": "512"}
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "entrypoint", "serve", "--model-dir", str(workdir)],
                                        env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> None:
        wait_until_healthy(self.url, self.process, timeout, self.output)

    def ranks(self) -> list[psutil.Process]:
        found = [p for p in psutil.Process(self.process.pid).children(recursive=True)
                 if "entrypoint.rank" in " ".join(p.cmdline()) and "deepspeed" not in " ".join(p.cmdline())]
        return sorted(found, key=lambda p: int(p.environ().get("RANK", "-1")))

    def generate(self, prompt: str, tokens: int = 24) -> str:
        response = httpx.post(f"{self.url}/invocations", timeout=120,
                              json={"inputs": prompt, "parameters": {"max_new_tokens": tokens}})
        assert response.status_code == 200, response.text
        return response.json()["generated_text"]

    def wait_running(self, timeout: float = 120) -> None:
        """Until the engine's running batch holds a request (its /metrics gauge), bounded generously."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            metrics = httpx.get(f"{self.url}/metrics", timeout=10).text
            if any(line.startswith("lmi_num_requests_running ") and float(line.split()[1]) >= 1
                   for line in metrics.splitlines()):
                return
            time.sleep(0.1)
        raise AssertionError(f"no request was running after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-4000:]

    def stop(self) -> int:
        """SIGTERM to the server's process alone, as `docker stop` sends it to the container's main process
        (after `serve` exec'd it, that is DeepSpeed's launcher): it must take every rank down."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=90)
        self.log.close()
        return code


@pytest.fixture(scope="module")
def degree1_outputs(embedded_model_dir, tmp_path_factory):
    server = Server(embedded_model_dir, 1, tmp_path_factory.mktemp("tp1"))
    try:
        server.wait_ready()
        return [server.generate(prompt) for prompt in PROMPTS]
    finally:
        server.stop()


def test_degree_3_serves_the_same_greedy_text_as_degree_1(embedded_model_dir, tmp_path, degree1_outputs):
    server = Server(embedded_model_dir, 3, tmp_path)
    try:
        server.wait_ready()
        ranks = server.ranks()
        assert [r.environ()["RANK"] for r in ranks] == ["0", "1", "2"]
        assert [server.generate(prompt) for prompt in PROMPTS] == degree1_outputs
        # DeepSpeed's CPU all-reduce buffers (69 MB a rank) are still mapped but no longer named in /dev/shm,
        # so they cannot outlive the ranks however the ranks end (DeepSpeed itself never removes them)
        port = ranks[0].environ()["MASTER_PORT"]
        assert [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")] == []
        maps = Path(f"/proc/{ranks[1].pid}/maps").read_text()
        assert f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0 (deleted)" in maps
        assert "Paris" in degree1_outputs[0]
    finally:
        server.stop()
    _, alive = psutil.wait_procs(ranks, timeout=45)  # rank 0 finishes gracefully, then tells the others to stop
    assert not alive, f"orphaned ranks: {alive}"


def test_killing_a_rank_fails_the_request_and_the_server_exits_non_zero(embedded_model_dir, tmp_path):
    server = Server(embedded_model_dir, 3, tmp_path)
    try:
        server.wait_ready()
        ranks = server.ranks()
        result: dict = {}

        def long_request() -> None:
            started = time.monotonic()
            response = httpx.post(f"{server.url}/invocations", timeout=120,
                                  json={"inputs": "The history of Paris",
                                        "parameters": {"max_new_tokens": 400, "ignore_eos": True}})
            result.update(status=response.status_code, body=response.json(), seconds=time.monotonic() - started)

        client = threading.Thread(target=long_request)
        client.start()
        server.wait_running()  # the request is in the running batch: the ranks are inside its steps
        ranks[1].kill()
        pings = []
        deadline = time.monotonic() + 120  # generous: the server must exit by itself, long before this
        while server.process.poll() is None and time.monotonic() < deadline:
            try:
                pings.append(httpx.get(f"{server.url}/ping", timeout=5).status_code)
            except httpx.TransportError:
                pings.append("refused")
            time.sleep(0.2)
        client.join(120)
        assert not client.is_alive(), "the in-flight request never got its response"
        code = server.process.wait(timeout=60)
    finally:
        server.stop()
    assert result["status"] == 424, result
    assert "rank 1" in result["body"]["message"] and "died" in result["body"]["message"]
    # Once unhealthy (503, then refused as the server exits), never healthy again.
    first_unhealthy = next((i for i, ping in enumerate(pings) if ping != 200), len(pings))
    assert 200 not in pings[first_unhealthy:], pings
    assert code != 0
    _, alive = psutil.wait_procs(ranks, timeout=45)
    assert not alive, f"orphaned ranks: {alive}"


def test_a_degree_that_does_not_divide_the_heads_fails_before_loading(embedded_model_dir, tmp_path):
    env = {**os.environ, "OPTION_MODEL_ID": str(embedded_model_dir), "OPTION_TENSOR_PARALLEL_DEGREE": "2"}
    result = subprocess.run([sys.executable, "-m", "entrypoint", "serve", "--model-dir", str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "9" in result.stderr and "3" in result.stderr and "tensor_parallel_degree" in result.stderr
    assert "Uvicorn running" not in result.stderr
