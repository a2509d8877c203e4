"""The one table from failures to HTTP responses, and the one error body shape.

Every error response (and the final error line of a stream whose headers were already sent) is
`{"error": {"message": str, "type": str, "code": int}}`, where `code` repeats the HTTP status.

Status choices, as LMI (DJL Serving) had them where it had one:
  400 invalid JSON / schema / parameter / prompt too long   (InvalidRequest; the message names the field,
                                                            the bad value and the allowed range)
  404 unknown model name                                    (ModelNotFound)
  413 request body over max_request_size                    (RequestTooLarge)
  503 admission limit (job_queue_size) reached, with Retry-After (QueueFull)
  503 model still loading / failed / engine unhealthy / shutting down
  424 the model failed to generate (LMI's status for model errors)
  424 predict_timeout exceeded. Not 408: 408 says the *client* was too slow to send its request, and
      HTTP clients and proxies retry 408 automatically, which would resubmit an expensive generation.
  507 the engine ran out of memory for the request (LMI's status for OOM)
  500 anything unexpected (the traceback goes to the log, not to the client)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from handlers.engine import EngineOutOfMemory, FinishReason, InvalidRequest, RequestOutput
from handlers.engine_loop import EngineUnavailable, ErrorKind, QueueFull, error_kind

logger = logging.getLogger("lmi.http")


class ModelNotFound(LookupError):
    """The path names a model this server does not serve."""


class RequestTooLarge(ValueError):
    """The request body is larger than max_request_size."""


class ModelNotReady(RuntimeError):
    """The model is loading or failed to load; `retry_after` is set while loading."""

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class GenerationFailed(RuntimeError):
    """The engine finished the request with an error."""


class PredictTimeout(RuntimeError):
    """The request ran past predict_timeout and was cancelled."""


class ServerShuttingDown(RuntimeError):
    """The server stopped while the request was active."""


@dataclass(frozen=True)
class ErrorRow:
    status: int
    type: str


# First match wins (isinstance), so subclasses come before their bases.
ERROR_TABLE: tuple[tuple[type[BaseException], ErrorRow], ...] = (
    (InvalidRequest, ErrorRow(400, "InvalidRequest")),
    (ModelNotFound, ErrorRow(404, "ModelNotFound")),
    (RequestTooLarge, ErrorRow(413, "RequestTooLarge")),
    (QueueFull, ErrorRow(503, "QueueFull")),
    (ModelNotReady, ErrorRow(503, "ModelNotReady")),
    (EngineUnavailable, ErrorRow(503, "EngineUnavailable")),
    (ServerShuttingDown, ErrorRow(503, "ServerShuttingDown")),
    (GenerationFailed, ErrorRow(424, "GenerationError")),
    (PredictTimeout, ErrorRow(424, "PredictTimeout")),
    (EngineOutOfMemory, ErrorRow(507, "OutOfMemory")),
)
INTERNAL = ErrorRow(500, "InternalServerError")


def row_for(exc: BaseException) -> ErrorRow:
    for exc_type, row in ERROR_TABLE:
        if isinstance(exc, exc_type):
            return row
    return INTERNAL


def error_body(exc: BaseException) -> dict:
    row = row_for(exc)
    # Unexpected exceptions may carry internals (paths, tensors); the log has the details.
    message = str(exc) if row is not INTERNAL else "internal server error; see the server log"
    return make_body(row.status, row.type, message)


def make_body(status: int, error_type: str, message: str) -> dict:
    return {"error": {"message": message, "type": error_type, "code": status}}


def error_response(exc: BaseException) -> JSONResponse:
    row = row_for(exc)
    if row is INTERNAL:
        logger.error("unexpected error", exc_info=exc)
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if row.status == 503 and retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return JSONResponse(error_body(exc), status_code=row.status, headers=headers)


_KIND_TO_EXCEPTION: dict[ErrorKind, type[Exception]] = {
    ErrorKind.INVALID: InvalidRequest,
    ErrorKind.GENERATION: GenerationFailed,
    ErrorKind.ENGINE_FAILED: GenerationFailed,
    ErrorKind.OUT_OF_MEMORY: EngineOutOfMemory,
    ErrorKind.TIMEOUT: PredictTimeout,
    ErrorKind.SHUTDOWN: ServerShuttingDown,
}


def exception_for_output(output: RequestOutput) -> Exception | None:
    """The exception a final output stands for (None for a successful finish)."""
    kind = error_kind(output)
    if kind is None:
        if output.finished and output.finish_reason is FinishReason.CANCELLED:  # cancelled by someone else
            return GenerationFailed("the request was cancelled")
        return None
    return _KIND_TO_EXCEPTION[kind](output.error or kind.value)
