"""Starting a server process for a test and waiting for it to become healthy."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx


def wait_until_healthy(url: str, process: subprocess.Popen, timeout: float, log: Callable[[], str],
                       interval: float = 0.5) -> None:
    """Poll `url`/ping until it answers 200; fail with the server's log if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited with {process.returncode}:\n{log()}"
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(interval)
    raise AssertionError(f"not ready in {timeout} s:\n{log()}")


@contextlib.contextmanager
def serve_process(model_dir: str, log_path: Path, **options: str) -> Iterator[str]:
    """`python -m entrypoint serve` on `model_dir` with these OPTION_* settings on a free port, its output in
    `log_path`; yields its URL once healthy (up to 900 s), and stops it when the block ends."""
    from tests.support.ports import free_port

    port = free_port()
    env = {**os.environ, "OPTION_MODEL_ID": str(model_dir), "SAGEMAKER_BIND_TO_PORT": str(port), **options}
    process = subprocess.Popen([sys.executable, "-m", "entrypoint", "serve"], env=env, stdout=open(log_path, "w"),
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, 900, lambda: log_path.read_text()[-3000:], interval=1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=120)
