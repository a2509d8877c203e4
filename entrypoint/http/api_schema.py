"""The OpenAPI document (/openapi.json, /docs): every route with its real request model, its response
models and its error shapes, so clients and fuzzers (schemathesis) can discover the API.

The routes read their bodies themselves (`read_body`: size limits, our own error messages), so FastAPI does
not see the request models; they are attached here: request bodies are the models the routes validate with
(`LmiRequest` + `LmiParameters`, `CompletionRequest`, `ChatCompletionRequest`), responses are the models
below. The response models describe what `lmi_protocol`, `streaming`, `openai_response` and `errors` write;
tests/unit/test_openapi.py validates real responses against them (extra fields forbidden) so the document
cannot drift from the code.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from entrypoint.protocol.lmi import LmiParameters, LmiRequest
from entrypoint.protocol.openai import ChatCompletionRequest, CompletionRequest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- LMI ----------------------------------------------------------------------------------------------
class LmiInvocation(LmiRequest):
    """LMI's request (`parameters` typed for the document; unknown fields are accepted and ignored)."""

    parameters: LmiParameters | None = None


class LmiToken(_Strict):
    id: int
    text: str
    log_prob: float | None = Field(description="null where there is none (the first prompt token)")
    special_token: Literal[True] | None = Field(None, description="present (true) only for special tokens")
    error_msg: str | None = Field(None, description="only on a stream's error line")


class LmiSequence(_Strict):
    """One of the other sequences of n / best_of (LMI's BestOfSequence)."""

    generated_text: str
    finish_reason: Literal["length", "eos_token", "stop_sequence"] | None
    generated_tokens: int
    tokens: list[LmiToken]
    top_tokens: list[list[LmiToken]] | None = None
    prefill: list[LmiToken] | None = None


class LmiDetails(_Strict):
    finish_reason: Literal["length", "eos_token", "stop_sequence", "error"] | None
    generated_tokens: int | None
    inputs: str | None
    tokens: list[LmiToken] | None = Field(None, description="not streamed: the tokens came line by line")
    top_tokens: list[list[LmiToken]] | None = Field(None, description="with top_n_tokens")
    prefill: list[LmiToken] | None = Field(None, description="with decoder_input_details")
    best_of_sequences: list[LmiSequence] | None = Field(None, description="with n > 1: the next best sequences")


class LmiResponse(_Strict):
    generated_text: str
    details: LmiDetails | None = Field(None, description="with parameters.details")


class LmiStreamLine(_Strict):
    """One line of a jsonlines stream (an SSE event's data): a token; the last also has generated_text and
    details; a failure after the headers ends the stream with LMI's error line (error, code, type)."""

    token: LmiToken | None = None
    generated_text: str | None = None
    details: LmiDetails | None = None
    error: str | None = None
    code: int | None = None
    type: str | None = None


class LmiError(_Strict):
    """LMI's error body: `error` and `code` as LMI's handlers answer, `type` and `message` as DJL Serving's;
    a generation failure also has generated_text null and details.finish_reason "error"."""

    error: str
    code: int
    type: str
    message: str
    generated_text: None = None
    details: LmiDetails | None = None


class PingOk(_Strict):
    status: Literal["healthy"]


class PingUnavailable(LmiError):
    status: str
    phase: str
    progress: str


class ModelEntry(_Strict):
    modelName: str
    status: Literal["LOADING", "READY", "FAILED"]
    progress: str | None = None
    error: str | None = None
    engine: str | None = None
    maxTotalTokens: int | None = None
    healthy: bool | None = None


class Models(_Strict):
    models: list[ModelEntry]


# ---- OpenAI -----------------------------------------------------------------------------------------------
class Usage(_Strict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Strict):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Strict):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class Completion(_Strict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Strict):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Strict):
    content: list[ChatTokenLogprob]
    refusal: None


class ChatMessage(_Strict):
    role: Literal["assistant"]
    content: str
    refusal: None


class ChatChoice(_Strict):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(_Strict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class OpenAIErrorDetail(_Strict):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None
    code: str


class OpenAIError(_Strict):
    error: OpenAIErrorDetail


class ModelCard(_Strict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(_Strict):
    object: Literal["list"]
    data: list[ModelCard]


# ---- the document -------------------------------------------------------------------------------------------
_REQUESTS: dict[str, type[BaseModel]] = {
    "/invocations": LmiInvocation,
    "/predictions/{model_name}": LmiInvocation,
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
}
_LMI_ERRORS = {400: "invalid request (the message names the field)", 404: "unknown model",
               413: "body over max_request_size", 424: "generation failed or timed out",
               503: "queue full (Retry-After), loading or unhealthy", 507: "out of memory",
               500: "unexpected error"}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(model: type[BaseModel], statuses: tuple[int, ...]) -> dict[str, Any]:
    return {str(status): {"description": _LMI_ERRORS[status], "content": _json(_ref(model))} for status in statuses}


#: one server-sent event (the fields of the SSE wire format); its `data` is a JSON chunk or `[DONE]`
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                             "retry": {"type": "integer"}}}


def _responses(path: str) -> dict[str, Any]:
    if path in ("/invocations", "/predictions/{model_name}"):
        line = _ref(LmiStreamLine)
        ok = {"description": "generated text: an object for a string input, a list for a list input; or a token "
                             "stream (stream, Accept or option.output_formatter)",
              "content": {**_json({"anyOf": [_ref(LmiResponse), {"type": "array", "items": _ref(LmiResponse)}]}),
                          "application/jsonlines": {"schema": line},
                          "text/event-stream": {"schema": line}}}
        statuses = (400, 404, 413, 424, 500, 503, 507) if "{" in path else (400, 413, 424, 500, 503, 507)
        return {"200": ok, **_errors(LmiError, statuses)}
    response = Completion if path == "/v1/completions" else ChatCompletion
    ok = {"description": "the completion, or server-sent chunks with stream: true",
          "content": {**_json(_ref(response)), "text/event-stream": {"schema": _SSE_EVENT}}}
    return {"200": ok, **_errors(OpenAIError, (400, 404, 413, 424, 500, 503, 507))}


_GET_RESPONSES: dict[str, dict[str, Any]] = {
    "/ping": {"200": {"description": "healthy", "content": _json(_ref(PingOk))},
              "503": {"description": "loading, failed or unhealthy", "content": _json(_ref(PingUnavailable))}},
    "/models": {"200": {"description": "the served model", "content": _json(_ref(Models))}},
    "/v1/models": {"200": {"description": "the served model", "content": _json(_ref(ModelList))}},
    "/v1/models/{model_name}": {"200": {"description": "the served model", "content": _json(_ref(ModelCard))},
                                "404": {"description": "unknown model", "content": _json(_ref(OpenAIError))}},
    "/metrics": {"200": {"description": "Prometheus text format",
                         "content": {"text/plain": {"schema": {"type": "string"}}}}},
}

_DOCUMENTED = (LmiInvocation, CompletionRequest, ChatCompletionRequest, LmiResponse, LmiStreamLine, LmiError,
               PingOk, PingUnavailable, Models, Completion, ChatCompletion, OpenAIError, ModelCard, ModelList)


def install(app: FastAPI) -> None:
    """Serve the document at /openapi.json (and Swagger UI at /docs), built once on first use."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build(app: FastAPI) -> dict[str, Any]:
    document = get_openapi(title=app.title, version=app.version, routes=app.routes,
                           description="LMI (/invocations, /predictions) and OpenAI-compatible (/v1) APIs. Unknown "
                                       "request fields are accepted and ignored.")
    modes = [(model, "validation" if model in _REQUESTS.values() else "serialization") for model in _DOCUMENTED]
    _, schemas = models_json_schema(modes, ref_template="#/components/schemas/{model}")
    components = document.setdefault("components", {}).setdefault("schemas", {})
    components.update(schemas.get("$defs", {}))
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "post" and path in _REQUESTS:
                operation["requestBody"] = {"required": True, "content": _json(_ref(_REQUESTS[path]))}
                operation["responses"] = _responses(path)
            elif method == "get" and path in _GET_RESPONSES:
                operation["responses"] = _GET_RESPONSES[path]
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422, which no route answers (400 here)
        components.pop(unused, None)
    return document
