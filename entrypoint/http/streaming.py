"""Streaming responses: choosing the format, and framing tokens as JSON lines or server-sent events.

Both formats carry the same JSON objects, LMI's:
  {"token": {"id", "text", "log_prob", "special"}}                 one per generated token
  {"token": {...}, "generated_text": "...", "details": {...}}      the last token also ends the stream
  {"error": {"message", "type", "code"}}                           a failure after the headers were sent
jsonlines writes each object on one line; SSE writes `data: <object>` events.

A token line's `text` is the text that became visible with that token, not the token's raw text: the
engine holds back text that may start a stop sequence (and incomplete UTF-8), so joining the streamed
texts gives exactly `generated_text` (without the prompt of return_full_text). The raw per-token text is
in non-streaming `details.tokens`.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from entrypoint.http.errors import error_body, exception_for_output
from entrypoint.http.lmi_protocol import Accumulator, token_dict
from handlers.serving_properties import OutputFormatter
from handlers.engine import RequestOutput


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
    """Turns one request's outputs into LMI's framed chunks (a `generation.ChunkEncoder`); `result`
    accumulates them."""

    def __init__(self, fmt: Format, result: Accumulator):
        self.fmt = fmt
        self.media_type = fmt.media_type
        self.result = result
        self.failure: BaseException | None = None  # the error sent as the stream's last object
        self._pending = ""  # visible text not yet attached to a token line

    def feed(self, index: int, output: RequestOutput) -> list[bytes]:
        self.result.add(output)
        self._pending += output.text
        error = exception_for_output(output) if output.finished else None
        objects: list[dict[str, Any]] = []
        for position, token in enumerate(output.tokens):
            last = position == len(output.tokens) - 1
            objects.append({"token": token_dict(token, text=self._pending if last else "")})
            if last:
                self._pending = ""
        if output.finished and error is None:
            if not objects:
                objects.append({})
            objects[-1]["generated_text"] = self.result.generated_text
            if self.result.params.details:
                objects[-1]["details"] = self.result.details(with_tokens=False)  # the tokens were streamed
        chunks = [frame(self.fmt, obj) for obj in objects]
        if error is not None:
            chunks += self.error(error)
        return chunks

    def error(self, exc: BaseException) -> list[bytes]:
        self.failure = exc
        return [frame(self.fmt, error_body(exc))]

    def end(self) -> list[bytes]:
        return []  # the last token line already carries generated_text
