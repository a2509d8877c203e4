"""Drives an `Engine` from one dedicated thread and hands its outputs to many callers.

The engine's threading contract is "one thread calls every method" (`handlers.engine`). The HTTP server
(asyncio) and the DJL `handle()` path (blocking) both need to add and cancel requests from their own
threads, so they never touch the engine: `submit` / `cancel` put commands on a queue that the loop thread
drains before every `step()`. Outputs go back through per-request sinks (callables run on the loop
thread), with two adapters: `stream()` for asyncio code and `generate()` for blocking code.

Guarantee to callers: every admitted request receives exactly one final output (`finished=True`), whether
it completes, is cancelled, times out, runs out of memory, the engine crashes, or the loop stops. Error
finishes carry an `ErrorKind` (see `error_kind`) so front ends can map them to distinct HTTP statuses.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Sequence

from handlers.engine import (
    Engine,
    EngineHealth,
    EngineOutOfMemory,
    EngineStats,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    RequestOutput,
)

logger = logging.getLogger("lmi.engine_loop")

Sink = Callable[[RequestOutput], None]

#: seconds a client is told to wait (Retry-After) when the admission limit is reached
RETRY_AFTER_SECONDS = 2


class ErrorKind(str, Enum):
    """Why the loop finished a request with an error; front ends map each kind to an HTTP status."""

    INVALID = "invalid_request"  # the engine rejected the request (InvalidRequest from add_request)
    GENERATION = "generation_error"  # the engine finished the request with an error
    ENGINE_FAILED = "engine_failed"  # engine.step() raised; the loop is unhealthy from now on
    OUT_OF_MEMORY = "out_of_memory"  # the engine raised EngineOutOfMemory
    TIMEOUT = "timeout"  # the request ran past predict_timeout
    SHUTDOWN = "shutdown"  # the loop was stopped while the request was active


@dataclass(frozen=True)
class LoopErrorOutput(RequestOutput):
    """A final error output made by the loop; `kind` says which failure it was.

    A subclass instead of a field on `RequestOutput` so the engine interface stays as it is; error outputs
    that engines return themselves are plain `RequestOutput`s and count as `ErrorKind.GENERATION`."""

    kind: ErrorKind = ErrorKind.GENERATION
    field: str | None = None  # the request field an `InvalidRequest` named


def error_kind(output: RequestOutput) -> ErrorKind | None:
    """The kind of error `output` finished with, or None when it is not an error finish."""
    if isinstance(output, LoopErrorOutput):
        return output.kind
    if output.error is not None or output.finish_reason is FinishReason.ERROR:
        return ErrorKind.GENERATION
    return None


class QueueFull(RuntimeError):
    """More requests than `job_queue_size` are admitted; the caller should retry later (HTTP 503)."""

    def __init__(self, limit: int, retry_after: int = RETRY_AFTER_SECONDS):
        super().__init__(f"the server is at capacity: {limit} requests are already admitted (job_queue_size={limit}); "
                         f"retry in {retry_after} s")
        self.limit = limit
        self.retry_after = retry_after


class EngineUnavailable(RuntimeError):
    """The loop does not accept requests: not started, stopping, or the engine failed (HTTP 503)."""


@dataclass(frozen=True)
class LoopStats:
    admitted: int  # submitted and not finished yet (what job_queue_size limits)
    pending: int  # submitted but not yet handed to the engine (queued commands)
    active: int  # handed to the engine and not finished
    running: int  # engine.stats().running
    waiting: int  # engine.stats().waiting
    kv_cache_usage: float
    steps: int  # engine steps taken since start
    healthy: bool
    kv_cache_tokens: int = 0  # reserved by admitted requests
    kv_cache_capacity_tokens: int = 0


@dataclass
class _Entry:
    request: GenerationRequest
    sink: Sink
    deadline: float | None
    generated_tokens: int = 0
    closed: bool = False  # its final output was sent (guarded by EngineLoop._cond; see abort())


class EngineLoop:
    """Runs `engine.step()` on one daemon thread; see the module docstring."""

    def __init__(self, engine: Engine, *, job_queue_size: int = 1000, predict_timeout: float | None = None,
                 name: str = "engine-loop", clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.job_queue_size = job_queue_size
        self.predict_timeout = predict_timeout
        self._name = name
        self._clock = clock
        self._cond = threading.Condition()
        # Guarded by _cond: ------------------------------------------------------------------------------
        self._commands: collections.deque[tuple[str, object]] = collections.deque()
        self._admitted = 0
        self._started = False
        self._stopping = False
        self._failure: str | None = None
        # one per event loop that reads streams; weak, so that a closed loop's entry goes with it
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventLoopMailbox] = \
            weakref.WeakKeyDictionary()
        # Owned by the loop thread (read elsewhere only as snapshots): ---------------------------------
        self._active: dict[str, _Entry] = {}
        self._inbox: collections.deque[tuple[str, object]] = collections.deque()  # taken, not yet applied
        self._engine_health = EngineHealth(True)
        self._engine_stats = EngineStats()
        self._steps = 0
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> EngineLoop:
        with self._cond:
            if self._started:
                raise RuntimeError("the engine loop is already started")
            self._started = True
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        # An engine with parts outside this thread (tensor-parallel ranks) watches them and aborts the
        # loop itself when one dies, even while a step is stuck waiting for it.
        self.engine.watch(self.abort)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish every active request with "server shutting down", then shut the engine down."""
        with self._cond:
            already = self._stopping
            self._stopping = True
            self._cond.notify_all()
        if already:
            return
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            if self._failure is not None:
                timeout = min(timeout, 1.0)  # after abort() the thread may be stuck for good
            thread.join(timeout)
            if thread.is_alive():
                logger.error("the engine loop did not stop within %.0f s (an engine step is stuck)", timeout)
            return
        # Never started, or the thread already ended after an engine failure: clean up here (no other
        # thread uses the engine any more, so the one-thread contract still holds).
        self._finish_everything(ErrorKind.SHUTDOWN, "server shutting down")
        self._shutdown_engine()

    def abort(self, reason: str) -> None:
        """Thread-safe: the engine can no longer serve and its thread may be stuck inside it (a collective
        waiting for a tensor-parallel rank that died never returns). Every admitted request gets its error
        now, from the calling thread; the loop is marked failed, so /ping turns unhealthy and new requests
        are refused. Whatever the stuck thread sends later is dropped (`_Entry.closed`)."""
        with self._cond:
            if self._failure is not None:
                return
            self._failure = reason
            pending = [payload for kind, payload in list(self._commands) + list(self._inbox) if kind == "add"]
            entries = list(self._active.values()) + pending  # type: ignore[operator]
            self._cond.notify_all()
        logger.error("engine aborted: %s; failing %d request(s)", reason, len(entries))
        for entry in entries:
            self._deliver_error(entry, ErrorKind.ENGINE_FAILED, reason)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- thread-safe API ----------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        """Admit one request; `sink` receives its outputs on the loop thread and must not block.

        Raises `QueueFull` above job_queue_size and `EngineUnavailable` when the loop cannot serve."""
        self.submit_many([(request, sink)])

    def submit_many(self, items: Sequence[tuple[GenerationRequest, Sink]]) -> None:
        """Admit several requests, all or none (a batch of inputs must not be served half)."""
        deadline = None if self.predict_timeout is None else self._clock() + self.predict_timeout
        with self._cond:
            self._check_accepting()
            if self._admitted + len(items) > self.job_queue_size:
                raise QueueFull(self.job_queue_size)
            self._admitted += len(items)
            for request, sink in items:
                self._commands.append(("add", _Entry(request, sink, deadline)))
            self._cond.notify_all()

    def cancel(self, request_id: str) -> None:
        """Ask the loop to drop a request; it frees the batch slot before the next step. Unknown ids are
        ignored (the request may have finished meanwhile)."""
        with self._cond:
            self._commands.append(("cancel", request_id))
            self._cond.notify_all()

    def stream(self, request: GenerationRequest) -> OutputStream:
        """Submit `request` and return an async iterator of its outputs (call from a running event loop).

        Admission errors raise here, before the caller commits to a response."""
        return self.streams([request])[0]

    def streams(self, requests: Sequence[GenerationRequest]) -> list[OutputStream]:
        """`stream()` for several requests, admitted all or none."""
        mailbox = self._mailbox_for(asyncio.get_running_loop())
        streams = [OutputStream(self, request.request_id, mailbox) for request in requests]
        self.submit_many([(request, s.deliver) for request, s in zip(requests, streams, strict=True)])
        return streams

    def _mailbox_for(self, aloop: asyncio.AbstractEventLoop) -> EventLoopMailbox:
        with self._cond:
            mailbox = self._mailboxes.get(aloop)
            if mailbox is None:
                mailbox = self._mailboxes[aloop] = EventLoopMailbox(aloop)
            return mailbox

    def generate(self, requests: Sequence[GenerationRequest],
                 timeout: float | None = None) -> list[list[RequestOutput]]:
        """Blocking API (DJL handle path): run `requests` to completion and return every output of each.

        Raises `QueueFull` / `EngineUnavailable` if not admitted and `TimeoutError` after `timeout`
        seconds (the requests are cancelled then). Must not be called on the loop thread."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("generate() called on the engine loop thread would wait for itself")
        results: list[list[RequestOutput]] = [[] for _ in requests]
        remaining = [len(requests)]
        done = threading.Event()
        if not requests:
            return results

        def sink_for(index: int) -> Sink:
            def sink(output: RequestOutput) -> None:  # runs on the loop thread only
                results[index].append(output)
                if output.finished:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()
            return sink

        self.submit_many([(request, sink_for(i)) for i, request in enumerate(requests)])
        if not done.wait(timeout):
            for request in requests:
                self.cancel(request.request_id)
            raise TimeoutError(f"{len(requests)} request(s) did not finish within {timeout} s")
        return results

    def health(self) -> EngineHealth:
        """The loop's health: failed / stopping / not started, else the engine's last reported health."""
        with self._cond:
            if self._failure is not None:
                return EngineHealth(False, self._failure)
            if self._stopping:
                return EngineHealth(False, "server shutting down")
            if not self._started:
                return EngineHealth(False, "engine loop not started")
        return self._engine_health

    def stats(self) -> LoopStats:
        with self._cond:
            admitted, pending = self._admitted, sum(1 for kind, _ in self._commands if kind == "add")
        engine_stats = self._engine_stats
        return LoopStats(admitted=admitted, pending=pending, active=len(self._active), running=engine_stats.running,
                         waiting=engine_stats.waiting, kv_cache_usage=engine_stats.kv_cache_usage,
                         steps=self._steps, healthy=self.health().healthy,
                         kv_cache_tokens=engine_stats.kv_cache_tokens,
                         kv_cache_capacity_tokens=engine_stats.kv_cache_capacity_tokens)

    def _check_accepting(self) -> None:  # caller holds _cond
        if self._failure is not None:
            raise EngineUnavailable(f"the engine failed and does not accept requests: {self._failure}")
        if self._stopping:
            raise EngineUnavailable("server shutting down")
        if not self._started:
            raise EngineUnavailable("the engine loop is not started")
        if not self._engine_health.healthy:
            raise EngineUnavailable(f"the engine is unhealthy: {self._engine_health.detail}")

    # ---- the loop thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._wait_for_work():
                self._apply()
                self._expire()
                if self._active or self.engine.has_unfinished():
                    self._step()
                else:
                    self._heartbeat()
                self._snapshot()
        except _EngineFailed:
            pass  # already reported; every request has its error output
        except BaseException as exc:  # a bug in the loop itself or in an engine method other than step()
            self._fail(exc, "engine loop failed")
            return
        if self._failure is None:
            self._finish_everything(ErrorKind.SHUTDOWN, "server shutting down")
            self._shutdown_engine()

    def _wait_for_work(self) -> bool:
        """Move queued commands to the inbox; sleep on the condition while there is nothing to do (no busy
        wait). False when the loop should end."""
        with self._cond:
            while True:
                if self._stopping or self._failure is not None:
                    return False
                if self._commands or self._active or self.engine.has_unfinished():
                    self._inbox.extend(self._commands)
                    self._commands.clear()
                    return True
                # Idle: nothing admitted, so no deadline can pass either; submit/cancel/stop notify. An
                # engine with a heartbeat (tensor-parallel ranks) is woken to run it every interval.
                interval = self.engine.heartbeat_interval
                if not self._cond.wait(timeout=interval) and interval is not None:
                    return True

    def _apply(self) -> None:
        # One at a time from the inbox, so that if an engine method raises, the commands not yet applied
        # are still there for `_finish_everything` (no admitted request may go without a final output).
        while self._inbox:
            kind, payload = self._inbox.popleft()
            if kind == "add":
                self._add(payload)  # type: ignore[arg-type]
            else:
                self._cancel(payload, FinishReason.CANCELLED, None, None)  # type: ignore[arg-type]

    def _add(self, entry: _Entry) -> None:
        request_id = entry.request.request_id
        if request_id in self._active:  # never let two requests share one sink slot
            self._deliver_error(entry, ErrorKind.INVALID, f"request id {request_id!r} is already active")
            return
        self._active[request_id] = entry  # first, so an unexpected engine error still finishes it
        try:
            self.engine.add_request(entry.request)
        except InvalidRequest as exc:
            del self._active[request_id]
            self._deliver_error(entry, ErrorKind.INVALID, str(exc), exc.field)
        except EngineOutOfMemory as exc:
            del self._active[request_id]
            self._deliver_error(entry, ErrorKind.OUT_OF_MEMORY, f"out of memory: {exc}")

    def _cancel(self, request_id: str, reason: FinishReason, kind: ErrorKind | None, error: str | None) -> None:
        entry = self._active.get(request_id)
        if entry is None:
            return
        final = self.engine.cancel(request_id)  # before removing the entry: if this raises, _fail finishes it
        del self._active[request_id]
        text, tokens = (final.text, final.tokens) if final is not None else ("", ())
        generated = final.generated_tokens if final is not None else entry.generated_tokens
        output = RequestOutput(request_id, tokens, text, finished=True, finish_reason=reason, error=error,
                               prompt_tokens=len(entry.request.prompt_token_ids), generated_tokens=generated)
        if kind is not None:
            output = LoopErrorOutput(**vars(output), kind=kind)
        self._send(entry, output)

    def _expire(self) -> None:
        now = self._clock()
        for request_id, entry in list(self._active.items()):
            if entry.deadline is not None and entry.deadline <= now:
                message = (f"the request did not finish within predict_timeout={self.predict_timeout:g} s and was "
                           f"cancelled after {entry.generated_tokens} generated tokens")
                self._cancel(request_id, FinishReason.CANCELLED, ErrorKind.TIMEOUT, message)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineOutOfMemory as exc:
            self._out_of_memory(exc)
            return
        except Exception as exc:
            self._fail(exc, "engine step failed")
            raise _EngineFailed from exc
        self._steps += 1
        for output in outputs:
            entry = self._active.get(output.request_id)
            if entry is None:
                continue  # cancelled meanwhile, or unknown to us
            entry.generated_tokens = max(entry.generated_tokens, output.generated_tokens)
            if output.finished:
                del self._active[output.request_id]
            self._send(entry, output)
        if self._active and not self.engine.has_unfinished():
            # The engine forgot requests without a final output; finish them rather than hang their clients.
            for request_id in list(self._active):
                entry = self._active.pop(request_id)
                self._deliver_error(entry, ErrorKind.GENERATION, "the engine dropped the request without finishing it")

    def _heartbeat(self) -> None:
        """While idle: let the engine check its parts (a tensor-parallel rank that died is found here)."""
        try:
            self.engine.heartbeat()
        except Exception as exc:
            self._fail(exc, "engine heartbeat failed")
            raise _EngineFailed from exc

    def _out_of_memory(self, exc: EngineOutOfMemory) -> None:
        """Finish the requests the engine names (`exc.request_ids`, if it sets that) or else every active
        one with an out-of-memory error; the engine stays in service unless it reports itself unhealthy."""
        named = getattr(exc, "request_ids", None)
        affected = [rid for rid in (named if named else list(self._active)) if rid in self._active]
        logger.warning("engine out of memory (%s); failing %d request(s)", exc, len(affected))
        for request_id in affected:
            self._cancel(request_id, FinishReason.ERROR, ErrorKind.OUT_OF_MEMORY, f"out of memory: {exc}")

    def _fail(self, exc: BaseException, what: str) -> None:
        """The engine cannot go on: log once, refuse new requests, finish every admitted one with an error."""
        reason = f"{what}: {type(exc).__name__}: {exc}"
        logger.error("%s; every active request is failed and the engine loop stops", reason, exc_info=exc)
        with self._cond:
            self._failure = reason
        self._finish_everything(ErrorKind.ENGINE_FAILED, reason)

    def _finish_everything(self, kind: ErrorKind, message: str) -> None:
        with self._cond:
            commands = list(self._inbox) + list(self._commands)
            self._inbox.clear()
            self._commands.clear()
        queued = [payload for kind, payload in commands if kind == "add"]
        for entry in list(self._active.values()) + queued:  # type: ignore[operator]
            self._active.pop(entry.request.request_id, None)
            self._deliver_error(entry, kind, message)

    def _deliver_error(self, entry: _Entry, kind: ErrorKind, message: str, field: str | None = None) -> None:
        output = LoopErrorOutput(entry.request.request_id, (), "", finished=True, finish_reason=FinishReason.ERROR,
                                 error=message, prompt_tokens=len(entry.request.prompt_token_ids),
                                 generated_tokens=entry.generated_tokens, kind=kind, field=field)
        self._send(entry, output)

    def _send(self, entry: _Entry, output: RequestOutput) -> None:
        with self._cond:
            if entry.closed:  # abort() already gave this request its final output
                return
            if output.finished:
                entry.closed = True
                self._admitted -= 1
        try:
            entry.sink(output)
        except Exception:
            # A broken consumer (closed event loop, bug) must not stop the batch: drop its request.
            logger.exception("output sink of request %s failed; cancelling it", entry.request.request_id)
            if not output.finished and entry.request.request_id in self._active:
                self._cancel(entry.request.request_id, FinishReason.CANCELLED, None, None)

    def _snapshot(self) -> None:
        """Publish engine health and stats for other threads (they must not call the engine)."""
        self._engine_health = self.engine.health()
        self._engine_stats = self.engine.stats()

    def _shutdown_engine(self) -> None:
        try:
            self.engine.shutdown()
        except Exception:
            logger.exception("engine shutdown failed")


class _EngineFailed(Exception):
    """Internal: unwinds the loop after `_fail` has reported an engine crash."""


class EventLoopMailbox:
    """Outputs crossing from the engine thread to one asyncio event loop. Each `call_soon_threadsafe` wakes the
    loop through a self-pipe write; one per token cost ~2 ms of a 128-sequence step on the engine thread
    (RESULTS.md, section 11), so a step's outputs share one wake-up: the first output posted schedules a
    drain, later ones join it until the loop has run it. Each stream still receives its outputs in order."""

    def __init__(self, aloop: asyncio.AbstractEventLoop):
        self.aloop = aloop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[RequestOutput], RequestOutput]] = []

    def post(self, queue: asyncio.Queue[RequestOutput], output: RequestOutput) -> None:
        """Engine thread. Raises RuntimeError when the event loop is closed, as call_soon_threadsafe does."""
        with self._lock:
            self._pending.append((queue, output))
            if len(self._pending) > 1:
                return  # a drain is scheduled and has not run yet
        try:
            self.aloop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            with self._lock:
                self._pending.clear()
            raise

    def _drain(self) -> None:  # event loop
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, output in pending:
            queue.put_nowait(output)


class OutputStream:
    """Async iterator over one request's outputs; ends after the final output.

    Cancelling the task that awaits it (client disconnect) or calling `aclose()` / `cancel()` before the
    final output cancels the request, so its batch slot is freed within one step."""

    def __init__(self, loop: EngineLoop, request_id: str, mailbox: EventLoopMailbox):
        self.request_id = request_id
        self._loop = loop
        self._mailbox = mailbox
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._done = False

    def deliver(self, output: RequestOutput) -> None:
        """Hand one output to the reader; called on the engine loop's thread."""
        try:
            self._mailbox.post(self._queue, output)
        except RuntimeError:
            if not self._mailbox.aloop.is_closed():
                raise
            # The server's event loop has ended (shutdown): nobody is left to read this output. Without
            # this, stopping the engine after uvicorn logged a traceback for every request it still held.

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            output = await self._queue.get()
        except BaseException:  # CancelledError: whoever waited went away
            self.cancel()
            raise
        if output.finished:
            self._done = True
        return output

    @property
    def finished(self) -> bool:
        return self._done

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            self._loop.cancel(self.request_id)

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> OutputStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()

