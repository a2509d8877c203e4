"""`handle(inputs)`, the entry point DJL Serving's Python engine calls, as `djl_python.deepspeed` had it.

With `option.entryPoint=entrypoint.djl_handler`, DJL Serving can drive this container's engines the way it
drove LMI's DeepSpeed handler. This module is an edge of the project like the HTTP server (DJL enters our
code here), so it lives in `entrypoint/`: `handlers/` never imports `entrypoint/`. Our own configuration
also accepts LMI's name `djl_python.deepspeed` and the earlier `handlers.deepspeed` for option.entryPoint
and reads them as this module; DJL itself imports the name literally, from its own copy of djl_python
first, so inside DJL Serving the option must name this module.

* Output classes: DJL's Python engine refuses any output that is not its own `djl_python.outputs.Output`
  ("Invalid output type"), so when `djl_python` is importable every `Output` returned is djl_python's;
  otherwise it is `entrypoint.djl_io.Output`, the compatible class this project ships (`output_class`).

* The first call initializes. Its `Input` is empty and its properties are serving.properties' options
  without the `option.` prefix plus keys DJL adds (`model_dir`, `device_id`, ...). They become one
  validated `Configuration` (`load_configuration_from_properties`), the engine is built
  (`entrypoint.engine_factory.build_engine`, or the factory given to `set_engine_factory`) and driven by an
  `EngineLoop`. A bad configuration answers code 400 with the message naming each key, and the handler
  stays uninitialized (the next initialization call tries again).
* An empty input answers None (DJL turns that into 204), as djl_python.deepspeed did.
* A request, or a batch of them (see `entrypoint.djl_io`), carries LMI's body
  `{"inputs": str | [str], "parameters": {...}}` and gets exactly what /invocations answers for it:
  `{"generated_text": ...}` (+ `details`), or a list for list inputs, or the error body
  `{"error": {"message", "type", "code"}}` with the same status. Both paths use the same parser, response
  builder and error table (`entrypoint.protocol.lmi`, `entrypoint.protocol.errors`).
* In a batch, each request is parsed, tokenized and validated on its own: a bad one (invalid JSON, a bad
  parameter, a prompt too long) gets its own 400 and the others are served. The valid requests are
  submitted together, so they share the engine's rolling batch. The batch `Output` has code 200 and
  one content entry per request under `batch_<i>.data`, with `batch_<i>_code` and
  `batch_<i>_Content-Type` properties (a batch code >= 300 would fail every request in DJL).

Deviations: responses are always JSON. `"stream": true` gets a 400, because DJL's dynamic batching
path has no token stream; use the HTTP server for streaming. Calls are answered one at a time, and a
batch returns when its slowest request finishes. DJL's token-by-token rolling batch protocol
(`option.rolling_batch` handled by DJL's Java `RollingBatch`, with binary-encoded chunks) is not spoken:
with this handler, batching happens inside the engine, so DJL should run it without its own rolling batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from entrypoint.configuration import Configuration, ConfigurationError, load_configuration_from_properties
from entrypoint.djl_io import Input, Output
from entrypoint.protocol.errors import INTERNAL, PredictTimeout, error_body, exception_for_output, make_body, row_for
from entrypoint.protocol.prepare import Api, Prepared, Route, prepare
from entrypoint.protocol.tokenization import PromptTokenizer
from handlers.engine import Engine
from handlers.engine_loop import EngineLoop

logger = logging.getLogger("lmi.djl")

#: builds the engine from the validated configuration; the second argument receives progress messages
EngineFactory = Callable[[Configuration, Callable[[str], None]], Engine]

#: seconds `generate` waits beyond predict_timeout (which the loop enforces per request) before giving up
GENERATE_GRACE_SECONDS = 60.0

JSON = "application/json"


def output_class() -> type:
    """djl_python's `Output` when importable (DJL's engine loop checks `isinstance(outputs, Output)` against
    it, python_sync_engine.py), else ours, which has the same constructor and writers."""
    try:
        from djl_python.outputs import Output as DjlOutput
    except ImportError:
        return Output
    return DjlOutput


def default_engine_factory(configuration: Configuration, progress: Callable[[str], None]) -> Engine:
    from entrypoint.engine_factory import build_engine  # heavy (torch, deepspeed): only when initializing

    return build_engine(configuration, progress)


#: how requests arrive through `handle()`: LMI bodies, answered as JSON (DJL's dynamic batching has no stream)
ROUTE = Route(Api.LMI, chat_bodies=False, no_stream="stream: true is not served through DJL's handle() (no token "
              "stream); send \"stream\": false or use the HTTP server's /invocations")


@dataclass
class _Item:
    """One request of a call: prepared, or the error that ends it."""

    prepared: Prepared | None = None
    error: BaseException | None = None

    def answer(self) -> tuple[int, Any]:
        """(status, JSON body) as /invocations answers."""
        if self.error is None and self.prepared is not None:  # the first input that finished with an error fails it
            failures = (exception_for_output(r.final) for r in self.prepared.results if r.final is not None)
            self.error = next((failure for failure in failures if failure is not None), None)
        if self.error is not None:
            row = row_for(self.error)
            if row is INTERNAL:
                logger.error("unexpected error", exc_info=self.error)
            return row.status, error_body(self.error)
        assert self.prepared is not None
        return 200, self.prepared.body()


class _LoopServer:
    """What `prepare` asks of the server, for the handler's one engine loop (LMI bodies name no model)."""

    model_name = ""

    def __init__(self, loop: EngineLoop):
        self.loop = loop

    def knows_model(self, name: str) -> bool:
        return False

    def require_loop(self) -> EngineLoop:
        return self.loop


class DeepSpeedService:
    """The state behind `handle()`: configuration, engine loop, and the answers to DJL's calls."""

    def __init__(self, engine_factory: EngineFactory | None = None, environ: Mapping[str, str] | None = None):
        self.engine_factory = engine_factory
        self.environ = environ  # None: os.environ
        self.configuration: Configuration | None = None
        self.loop: EngineLoop | None = None
        self.init_failure: Output | None = None  # the answer of the last failed initialization
        self.tokenizer = PromptTokenizer()
        self._lock = threading.Lock()

    @property
    def initialized(self) -> bool:
        return self.loop is not None

    # ---- initialization ---------------------------------------------------------------------------
    def initialize(self, properties: Mapping[str, Any]) -> Output | None:
        """Configure and load the engine; None when ready, else the error `Output` (and stay uninitialized)."""
        with self._lock:
            if self.loop is not None:
                return None
            failure = self._initialize(dict(properties))
            self.init_failure = failure
            return failure

    def _initialize(self, properties: dict[str, Any]) -> Output | None:
        try:
            configuration = load_configuration_from_properties(properties, environ=self.environ)
        except ConfigurationError as exc:
            logger.error("%s", exc)
            return _failure(400, "ConfigurationError", str(exc))
        for note in configuration.notes:
            logger.info("%s", note)
        for warning in configuration.warnings:
            logger.warning("%s", warning)
        factory = self.engine_factory or default_engine_factory
        try:
            engine = factory(configuration, lambda text: logger.info("loading: %s", text))
        except Exception as exc:  # noqa: BLE001 - every load failure becomes DJL's failed initialization
            return _load_failure(exc, configuration)
        properties_ = configuration.properties
        self.loop = EngineLoop(engine, job_queue_size=properties_.job_queue_size,
                               predict_timeout=properties_.predict_timeout, name="djl-engine-loop").start()
        self.configuration = configuration
        logger.info("model ready: engine %s, max_total_tokens %d", engine.name, engine.max_total_tokens)
        return None

    def shutdown(self) -> None:
        """Stop the engine loop (finishing whatever runs) and forget the configuration."""
        with self._lock:
            loop, self.loop, self.configuration, self.init_failure = self.loop, None, None, None
        if loop is not None:
            loop.stop()
        self.tokenizer.close()
        self.tokenizer = PromptTokenizer()  # threads start on first use: a later initialization gets fresh ones

    # ---- inference ------------------------------------------------------------------------------------
    def inference(self, inputs: Input) -> Output:
        loop, configuration = self.loop, self.configuration
        if loop is None or configuration is None:
            raise RuntimeError("the handler is not initialized")
        server = _LoopServer(loop)
        items = asyncio.run(self._prepare(server, inputs.get_batches()))
        self._generate(loop, configuration, [item for item in items if item.error is None])
        answers = [item.answer() for item in items]
        if not inputs.is_batch():
            status, body = answers[0]
            output = output_class()(status, "OK" if status == 200 else _message(body))
            return output.add_property("Content-Type", JSON).add_as_json(body)
        output = output_class()().add_property("Content-Type", JSON)
        for index, (status, body) in enumerate(answers):
            output.add_as_json(body, key="data", batch_index=index)
            output.add_property(f"batch_{index}_Content-Type", JSON)
            output.add_property(f"batch_{index}_code", str(status))
        return output

    async def _prepare(self, server: _LoopServer, batch: list[Input]) -> list[_Item]:
        """Each request prepared on its own: a bad one gets its own error and the others are served."""
        async def one(item: Input) -> _Item:
            try:
                body = item.get_as_bytes()
                return _Item(await prepare(bytes(body) if body is not None else b"", ROUTE, server, self.tokenizer,
                                           f"djl-{uuid.uuid4().hex}"))
            except Exception as exc:  # noqa: BLE001 - InvalidRequest (400), or anything else (500), for this item
                return _Item(error=exc)

        return [await one(item) for item in batch]

    def _generate(self, loop: EngineLoop, configuration: Configuration, items: list[_Item]) -> None:
        """Run every valid item's requests together (one rolling batch) and collect their outputs."""
        prepared = [item.prepared for item in items if item.prepared is not None]
        requests = [request for each in prepared for request in each.requests]
        if not requests:
            return
        timeout = configuration.properties.predict_timeout + GENERATE_GRACE_SECONDS
        try:
            outputs = iter(loop.generate(requests, timeout=timeout))
        except TimeoutError as exc:
            failure: BaseException = PredictTimeout(str(exc))
        except Exception as exc:  # noqa: BLE001 - QueueFull, EngineUnavailable (503), else 500
            failure = exc
        else:
            for each in prepared:
                for result in each.results:
                    for output in next(outputs):
                        result.add(output)
            return
        for item in items:
            item.error = failure


def _message(body: dict[str, Any]) -> str:
    """The error message of an LMI error body, for DJL's log line (Output.message)."""
    return str(body.get("message") or body.get("error"))


def _failure(status: int, error_type: str, message: str) -> Output:
    """An initialization failure: the message goes to DJL's log (Output.message) and the body."""
    return output_class()(status, message).add_property("Content-Type", JSON).add_as_json(
        make_body(status, error_type, message))


def _load_failure(exc: Exception, configuration: Configuration) -> Output:
    from entrypoint.model_resolution import ModelResolutionError
    from handlers.engine_plan import PlanError

    if isinstance(exc, (PlanError, ModelResolutionError)):  # the user's model or configuration is wrong
        describe = getattr(exc, "describe", None)
        message = describe(lambda key: str(configuration.source_of(key)) if key in configuration.sources else None) \
            if callable(describe) else str(exc)
        logger.error("%s", message)
        return _failure(400, type(exc).__name__, message)
    logger.error("loading the model failed", exc_info=exc)
    out_of_memory = type(exc).__name__ in ("OutOfMemoryError", "MemoryError", "EngineOutOfMemory")
    status, error_type = (507, "OutOfMemory") if out_of_memory else (500, "ModelLoadingFailed")
    return _failure(status, error_type, f"loading the model failed: {type(exc).__name__}: {exc}")


_service = DeepSpeedService()


def set_engine_factory(factory: EngineFactory | None) -> None:
    """Build the engine with `factory` at the next initialization (None: the real engine factory)."""
    _service.engine_factory = factory


def shutdown() -> None:
    """Stop the engine; the next `handle()` call initializes again."""
    _service.shutdown()


def handle(inputs: Input) -> Output | None:
    """DJL Serving's entry point; see the module docstring."""
    if not _service.initialized:
        if not inputs.is_empty() and _service.init_failure is not None:
            # A request after a failed initialization: answer with that failure instead of configuring the
            # model from the request's properties (its headers).
            return _service.init_failure
        failure = _service.initialize(inputs.get_properties())
        if failure is not None:
            return failure
    if inputs.is_empty():
        return None
    return _service.inference(inputs)
