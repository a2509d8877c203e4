"""One log line per request at completion, on logger `lmi.access`.

    request_id=9f2c... route=/invocations status=200 prompt_tokens=12 generated_tokens=64 ttft_ms=35.2
    total_ms=812.4 finish_reason=length

`ttft_ms` is from arrival to the first generated token (`-` when none was generated); for a list of
inputs the counts are sums and `finish_reason` lists each input's reason.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

from handlers.engine import RequestOutput

logger = logging.getLogger("lmi.access")


class AccessRecord:
    def __init__(self, route: str, request_id: str):
        self.route = route
        self.request_id = request_id
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.finish_reasons: list[str] = []
        self.logged = False

    def on_output(self, output: RequestOutput) -> None:
        if output.tokens and self.first_token is None:
            self.first_token = time.perf_counter()

    def finish(self, status: int, finish_reasons: Iterable[str | None] = (), generated_tokens: int | None = None,
               error_type: str | None = None) -> None:
        if self.logged:
            return
        self.logged = True
        if generated_tokens is not None:
            self.generated_tokens = generated_tokens
        reasons = ",".join(reason or "-" for reason in finish_reasons) or "-"
        ttft = "-" if self.first_token is None else f"{(self.first_token - self.started) * 1000:.1f}"
        total = (time.perf_counter() - self.started) * 1000
        logger.info("request_id=%s route=%s status=%d prompt_tokens=%d generated_tokens=%d ttft_ms=%s total_ms=%.1f "
                    "finish_reason=%s%s", self.request_id, self.route, status, self.prompt_tokens,
                    self.generated_tokens, ttft, total, reasons, f" error={error_type}" if error_type else "")
