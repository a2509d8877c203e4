"""The client's side of one HTTP exchange: reading its body within the size limit, and noticing when it
hangs up, so that generation for a client that is gone stops at once (its batch slot is freed within one
engine step) instead of running to max_new_tokens for nobody."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from entrypoint.protocol.errors import ClientClosed, RequestTimeout, RequestTooLarge
from handlers.engine import InvalidRequest

T = TypeVar("T")


async def read_body(request: Request, limit: int, read_timeout: float | None = None) -> bytes:
    """The body, refusing more than `limit` bytes: by Content-Length up front, and by counting while reading
    (a chunked body has no Content-Length). A client that sends nothing for `read_timeout` seconds gets a
    408; one that disconnects mid-upload is a `ClientClosed` (499), not an unexpected error."""
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
    parts = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(parts.__anext__(), read_timeout)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request body stopped arriving: nothing for {read_timeout:g} s after "
                                 f"{size} bytes (request_read_timeout)") from None
        except ClientDisconnect:
            raise ClientClosed(f"the client closed the connection while sending the body ({size} bytes "
                               "received)") from None
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"the request body is more than the limit of {limit} bytes (max_request_size)")
        chunks.append(chunk)
    return b"".join(chunks)


async def wait_for_disconnect(request: Request, on_disconnect: Callable[[], None]) -> None:
    """Return (after calling `on_disconnect`) when the client closes the connection.

    Uses ASGI receive(), which after the body has been read blocks until the client disconnects, so this
    is event-driven rather than polling `request.is_disconnected()`."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return
        await asyncio.sleep(0.05)  # a stray empty body message; never spin


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work` and return its result; if the client disconnects first, cancel `work` (which cancels
    the requests it waits on) and raise `ClientClosed`."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request, lambda: None))
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
    if task.cancelled():
        raise ClientClosed("the client closed the connection before the response was ready")
    return task.result()  # re-raises a failure of `work`


class ClosingStreamingResponse(StreamingResponse):
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
