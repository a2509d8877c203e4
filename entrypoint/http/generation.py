"""From submitted engine requests to the HTTP response, shared by the LMI and OpenAI routes: collect every
output into one JSON body, or stream them; either way a client that goes away cancels the requests.

The protocol (`entrypoint.protocol`) says how outputs look on the wire (a `ChunkEncoder` for streams, a body
builder for JSON); how outputs are awaited, how failures end a response, and how disconnects cancel requests
is here, once. Every engine request of one HTTP request succeeds or the response fails: the first failure
cancels the others (LMI's list inputs and OpenAI's n > 1 alike).
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from entrypoint.http.access_log import CLIENT_CLOSED, AccessRecord
from entrypoint.http.client_connection import ClosingStreamingResponse, until_disconnect, wait_for_disconnect
from entrypoint.protocol.errors import INTERNAL, ErrorFamily, error_body, row_for
from entrypoint.protocol.prepare import Prepared
from entrypoint.protocol.streaming import ChunkEncoder
from handlers.engine import RequestOutput
from handlers.engine_loop import OutputStream

logger = logging.getLogger("lmi.http")


async def answer(record: AccessRecord, family: ErrorFamily, work: Callable[[], Awaitable[Response]]) -> Response:
    """Run `work`; any failure becomes the error table's response in `family`'s shape, and is logged."""
    try:
        return await work()
    except Exception as exc:
        row = row_for(exc)
        record.finish(row.status, error_type=row.type)
        return error_response(exc, family)


def error_response(exc: BaseException, family: ErrorFamily = ErrorFamily.LMI) -> JSONResponse:
    row = row_for(exc)
    if row is INTERNAL:
        logger.error("unexpected error", exc_info=exc)
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if row.status == 503 and retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if getattr(exc, "close_connection", False):  # the rest of the body may still come: do not read it as a request
        headers["Connection"] = "close"
    return JSONResponse(error_body(exc, family), status_code=row.status, headers=headers)


async def respond(request: Request, prepared: Prepared, record: AccessRecord) -> Response:
    """Submit the prepared request and answer it: a stream through its encoder, or else its JSON body once
    every output is in. Raises the first failure (or `ClientClosed`) for `answer`; whatever goes wrong, no
    request is left running."""
    streams = prepared.loop.streams(prepared.requests)  # QueueFull / EngineUnavailable raise here, before any output
    record.admit(prepared.requests)
    merged = OutputMerge(streams)
    headers = {"X-Request-Id": record.request_id}
    try:
        if prepared.encoder is not None:
            return await _stream(request, merged, prepared, prepared.encoder, record, headers)
        await until_disconnect(request, _collect(merged, prepared, record))
        record.finish(200)
        return JSONResponse(prepared.body(), headers=headers)
    except BaseException:
        merged.cancel()
        raise


async def _collect(merged: OutputMerge, prepared: Prepared, record: AccessRecord) -> None:
    async for index, output in merged:
        record.on_output(output)
        prepared.results[index].add(output)
        error = prepared.failure(output)
        if error is not None:
            raise error  # `respond` cancels the others


async def _stream(request: Request, merged: OutputMerge, prepared: Prepared, encoder: ChunkEncoder,
                  record: AccessRecord, headers: dict[str, str]) -> Response:
    # Wait for the first output before sending headers, so that failures before any token (out of
    # memory in prefill, timeout while queued, engine crash) still get their own status code.
    first = await until_disconnect(request, merged.__anext__())
    error = prepared.failure(first[1])
    if error is not None:
        record.on_output(first[1])
        raise error

    def closed() -> None:  # also when the body was never iterated (client gone before the headers)
        merged.cancel()
        record.finish(CLIENT_CLOSED)

    return ClosingStreamingResponse(_body(request, merged, first, encoder, record), on_close=closed,
                                    media_type=encoder.media_type,
                                    headers={**headers, "X-Request-Id": record.request_id, "Cache-Control": "no-cache"})


async def _body(request: Request, merged: OutputMerge, first: tuple[int, RequestOutput], encoder: ChunkEncoder,
                record: AccessRecord) -> AsyncIterator[bytes]:
    disconnected = asyncio.Event()

    def client_gone() -> None:
        disconnected.set()
        merged.cancel()

    watcher = asyncio.ensure_future(wait_for_disconnect(request, client_gone))
    ended = False  # the stream was sent to its end (or to its error object)
    try:
        item: tuple[int, RequestOutput] | None = first
        while item is not None:
            record.on_output(item[1])
            for chunk in encoder.feed(*item):
                yield chunk
            if encoder.failure is not None:
                break
            item = await anext(merged, None)
        else:
            for chunk in encoder.end():
                yield chunk
        ended = True
    except Exception as exc:  # headers are out: the error goes into the stream
        for chunk in encoder.error(exc):
            yield chunk
        ended = True
    finally:
        watcher.cancel()
        merged.cancel()
        # The status the client effectively got (the status line already said 200). Not ended: the server
        # stopped iterating this body (cancelled or closed it) because the client went away.
        failure = encoder.failure
        if disconnected.is_set() or not ended:
            record.finish(CLIENT_CLOSED)
        elif failure is not None:
            record.finish(row_for(failure).status, error_type=row_for(failure).type)
        else:
            record.finish(200)


class OutputMerge:
    """One async iterator over several requests' outputs, as (index, output) in arrival order; it ends when
    every request has finished. `cancel()` cancels every request not finished yet."""

    def __init__(self, streams: list[OutputStream]):
        self.streams = streams
        self._queue: asyncio.Queue[tuple[int, RequestOutput | None]] = asyncio.Queue()
        self._open = len(streams)
        self._cancelled = False
        # One stream needs no pump task: read it directly (the common case, one task less per request).
        self._pumps = [asyncio.ensure_future(self._pump(i, s)) for i, s in enumerate(streams)] \
            if len(streams) > 1 else []

    async def _pump(self, index: int, stream: OutputStream) -> None:
        try:
            async for output in stream:
                self._queue.put_nowait((index, output))
        finally:
            self._queue.put_nowait((index, None))

    def __aiter__(self) -> OutputMerge:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._pumps:
            return 0, await self.streams[0].__anext__()  # StopAsyncIteration after the final output
        while self._open and not self._cancelled:
            index, output = await self._queue.get()
            if output is not None:
                return index, output
            self._open -= 1
        raise StopAsyncIteration

    def cancel(self) -> None:
        if self._pumps and not self._cancelled:
            self._queue.put_nowait((-1, None))  # wakes a waiting reader: a pump cancelled unstarted sends nothing
        self._cancelled = True
        for pump in self._pumps:
            pump.cancel()
        for stream in self.streams:
            stream.cancel()  # a no-op for finished ones
