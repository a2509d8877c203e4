"""The FastAPI app: routes only; the work is in `predict`, the state in `state`, the errors in `errors`.

Routes (LMI / DJL Serving's, as SageMaker calls them):
  GET  /ping                      200 {"status": "healthy"} once the model is loaded and the engine healthy;
                                  503 with the phase, progress or failure otherwise (answered while loading)
  POST /invocations               LMI request -> generated text (JSON) or a token stream (jsonlines / SSE)
  POST /predictions/{model_name}  the same, for the named model (404 for any other name)
  GET  /models                    the served model and its status
OpenAI's (`openai_api`), errors in OpenAI's shape:
  POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /v1/models/{model}
And GET /metrics, Prometheus' text format (`metrics`); GET /openapi.json, the OpenAPI document of all of
these (`api_schema`), and GET /docs, its Swagger UI.
"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from entrypoint.configuration import Configuration
from entrypoint.http import api_schema
from entrypoint.http.api_key import ApiKeyMiddleware
from entrypoint.http.generation import error_response
from entrypoint.protocol.errors import ErrorFamily, make_body, render, row_for_status
from entrypoint.http.metrics import ServerMetrics
from entrypoint.http.openai_api import OpenAIApi
from entrypoint.http.predict import Predictor
from entrypoint.http.state import LOADING_RETRY_AFTER, Phase, ServerState
from entrypoint.protocol.schema import ModelEntry, Models, PingOk, PingUnavailable, body, build
from entrypoint.protocol.tokenization import PromptTokenizer


def create_app(configuration: Configuration, state: ServerState) -> FastAPI:
    properties = configuration.properties
    tokenizer = PromptTokenizer()
    metrics = ServerMetrics(state)
    openai = OpenAIApi(properties, state, tokenizer, metrics)
    predictor = Predictor(properties, state, tokenizer, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        tokenizer.close()

    # /openapi.json describes the real request, response and error models (entrypoint/http/api_schema.py);
    # clients discover the API from it and the API fuzzing tests (schemathesis) read it.
    app = FastAPI(title="LMI DeepSpeed", version="0.1.0", docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json", lifespan=lifespan)
    api_schema.install(app)
    if properties.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, key=properties.api_key.get_secret_value())
    app.state.server = state
    app.state.predictor = predictor
    app.state.metrics = metrics

    _error_handlers(app)
    _status_routes(app, state)
    _generation_routes(app, predictor, openai, metrics)
    return app


def _error_handlers(app: FastAPI) -> None:
    # Framework-level errors (unknown route, wrong method) use the same body shapes as ours.
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        error = render(row_for_status(exc.status_code), message, ErrorFamily.for_path(request.url.path))
        return JSONResponse(body(error), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = render(row_for_status(400), str(exc), ErrorFamily.for_path(request.url.path))
        return JSONResponse(body(error), status_code=400)


def _status_routes(app: FastAPI, state: ServerState) -> None:
    """/ping (SageMaker's health check) and /models (DJL Serving's model list, with the serving engine)."""
    @app.get("/ping")
    async def ping() -> JSONResponse:
        health = state.health()
        if health.healthy:
            return JSONResponse(body(build(PingOk, status="healthy")))
        unavailable = build(PingUnavailable, status=health.status, phase=state.phase.value, progress=state.progress,
                            **make_body(503, "ModelNotReady" if state.phase is not Phase.READY else "EngineUnavailable",
                                        health.detail))
        headers = {"Retry-After": str(LOADING_RETRY_AFTER)} if state.phase is Phase.LOADING else None
        return JSONResponse(body(unavailable), status_code=503, headers=headers)

    @app.get("/models")
    async def models() -> JSONResponse:
        entry: dict = {"modelName": state.model_name, "status": _MODEL_STATUS[state.phase]}
        loop = state.loop
        if state.phase is Phase.LOADING:
            entry["progress"] = state.progress
        elif state.phase is Phase.FAILED:
            entry["error"] = state.failure
        elif loop is not None:
            entry.update(engine=loop.engine.name, maxTotalTokens=loop.engine.max_total_tokens,
                         healthy=loop.health().healthy)
        return JSONResponse(body(build(Models, models=[build(ModelEntry, **entry)])))


def _generation_routes(app: FastAPI, predictor: Predictor, openai: OpenAIApi, metrics: ServerMetrics) -> None:
    """LMI's routes, OpenAI's, and the Prometheus metrics."""
    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        return await predictor.handle(request, "/invocations")

    @app.post("/predictions/{model_name:path}")
    async def predictions(request: Request, model_name: str) -> Response:
        return await predictor.handle(request, f"/predictions/{model_name}", model_name)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await openai.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await openai.chat_completions(request)

    @app.get("/v1/models")
    async def openai_models() -> JSONResponse:
        return JSONResponse(body(openai.models()))

    @app.get("/v1/models/{model_name:path}")
    async def openai_model(model_name: str) -> Response:
        try:
            return JSONResponse(body(openai.model_card(model_name)))
        except Exception as exc:
            return error_response(exc, ErrorFamily.OPENAI)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)


_MODEL_STATUS = {Phase.LOADING: "LOADING", Phase.READY: "READY", Phase.FAILED: "FAILED"}
