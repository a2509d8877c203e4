"""POST /invocations and /predictions/{model}: from an LMI request to generated text (or a token stream).

Order matters for "a bad request never affects the batch": the body is read (size-checked), parsed,
validated, tokenized and checked against the engine's limits *before* anything is submitted, so a bad
request costs the running batch nothing.

What the engine must provide here (all safe to use from the server, not only from the loop thread):
  engine.tokenizer.encode(text) -> list[int]   run on one dedicated tokenizer thread, never concurrently
  engine.validate(request)                     pure check of the request against engine limits
"""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from entrypoint.http.access_log import AccessRecord
from entrypoint.http.errors import ModelNotFound, RequestTooLarge, error_response, exception_for_output, row_for
from entrypoint.http.lmi_protocol import Accumulator, build_response, parse_request
from entrypoint.http.state import ServerState
from entrypoint.http.streaming import Format, StreamEncoder, choose_format
from entrypoint.properties import ServingProperties
from handlers.engine import Engine, GenerationRequest, InvalidRequest, RequestOutput, SamplingParams
from handlers.engine_loop import OutputStream

#: status logged when the client went away before the response (nginx's "client closed request")
CLIENT_CLOSED = 499


class Predictor:
    def __init__(self, properties: ServingProperties, state: ServerState):
        self.properties = properties
        self.state = state
        # One thread: Hugging Face fast tokenizers are not safe to call concurrently, and long prompts
        # must not block the event loop.
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    async def handle(self, request: Request, route: str, model_name: str | None = None) -> Response:
        record = AccessRecord(route, uuid.uuid4().hex)
        try:
            if model_name is not None and not self.state.knows_model(model_name):
                raise ModelNotFound(f"model {model_name!r} is not served here; this server serves "
                                    f"{self.state.model_name!r}")
            body = await read_body(request, self.properties.max_request_size)
            lmi, params = parse_request(body)
            fmt = choose_format(lmi.stream, request.headers.get("accept"), self.properties.output_formatter)
            if fmt.streaming and lmi.is_batch:
                raise InvalidRequest(f"streaming ({fmt.value}) needs one string in inputs, got a list of "
                                     f"{len(lmi.inputs)}; send one request per input or set \"stream\": false",
                                     "inputs")
            loop = self.state.require_loop()
            requests = await self._requests(loop.engine, record, lmi.prompts, params)
            results = [Accumulator(request.prompt, params) for request in requests]
            streams = loop.streams(requests)  # QueueFull / EngineUnavailable raise here, before any output
            try:
                if fmt.streaming:
                    return await self._stream(request, streams[0], results[0], fmt, record)
                return await self._respond(request, streams, results, lmi.is_batch, record)
            except BaseException:
                for stream in streams:  # whatever went wrong, free the batch slots
                    stream.cancel()
                raise
        except Exception as exc:
            row = row_for(exc)
            record.finish(row.status, error_type=row.type)
            return error_response(exc)

    async def _requests(self, engine: Engine, record: AccessRecord, prompts: list[str],
                        params: SamplingParams) -> list[GenerationRequest]:
        requests = []
        for index, prompt in enumerate(prompts):
            ids = await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, _encode, engine, prompt)
            request_id = record.request_id if len(prompts) == 1 else f"{record.request_id}-{index}"
            requests.append(GenerationRequest(request_id, prompt, ids, params))
        for index, generation in enumerate(requests):
            try:
                engine.validate(generation)
            except InvalidRequest as exc:
                if len(requests) > 1:  # say which input of the list is the problem
                    raise InvalidRequest(f"inputs[{index}]: {exc}", exc.field) from None
                raise
        record.prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
        return requests

    async def _respond(self, request: Request, streams: list[OutputStream], results: list[Accumulator],
                       batch: bool, record: AccessRecord) -> Response:
        errors: list[Exception] = []

        async def drain(stream: OutputStream, result: Accumulator) -> None:
            async for output in stream:
                record.on_output(output)
                result.add(output)
                error = exception_for_output(output) if output.finished else None
                if error is not None:
                    errors.append(error)
                    for other in streams:  # one failed input fails the whole response: stop the rest
                        other.cancel()

        async def all_done() -> None:
            await asyncio.gather(*(drain(s, r) for s, r in zip(streams, results, strict=True)))

        completed = await _unless_disconnected(request, all_done())
        for stream in streams:
            stream.cancel()  # no-op for finished ones
        generated = sum(r.generated_tokens for r in results)
        if not completed:
            record.finish(CLIENT_CLOSED, ["cancelled"], generated)
            return Response(status_code=CLIENT_CLOSED)
        if errors:
            row = row_for(errors[0])
            record.finish(row.status, [r.finish_reason.value if r.finish_reason else None for r in results],
                          generated, error_type=row.type)
            return error_response(errors[0])
        record.finish(200, [r.finish_reason.value if r.finish_reason else None for r in results], generated)
        return JSONResponse(build_response(results, batch), headers={"X-Request-Id": record.request_id})

    async def _stream(self, request: Request, stream: OutputStream, result: Accumulator, fmt: Format,
                      record: AccessRecord) -> Response:
        # Wait for the first output before sending headers, so that failures before any token (out of
        # memory in prefill, timeout while queued, engine crash) still get their own status code.
        holder: list = []

        async def first_output() -> None:
            holder.append(await stream.__anext__())
            record.on_output(holder[0])

        if not await _unless_disconnected(request, first_output()):
            stream.cancel()
            record.finish(CLIENT_CLOSED, ["cancelled"])
            return Response(status_code=CLIENT_CLOSED)
        first = holder[0]
        error = exception_for_output(first) if first.finished else None
        if error is not None:
            raise error
        encoder = StreamEncoder(fmt, result)

        def closed() -> None:  # also when the body was never iterated (client gone before the headers)
            stream.cancel()
            record.finish(CLIENT_CLOSED, ["cancelled"], result.generated_tokens)

        return _ClosingStreamingResponse(
            self._body(request, stream, first, encoder, record), on_close=closed, media_type=fmt.media_type,
            headers={"X-Request-Id": record.request_id, "Cache-Control": "no-cache"})

    async def _body(self, request: Request, stream: OutputStream, first: RequestOutput, encoder: StreamEncoder,
                    record: AccessRecord) -> AsyncIterator[bytes]:
        disconnected = asyncio.Event()

        def client_gone() -> None:
            disconnected.set()
            stream.cancel()

        watcher = asyncio.ensure_future(_wait_for_disconnect(request, client_gone))
        try:
            output = first
            while True:
                record.on_output(output)
                for chunk in encoder.feed(output):
                    yield chunk
                if output.finished or stream.finished:
                    break
                output = await stream.__anext__()
        except Exception as exc:  # headers are out: the error goes into the stream
            yield encoder.error(exc)
        finally:
            watcher.cancel()
            stream.cancel()
            # The status the client effectively got (the status line already said 200).
            status = CLIENT_CLOSED if disconnected.is_set() else \
                row_for(encoder.failure).status if encoder.failure is not None else 200
            reason = encoder.result.finish_reason.value if encoder.result.finish_reason else "cancelled"
            record.finish(status, [reason], encoder.result.generated_tokens)


class _ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that runs `on_close` however sending ends. Starlette never starts the body
    generator if sending the headers fails, and then the generator's own cleanup would never run."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _encode(engine: Engine, prompt: str) -> list[int]:
    return list(engine.tokenizer.encode(prompt))


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than `limit` bytes: by Content-Length up front, and by counting while reading
    (a chunked body has no Content-Length)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidRequest(f"the Content-Length header {declared!r} is not a number") from None
        if size > limit:
            raise RequestTooLarge(f"the request body is {size} bytes, more than the limit of {limit} bytes "
                                  "(max_request_size)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"the request body is more than the limit of {limit} bytes (max_request_size)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _wait_for_disconnect(request: Request, on_disconnect: Callable[[], None]) -> None:
    """Return (after calling `on_disconnect`) when the client closes the connection.

    Uses ASGI receive(), which after the body has been read blocks until the client disconnects, so this
    is event-driven rather than polling `request.is_disconnected()`."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return
        await asyncio.sleep(0.05)  # a stray empty body message; never spin


async def _unless_disconnected(request: Request, work: Awaitable[None]) -> bool:
    """Run `work`; if the client disconnects first, cancel it (which cancels its requests) and return False."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request, lambda: None))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
    if task.done() and not task.cancelled():
        task.result()  # re-raise an unexpected failure
        return True
    return False
