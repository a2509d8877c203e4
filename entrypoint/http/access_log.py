"""One log line per generation request at completion, on logger `lmi.access`, and the hook metrics use.

    request_id=9f2c... route=/invocations status=200 prompt_tokens=12 generated_tokens=64 ttft_ms=35.2
    total_ms=812.4 finish_reason=length

`ttft_ms` is from arrival to the first generated token (`-` when none was generated); for a list of
inputs (or OpenAI's n > 1) the counts are sums and `finish_reason` lists each engine request's reason.

Every generation route (/invocations, /predictions, /v1/completions, /v1/chat/completions) goes through
an `AccessRecord`, so it is also where the metrics observe requests: an optional `RequestObserver` hears
each token's timing as it arrives and each request's end, whichever route and whichever way it ended.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol, Sequence

from handlers.engine import GenerationRequest, RequestOutput

logger = logging.getLogger("lmi.access")

#: status logged when the client went away before the response (nginx's "client closed request")
CLIENT_CLOSED = 499


class RequestObserver(Protocol):
    def first_token(self, seconds: float) -> None:
        """Time from the request's arrival to its first generated token."""

    def inter_token(self, seconds: float) -> None:
        """Time between two consecutive tokens of one engine request."""

    def finished(self, record: AccessRecord, status: int) -> None:
        """The request ended with `status` (once per record)."""


class AccessRecord:
    def __init__(self, route: str, request_id: str, observer: RequestObserver | None = None):
        self.route = route
        self.request_id = request_id
        self.observer = observer
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.ended: float | None = None
        self.prompt_tokens = 0
        self.admitted = False  # the engine requests were submitted (tokens and latency only count then)
        self._order: list[str] = []  # engine request ids, in input order
        self._generated: dict[str, int] = {}
        self._reasons: dict[str, str] = {}
        self._last_token: dict[str, float] = {}
        self.logged = False

    def admit(self, requests: Sequence[GenerationRequest]) -> None:
        self.admitted = True
        self._order = [request.request_id for request in requests]
        self.prompt_tokens = sum(len(request.prompt_token_ids) for request in requests)

    @property
    def generated_tokens(self) -> int:
        return sum(self._generated.values())

    @property
    def duration(self) -> float:
        return (self.ended or time.perf_counter()) - self.started

    def on_output(self, output: RequestOutput) -> None:
        rid = output.request_id
        self._generated[rid] = max(self._generated.get(rid, 0), output.generated_tokens, len(output.tokens))
        if output.finished and output.finish_reason is not None:
            self._reasons[rid] = output.finish_reason.value
        if not output.tokens:
            return
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
            if self.observer is not None:
                self.observer.first_token(now - self.started)
        last = self._last_token.get(rid)
        self._last_token[rid] = now
        if last is not None and self.observer is not None:
            for _ in output.tokens:
                self.observer.inter_token((now - last) / len(output.tokens))

    def finish(self, status: int, error_type: str | None = None) -> None:
        """Log the line and tell the observer; only the first call counts (a stream may end several ways)."""
        if self.logged:
            return
        self.logged = True
        self.ended = time.perf_counter()
        unfinished = "cancelled" if status == CLIENT_CLOSED else "-"
        reasons = ",".join(self._reasons.get(rid, unfinished) for rid in self._order) or "-"
        ttft = "-" if self.first_token is None else f"{(self.first_token - self.started) * 1000:.1f}"
        logger.info("request_id=%s route=%s status=%d prompt_tokens=%d generated_tokens=%d ttft_ms=%s total_ms=%.1f "
                    "finish_reason=%s%s", self.request_id, self.route, status, self.prompt_tokens,
                    self.generated_tokens, ttft, self.duration * 1000, reasons,
                    f" error={error_type}" if error_type else "")
        if self.observer is not None:
            self.observer.finished(self, status)
