"""The OpenAPI document (/openapi.json, /docs): every route with its real request model, its response
models and its error shapes, so clients and fuzzers (schemathesis) can discover the API.

The routes read their bodies themselves (`read_body`: size limits, our own error messages), so FastAPI does
not see the request models; they are attached here: request bodies are the models the routes validate with
(`LmiRequest` + `LmiParameters`, `CompletionRequest`, `ChatCompletionRequest`), responses are the models
that build every response body (`entrypoint.protocol.schema`); tests/unit/test_openapi.py also validates
real responses against them (extra fields forbidden).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from entrypoint.protocol.lmi import LmiParameters, LmiRequest
from entrypoint.protocol.openai import ChatCompletionRequest, CompletionRequest
from entrypoint.protocol.schema import (ChatCompletion, Completion, LmiError, LmiResponse, LmiStreamLine, ModelCard,
                                        ModelList, Models, OpenAIError, PingOk, PingUnavailable)


class LmiInvocation(LmiRequest):
    """LMI's request (`parameters` typed for the document; unknown fields are accepted and ignored)."""

    parameters: LmiParameters | None = None

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
