"""Start the HTTP server at once, load the model behind it, and shut down cleanly.

SageMaker health-checks /ping from container start, so uvicorn listens before the (possibly long) model
load begins; /ping answers 503 with the load progress until the engine is ready. If loading fails or
exceeds model_loading_timeout, the error is logged and `serve` returns 1: a container that cannot serve
should exit so SageMaker replaces it, not answer 503 forever. Once serving, an engine that fails also makes `serve` return 1. SIGTERM (and SIGINT) shut down gracefully:
uvicorn stops accepting connections and lets running requests finish for up to GRACEFUL_SHUTDOWN_SECONDS,
then the engine loop finishes whatever is left with "server shutting down" (a 503 in the documented error
shape, or an error event ending a stream, each in the access log) and `serve` returns 0, all within
SageMaker's 30 s between SIGTERM and SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

import uvicorn

from entrypoint.configuration import Configuration
from entrypoint.http.app import create_app
from entrypoint.http.connection_timeouts import timed_protocol
from entrypoint.http.state import ServerState
from entrypoint.log_filters import quiet_third_party
from entrypoint.startup_report import StartupTimeline, render_summary
from entrypoint.warm_up import PHASE as WARM_UP_PHASE
from entrypoint.warm_up import WarmUpError, warm_up
from handlers.engine import Engine
from handlers.engine_loop import EngineLoop

logger = logging.getLogger("lmi.launch")

EngineFactory = Callable[[Configuration, Callable[[str], None]], Engine]

#: seconds running requests get to finish after SIGTERM (SageMaker / ECS kill after 30 s by default); the
#: requests still running then are ended with "server shutting down" and get their error responses
GRACEFUL_SHUTDOWN_SECONDS = 20.0
#: seconds after that for those error responses to be written before uvicorn cancels what is left (which
#: would answer a bare text/plain 500): 20 + 5 stays inside the 30 s
SHUTDOWN_WRITE_SECONDS = 5.0
#: how often the engine's health is checked once serving, and how long error responses get to reach
#: clients after an engine failure before the process exits
ENGINE_WATCH_SECONDS = 0.5
ENGINE_FAILURE_GRACE_SECONDS = 1.0
#: longer than the 60 s idle timeout of common load balancers, so the server never closes first
KEEP_ALIVE_SECONDS = 75


def serve(configuration: Configuration, engine_factory: EngineFactory | None = None, *, host: str = "0.0.0.0",
          graceful_shutdown_s: float = GRACEFUL_SHUTDOWN_SECONDS,
          raise_load_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Serve until SIGTERM/SIGINT (returns 0) or a failed model load (returns 1).

    A load failure that is an instance of `raise_load_errors` (the CLI passes its user errors: bad
    configuration, model not found, impossible plan) is logged without a traceback and re-raised from
    here once the server has shut down, so the caller can report it as a user error."""
    _configure_logging()
    properties = configuration.properties
    name, aliases = model_name_for(configuration)
    state = ServerState(name, aliases)
    server = _Server(uvicorn.Config(
        create_app(configuration, state), host=host, port=properties.port, log_config=None, access_log=False,
        http=timed_protocol(properties.request_read_timeout),
        timeout_graceful_shutdown=graceful_shutdown_s + SHUTDOWN_WRITE_SECONDS, timeout_keep_alive=KEEP_ALIVE_SECONDS),
        drain_s=graceful_shutdown_s)
    loader = _Loader(configuration, engine_factory or _default_engine_factory, state, server, raise_load_errors)
    server.end_in_flight = loader.end_in_flight
    threading.Thread(target=loader.run, name="model-loader", daemon=True).start()
    logger.info("starting the HTTP server on %s:%d while model %s loads", host, properties.port, name)
    try:
        with _signals_end_serving():
            server.run()
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind the port
        logger.error("the HTTP server could not start (exit status %s)", exc.code)
        return 1
    finally:
        loader.stopping = True
        if server.ending is not None:  # the engine is being stopped already: let it finish (ranks included)
            server.ending.join(SHUTDOWN_WRITE_SECONDS)
        loop = state.loop
        if loop is not None:
            loop.stop()
    if loader.error is not None:
        raise loader.error
    if loader.failed:
        return 1
    logger.info("shut down (peak_rss over the whole run: %.2fGiB)",
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server, whose graceful shutdown (SIGTERM) also ends the work still running after `drain_s`.

    uvicorn alone waits for running requests up to its timeout and then cancels their tasks, which answers
    the non-streamed ones with a bare text/plain 500 (unlogged) and cuts streams without an error event.
    Here the engine loop is stopped after `drain_s` instead: every request still running gets its "server
    shutting down" output, so each HTTP handler answers in the documented error shape and logs it, and uvicorn's own timeout (SHUTDOWN_WRITE_SECONDS later) is only a backstop."""

    def __init__(self, config: uvicorn.Config, drain_s: float):
        super().__init__(config)
        self.drain_s = drain_s
        self.end_in_flight: Callable[[], None] = lambda: None
        self.ending: threading.Thread | None = None  # ends the work left after drain_s; serve() joins it

    async def shutdown(self, sockets: Any = None) -> None:
        logger.info("shutting down: running requests get %.0f s to finish", self.drain_s)
        timer = asyncio.get_running_loop().call_later(self.drain_s, self._end_in_flight)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _end_in_flight(self) -> None:
        # On a thread: stopping the engine loop joins its thread, and the event loop must keep writing.
        self.ending = threading.Thread(target=self.end_in_flight, name="end-in-flight", daemon=True)
        self.ending.start()


class _Loader:
    """Builds the engine on a background thread, bounded by model_loading_timeout."""

    def __init__(self, configuration: Configuration, factory: EngineFactory, state: ServerState,
                 server: uvicorn.Server, user_errors: tuple[type[BaseException], ...]):
        self.configuration = configuration
        self.factory = factory
        self.state = state
        self.server = server
        self.user_errors = user_errors
        self.failed = False
        self.error: BaseException | None = None  # a user error for serve() to re-raise
        self.stopping = False  # set once the server is shutting down: an engine that arrives late is discarded
        self.timeline = StartupTimeline()

    def run(self) -> None:
        result: list[Any] = []

        def build() -> None:
            try:
                result.append(self.factory(self.configuration, self._progress))
            except BaseException as exc:  # noqa: BLE001 - reported below, whatever it is
                result.append(exc)

        # The factory runs on its own daemon thread so a hung load can be abandoned at the timeout.
        worker = threading.Thread(target=build, name="engine-factory", daemon=True)
        worker.start()
        timeout = self.configuration.properties.model_loading_timeout
        worker.join(timeout)
        if worker.is_alive():
            self._fail(f"loading the model did not finish within model_loading_timeout={timeout:g} s "
                       f"(last progress: {self.state.progress})")
            return
        outcome = result[0]
        if isinstance(outcome, self.user_errors):
            self.error = outcome  # its message says it all; no traceback
            self._fail(str(outcome))
            return
        if isinstance(outcome, BaseException):
            logger.error("loading the model failed", exc_info=outcome)
            self._fail(f"{type(outcome).__name__}: {outcome}")
            return
        engine: Engine = outcome
        if self.stopping:
            engine.shutdown()
            return
        properties = self.configuration.properties
        loop = EngineLoop(engine, job_queue_size=properties.job_queue_size,
                          predict_timeout=properties.predict_timeout).start()
        self._progress(WARM_UP_PHASE)
        try:
            warm_up(loop, engine.tokenizer, timeout=properties.model_loading_timeout)
        except WarmUpError as error:
            loop.stop()
            self._fail(str(error))
            return
        self.state.set_ready(loop)
        config = self.server.config
        logger.info("%s", render_summary(
            f"ready in {self.timeline.elapsed():.1f} s: serving {self.state.model_name} on "
            f"http://{config.host}:{config.port}",
            startup_summary(self.configuration, engine, self.state), self.timeline))
        self._watch(loop)

    def _watch(self, loop: EngineLoop) -> None:
        """An engine that failed (a crashed step, a dead tensor-parallel rank) has already finished every
        request with an error and turned /ping unhealthy; exit non-zero so SageMaker or the container
        runtime replaces this process instead of it answering 503 forever."""
        while not self.stopping:
            health = loop.health()
            if not health.healthy and not self.stopping:  # stopping: unhealthy because we shut down
                logger.error("the engine failed, exiting: %s", health.detail)
                time.sleep(ENGINE_FAILURE_GRACE_SECONDS)
                self.failed = True
                self.server.should_exit = True
                return
            time.sleep(ENGINE_WATCH_SECONDS)

    def end_in_flight(self) -> None:
        """Shutdown's grace period is over: end every request still running with "server shutting down"."""
        self.stopping = True  # before the loop turns unhealthy, so _watch does not take it for a failure
        loop = self.state.loop
        if loop is None:
            return
        running = loop.stats().admitted
        if running:
            logger.warning("%d request(s) still running after the shutdown grace period; ending them with "
                           "\"server shutting down\"", running)
        loop.stop()

    def _progress(self, text: str) -> None:
        """One start-up phase (fetching, converting, loading, warming up): logged, shown on /ping, timed."""
        self.timeline.enter(text)
        self.state.set_progress(text)
        logger.info("loading: %s", text)

    def _fail(self, reason: str) -> None:
        logger.error("the model could not be loaded, exiting: %s", reason)
        self.failed = True
        self.state.set_failed(reason)
        self.server.should_exit = True  # uvicorn polls this; serve() then returns 1


def startup_summary(configuration: Configuration, engine: Engine, state: ServerState) -> dict[str, Any]:
    """The facts worth knowing at start-up (rendered by `startup_report.render_summary`); the engine adds its
    own (dtype, why this engine, memory) through an optional `summary() -> dict`, which wins over the
    configured values."""
    properties = configuration.properties
    info: dict[str, Any] = {
        "model": state.model_name,
        "engine": engine.name,
        "dtype": properties.dtype.value,
        "max_rolling_batch_size": properties.max_rolling_batch_size,
        "max_total_tokens": engine.max_total_tokens,
        "job_queue_size": properties.job_queue_size,
        "predict_timeout": f"{properties.predict_timeout:g}s",
    }
    summary = getattr(engine, "summary", None)
    if callable(summary):
        info.update(summary())
    info.setdefault("peak_rss", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}GiB")
    return info


def model_name_for(configuration: Configuration) -> tuple[str, tuple[str, ...]]:
    """The name /predictions/{name} and /models use: the last part of model_id (its full form is accepted
    too), else the model directory's name ("model" for SageMaker's /opt/ml/model), or the embedded model's
    name when the model directory holds no model."""
    model_id = configuration.properties.model_id
    if model_id:
        return model_id.rstrip("/").rsplit("/", 1)[-1] or model_id, (model_id,)
    if not (configuration.model_dir / "config.json").is_file():
        from entrypoint.embedded_model import MODEL_NAME
        return MODEL_NAME, ()
    return configuration.model_dir.name or "model", ()


def _default_engine_factory(configuration: Configuration, progress: Callable[[str], None]) -> Engine:
    from entrypoint.engine_factory import build_engine  # heavy (torch, deepspeed): only once serving starts

    return build_engine(configuration, progress)


@contextlib.contextmanager
def _signals_end_serving() -> Iterator[None]:
    """uvicorn handles SIGTERM/SIGINT gracefully and then re-raises the signal to the handler that was
    installed before it, which by default kills the process (exit status -15). Installing a no-op handler
    first lets a graceful shutdown end with exit status 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_third_party()
