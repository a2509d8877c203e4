"""The one table from failures to HTTP responses, rendered in the error shape of each route family.

A failure has one status whatever route it happens on; only the body differs (`ErrorFamily`):
  LMI (/invocations, /predictions, /ping)  `{"error": str, "code": int, "type": str, "message": str}`: LMI's
                                           handler errors are `{"error", "code"}` and DJL Serving's own
                                           `{"code", "type", "message"}`, and LMI clients test `code != 200`
                                           (djl-serving tests/integration/llm/client.py), so both are there;
                                           `code` repeats the HTTP status, `type` is the table's name. A
                                           generation failure also has LMI's `"generated_text": null,
                                           "details": {"finish_reason": "error", ...}`; a stream that
                                           fails after its headers ends with LMI's error token line
  OpenAI (/v1/...)                         `{"error": {"message": str, "type": str, "param": str | null,
                                           "code": str}}` as api.openai.com answers: `type` is
                                           invalid_request_error for the client's mistakes and server_error
                                           for ours, `param` names the offending request field, `code` is the
                                           table's name in snake_case ("model_not_found", "queue_full", ...)
The final error object of a stream whose headers were already sent has the same shape.

Status choices, as LMI (DJL Serving) had them where it had one:
  400 invalid JSON / schema / parameter / prompt too long   (InvalidRequest; the message names the field,
                                                            the bad value and the allowed range)
  401 missing or wrong bearer token when option.api_key is set (Unauthorized)
  404 unknown model name                                    (ModelNotFound)
  408 the body did not arrive within request_read_timeout   (RequestTimeout; the connection is closed)
  413 request body over max_request_size                    (RequestTooLarge)
  503 admission limit (job_queue_size) reached, with Retry-After (QueueFull)
  503 model still loading / failed / engine unhealthy / shutting down
  424 the model failed to generate (LMI's status for model errors)
  424 predict_timeout exceeded. Not 408: 408 says the *client* was too slow to send its request, and
      HTTP clients and proxies retry 408 automatically, which would resubmit an expensive generation.
  507 the engine ran out of memory for the request (LMI's status for OOM)
  499 the client closed the connection first (nginx's status; only the access log and metrics see it)
  500 anything unexpected (the traceback goes to the log, not to the client)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Mapping

from entrypoint.protocol.schema import (LmiDetails, LmiError, LmiStreamLine, LmiToken, OpenAIError, OpenAIErrorDetail,
                                        body, build)
from handlers.engine import EngineOutOfMemory, FinishReason, InvalidRequest, RequestOutput
from handlers.engine_loop import EngineUnavailable, ErrorKind, QueueFull, error_kind


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


class RequestTimeout(TimeoutError):
    """The client did not send its body within request_read_timeout (the connection is closed after the 408)."""

    close_connection = True


class Unauthorized(PermissionError):
    """The request lacks the bearer token that option.api_key requires."""


class ClientClosed(ConnectionError):
    """The client closed the connection before the response was complete; its requests were cancelled."""


class ErrorFamily(str, Enum):
    """Which API's error body a route answers with (see the module docstring)."""

    LMI = "lmi"
    OPENAI = "openai"

    @classmethod
    def for_path(cls, path: str) -> ErrorFamily:
        return cls.OPENAI if path == "/v1" or path.startswith("/v1/") else cls.LMI


#: OpenAI's two error categories that apply here
CLIENT_ERROR = "invalid_request_error"
SERVER_ERROR = "server_error"


@dataclass(frozen=True)
class ErrorRow:
    status: int
    type: str  # LMI's name, CamelCase
    openai_type: str  # CLIENT_ERROR or SERVER_ERROR
    generation: bool = False  # the request was admitted and failed while generating

    @property
    def openai_code(self) -> str:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", self.type).lower()  # ModelNotFound -> model_not_found


# First match wins (isinstance), so subclasses come before their bases.
ERROR_TABLE: tuple[tuple[type[BaseException], ErrorRow], ...] = (
    (InvalidRequest, ErrorRow(400, "InvalidRequest", CLIENT_ERROR)),
    (Unauthorized, ErrorRow(401, "Unauthorized", CLIENT_ERROR)),
    (ModelNotFound, ErrorRow(404, "ModelNotFound", CLIENT_ERROR)),
    (RequestTimeout, ErrorRow(408, "RequestTimeout", CLIENT_ERROR)),
    (RequestTooLarge, ErrorRow(413, "RequestTooLarge", CLIENT_ERROR)),
    (ClientClosed, ErrorRow(499, "ClientClosedRequest", CLIENT_ERROR)),
    (QueueFull, ErrorRow(503, "QueueFull", SERVER_ERROR)),
    (ModelNotReady, ErrorRow(503, "ModelNotReady", SERVER_ERROR)),
    (EngineUnavailable, ErrorRow(503, "EngineUnavailable", SERVER_ERROR)),
    (ServerShuttingDown, ErrorRow(503, "ServerShuttingDown", SERVER_ERROR, generation=True)),
    (GenerationFailed, ErrorRow(424, "GenerationError", SERVER_ERROR, generation=True)),
    (PredictTimeout, ErrorRow(424, "PredictTimeout", SERVER_ERROR, generation=True)),
    (EngineOutOfMemory, ErrorRow(507, "OutOfMemory", SERVER_ERROR, generation=True)),
)
INTERNAL = ErrorRow(500, "InternalServerError", SERVER_ERROR)

#: errors the framework answers before our code runs (unknown route, wrong method, unreadable request)
FRAMEWORK_ROWS: dict[int, ErrorRow] = {
    400: ErrorRow(400, "InvalidRequest", CLIENT_ERROR),
    404: ErrorRow(404, "NotFound", CLIENT_ERROR),
    405: ErrorRow(405, "MethodNotAllowed", CLIENT_ERROR),
    413: ErrorRow(413, "RequestTooLarge", CLIENT_ERROR),
}


def row_for(exc: BaseException) -> ErrorRow:
    for exc_type, row in ERROR_TABLE:
        if isinstance(exc, exc_type):
            return row
    return INTERNAL


def row_for_status(status: int) -> ErrorRow:
    return FRAMEWORK_ROWS.get(status) or ErrorRow(status, "HTTPError", CLIENT_ERROR if status < 500 else SERVER_ERROR)


def error_body(exc: BaseException, family: ErrorFamily = ErrorFamily.LMI) -> dict:
    return body(error_model(exc, family))


def error_model(exc: BaseException, family: ErrorFamily = ErrorFamily.LMI) -> LmiError | OpenAIError:
    row = row_for(exc)
    # Unexpected exceptions may carry internals (paths, tensors); the log has the details.
    message = str(exc) if row is not INTERNAL else "internal server error; see the server log"
    return render(row, message, family, getattr(exc, "field", None))


def render(row: ErrorRow, message: str, family: ErrorFamily = ErrorFamily.LMI,
                 param: str | None = None) -> LmiError | OpenAIError:
    """The error body of `row` in `family`'s shape; `param` (the offending field) only OpenAI's shape has."""
    if family is ErrorFamily.OPENAI:
        return build(OpenAIError, error=build(OpenAIErrorDetail, message=message, type=row.openai_type, param=param,
                                              code=row.openai_code))
    if row.generation:  # LMI's non-streaming generation failure (output_formatter._json_output_formatter)
        return build(LmiError, error=message, code=row.status, type=row.type, message=message, generated_text=None,
                     details=_error_details())
    return lmi_error(row.status, row.type, message)


def lmi_error(status: int, error_type: str, message: str) -> LmiError:
    """LMI's error body (see the module docstring)."""
    return build(LmiError, error=message, code=status, type=error_type, message=message)


def make_body(status: int, error_type: str, message: str) -> dict:
    return body(lmi_error(status, error_type, message))


def _error_details() -> LmiDetails:
    """LMI's details of a failed generation (lmi_input_output_schema.md, "Error Responses")."""
    return build(LmiDetails, finish_reason="error", generated_tokens=None, inputs=None)


def lmi_stream_error(exc: BaseException) -> LmiStreamLine:
    """The last line of an LMI stream that failed after its headers: LMI's error token line
    (lmi_input_output_schema.md), which LMI clients recognise by details.finish_reason, plus the error body's
    fields."""
    error = error_model(exc)
    assert isinstance(error, LmiError)
    return build(LmiStreamLine, token=build(LmiToken, id=-1, text="", log_prob=-1, special_token=True,
                                            error_msg=error.error),
                 generated_text="", details=_error_details(), error=error.error, code=error.code, type=error.type)


_KIND_TO_EXCEPTION: dict[ErrorKind, type[Exception]] = {
    ErrorKind.GENERATION: GenerationFailed,
    ErrorKind.ENGINE_FAILED: GenerationFailed,
    ErrorKind.OUT_OF_MEMORY: EngineOutOfMemory,
    ErrorKind.TIMEOUT: PredictTimeout,
    ErrorKind.SHUTDOWN: ServerShuttingDown,
}


def exception_for_output(output: RequestOutput, fields: Mapping[str, str] | None = None) -> Exception | None:
    """The exception a final output stands for (None for a successful finish). A refusal keeps the field the
    engine named, as the API calls it (`fields` maps the engine's names to the API's)."""
    kind = error_kind(output)
    if kind is None:
        if output.finished and output.finish_reason is FinishReason.CANCELLED:  # cancelled by someone else
            return GenerationFailed("the request was cancelled")
        return None
    if kind is ErrorKind.INVALID:
        field = getattr(output, "field", None)
        return InvalidRequest(output.error or kind.value, (fields or {}).get(field or "", field))
    return _KIND_TO_EXCEPTION[kind](output.error or kind.value)
