"""Waiting for a server process a test started to become healthy."""

from __future__ import annotations

import subprocess
import time
from typing import Callable

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
