"""Streaming responses: choosing the format, and framing tokens as JSON lines or server-sent events.

Both formats carry the same JSON objects, LMI's (djl_python output_formatter.py):
  {"token": {"id", "text", "log_prob"[, "special_token"]}}            one per generated token
  {"token": {...}, "generated_text": "...", "details": {...}}          the last token also ends the stream
  {"token": {"id": -1, "text": "", "log_prob": -1, "special_token": true, "error_msg"}, "generated_text": "",
   "details": {"finish_reason": "error", ...}, "error", "code", "type"} a failure after the headers were sent
jsonlines writes each object on one line; SSE writes `data: <object>` events.

A list of inputs streams as LMI's dynamic-batching handlers stream a batch (djl_python's streaming
utilities): one object per generation step, `{"outputs": [<token text of input 0>, <of input 1>, ...]}` in
input order, where an input that has finished gives an empty string; line i holds each input's i-th
visible token, so there are at most max_new_tokens lines (`BatchStreamEncoder`).

A token line's `text` is that token's own text. A token is sent once the engine made its text visible
(the engine holds back text that may start a stop sequence, and incomplete UTF-8), and the tokens of a
stop sequence, which the output leaves out, are cut (`lmi.TokenAligner`): joining the streamed
texts gives exactly `generated_text` (without the prompt of return_full_text), as in `details.tokens`.
"""

from __future__ import annotations

import collections
import json
from enum import Enum
from typing import Any, Protocol

from entrypoint.protocol.errors import exception_for_output, lmi_stream_error
from entrypoint.protocol.lmi import Accumulator, token_dict
from entrypoint.protocol.schema import body
from handlers.serving_properties import OutputFormatter
from handlers.engine import RequestOutput


class ChunkEncoder(Protocol):
    """Frames one response's outputs as a stream."""

    media_type: str
    failure: BaseException | None  # set by `error`: the stream ended with this error object

    def feed(self, index: int, output: RequestOutput) -> list[bytes]:
        """Chunks for output `output` of engine request `index` (ending with `error(...)` on an error finish)."""

    def error(self, exc: BaseException) -> list[bytes]:
        """The chunks that end a stream with `exc` (the headers already said 200)."""

    def end(self) -> list[bytes]:
        """The chunks after every request finished (OpenAI's usage chunk and `[DONE]`)."""


class Format(str, Enum):
    JSON = "json"
    JSONLINES = "jsonlines"
    SSE = "sse"

    @property
    def media_type(self) -> str:
        return {Format.JSON: "application/json", Format.JSONLINES: "application/jsonlines",
                Format.SSE: "text/event-stream"}[self]

    @property
    def streaming(self) -> bool:
        return self is not Format.JSON


def choose_format(stream: bool | None, accept: str | None, default: OutputFormatter) -> Format:
    """Which response format a request gets.

    1. `"stream": false` in the body always gives JSON (the client asked for one response).
    2. An Accept header naming text/event-stream or application/jsonlines picks that stream format.
    3. `"stream": true` streams in output_formatter's format, jsonlines when that is json.
    4. Otherwise output_formatter decides (json unless the deployment set jsonlines or sse)."""
    if stream is False:
        return Format.JSON
    accepted = (accept or "").lower()
    if "text/event-stream" in accepted:
        return Format.SSE
    if "application/jsonlines" in accepted or "application/x-ndjson" in accepted or "application/jsonl" in accepted:
        return Format.JSONLINES
    configured = Format(default.value)
    if stream:
        return configured if configured.streaming else Format.JSONLINES
    return configured


def frame(fmt: Format, obj: dict[str, Any]) -> bytes:
    text = json.dumps(obj, ensure_ascii=False)
    if fmt is Format.SSE:
        return f"data: {text}\n\n".encode()
    return (text + "\n").encode()


class StreamEncoder:
    """Turns one request's outputs into LMI's framed chunks (a `ChunkEncoder`); `result`
    accumulates them."""

    def __init__(self, fmt: Format, result: Accumulator):
        self.fmt = fmt
        self.media_type = fmt.media_type
        self.result = result
        self.failure: BaseException | None = None  # the error sent as the stream's last object

    def feed(self, index: int, output: RequestOutput) -> list[bytes]:
        error = exception_for_output(output) if output.finished else None
        released = self.result.add(output)
        objects: list[dict[str, Any]] = [{"token": token_dict(token)} for token in released]
        if output.finished and error is None:
            if not objects:  # every token of this output was cut (a stop sequence): LMI's last line has a token
                objects.append({"token": token_dict(output.tokens[-1], text="")} if output.tokens else {})
            objects[-1]["generated_text"] = self.result.generated_text
            if self.result.params.details:
                objects[-1]["details"] = body(self.result.details(with_tokens=False))  # the tokens were streamed
        chunks = [frame(self.fmt, obj) for obj in objects]
        if error is not None:
            chunks += self.error(error)
        return chunks

    def error(self, exc: BaseException) -> list[bytes]:
        self.failure = exc
        return [frame(self.fmt, body(lmi_stream_error(exc)))]

    def end(self) -> list[bytes]:
        return []  # the last token line already carries generated_text


class BatchStreamEncoder:
    """A list of inputs as one stream of `{"outputs": [...]}` lines (a `ChunkEncoder`): the i-th
    line carries each input's i-th visible token text, sent once every input still generating has its i-th
    token; `results` accumulate the outputs as for a JSON answer."""

    def __init__(self, fmt: Format, results: list[Accumulator]):
        self.fmt = fmt
        self.media_type = fmt.media_type
        self.results = results
        self.failure: BaseException | None = None
        self._pending: list[collections.deque[str]] = [collections.deque() for _ in results]
        self._finished = [False] * len(results)

    def feed(self, index: int, output: RequestOutput) -> list[bytes]:
        error = exception_for_output(output) if output.finished else None
        if error is not None:
            return self.error(error)
        self._pending[index].extend(token.text for token in self.results[index].add(output))
        self._finished[index] = output.finished
        return self._lines()

    def _lines(self) -> list[bytes]:
        """The lines every input has its token for (or has finished); a line of nothing but empty texts (an
        end-of-sequence token everywhere) is not sent."""
        lines = []
        while any(self._pending) and all(p or done for p, done in zip(self._pending, self._finished)):
            texts = [p.popleft() if p else "" for p in self._pending]
            if any(texts):
                lines.append(frame(self.fmt, {"outputs": texts}))
        return lines

    def error(self, exc: BaseException) -> list[bytes]:
        """The batch fails as a whole (its requests are cancelled): the complete lines, then the error."""
        self.failure = exc
        return self._lines() + [frame(self.fmt, body(lmi_stream_error(exc)))]

    def end(self) -> list[bytes]:
        return self._lines()
