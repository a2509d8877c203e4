"""What the HTTP server is serving: loading, ready (with its EngineLoop) or failed.

The model loads on a background thread while uvicorn already answers /ping, so this object is written by
the loader thread and read by the event loop; a lock keeps each transition atomic.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from enum import Enum

from entrypoint.protocol.errors import ModelNotReady
from handlers.engine import EngineHealth
from handlers.engine_loop import EngineLoop

#: seconds a client is told to wait (Retry-After) while the model is loading
LOADING_RETRY_AFTER = 10


class Phase(str, Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class Health:
    healthy: bool
    status: str  # "healthy", "loading", "failed", "unhealthy"
    detail: str


class ServerState:
    def __init__(self, model_name: str, aliases: tuple[str, ...] = ()):
        self.model_name = model_name
        self.aliases = frozenset((model_name, *aliases))  # names /predictions/{name} accepts
        self.started_at = time.time()
        self.ready_at: float | None = None
        self._lock = threading.Lock()
        self._phase = Phase.LOADING
        self._progress = "starting"
        self._failure: str | None = None
        self._loop: EngineLoop | None = None

    # ---- transitions (loader thread) ----------------------------------------------------------------
    def set_progress(self, text: str) -> None:
        with self._lock:
            self._progress = text

    def set_ready(self, loop: EngineLoop) -> None:
        with self._lock:
            self._loop = loop
            self._phase = Phase.READY
            self._progress = "ready"
            self.ready_at = time.time()

    def set_failed(self, reason: str) -> None:
        with self._lock:
            self._phase = Phase.FAILED
            self._failure = reason

    # ---- queries (event loop) -----------------------------------------------------------------------
    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def progress(self) -> str:
        return self._progress

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def loop(self) -> EngineLoop | None:
        return self._loop

    def knows_model(self, name: str) -> bool:
        return name in self.aliases

    def health(self) -> Health:
        with self._lock:
            phase, progress, failure, loop = self._phase, self._progress, self._failure, self._loop
        if phase is Phase.LOADING:
            return Health(False, "loading", f"the model is loading: {progress}")
        if phase is Phase.FAILED or loop is None:
            return Health(False, "failed", f"the model failed to load: {failure}")
        engine: EngineHealth = loop.health()
        if not engine.healthy:
            return Health(False, "unhealthy", f"the engine is unhealthy: {engine.detail}")
        return Health(True, "healthy", "ok")

    def require_loop(self) -> EngineLoop:
        """The EngineLoop to submit to, or `ModelNotReady` explaining why there is none."""
        with self._lock:
            phase, progress, failure, loop = self._phase, self._progress, self._failure, self._loop
        if phase is Phase.LOADING:
            raise ModelNotReady(f"the model is still loading ({progress}); retry later", LOADING_RETRY_AFTER)
        if phase is Phase.FAILED or loop is None:
            raise ModelNotReady(f"the model failed to load: {failure}")
        return loop
