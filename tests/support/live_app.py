"""Serving an app on a real uvicorn in a thread, for tests that need real connections (client
disconnects), and waiting for a condition."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

import uvicorn

from tests.support.ports import free_port


@contextlib.contextmanager
def uvicorn_serving(app) -> Iterator[str]:
    """Serve `app` on a free loopback port until the block ends; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=5.0, what="uvicorn did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)


def wait_for(condition: Callable[[], object], timeout: float = 3.0, what: str = "condition not met in time") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)
