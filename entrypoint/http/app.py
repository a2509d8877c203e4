"""The FastAPI app: routes only; the work is in `predict`, the state in `state`, the errors in `errors`.

Routes (LMI / DJL Serving's, as SageMaker calls them):
  GET  /ping                      200 {"status": "healthy"} once the model is loaded and the engine healthy;
                                  503 with the phase, progress or failure otherwise (answered while loading)
  POST /invocations               LMI request -> generated text (JSON) or a token stream (jsonlines / SSE)
  POST /predictions/{model_name}  the same, for the named model (404 for any other name)
  GET  /models                    the served model and its status
"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from entrypoint.configuration import Configuration
from entrypoint.http.errors import make_body
from entrypoint.http.predict import Predictor
from entrypoint.http.state import LOADING_RETRY_AFTER, Phase, ServerState

_HTTP_TYPES = {404: "NotFound", 405: "MethodNotAllowed", 400: "InvalidRequest", 413: "RequestTooLarge"}


def create_app(configuration: Configuration, state: ServerState) -> FastAPI:
    predictor = Predictor(configuration.properties, state)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        predictor.close()

    app = FastAPI(title="LMI DeepSpeed", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = state
    app.state.predictor = predictor

    # Framework-level errors (unknown route, wrong method) use the same body shape as ours.
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = _HTTP_TYPES.get(exc.status_code, "HTTPError")
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(make_body(exc.status_code, error_type, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(make_body(400, "InvalidRequest", str(exc)), status_code=400)

    @app.get("/ping")
    async def ping() -> JSONResponse:
        health = state.health()
        if health.healthy:
            return JSONResponse({"status": "healthy"})
        body = {"status": health.status, "phase": state.phase.value, "progress": state.progress,
                **make_body(503, "ModelNotReady" if state.phase is not Phase.READY else "EngineUnavailable",
                            health.detail)}
        headers = {"Retry-After": str(LOADING_RETRY_AFTER)} if state.phase is Phase.LOADING else None
        return JSONResponse(body, status_code=503, headers=headers)

    @app.get("/models")
    async def models() -> JSONResponse:
        entry: dict = {"modelName": state.model_name, "status": _MODEL_STATUS[state.phase]}
        loop = state.loop
        if state.phase is Phase.LOADING:
            entry["progress"] = state.progress
        elif state.phase is Phase.FAILED:
            entry["error"] = state.failure
        elif loop is not None:
            entry["engine"] = loop.engine.name
            entry["maxTotalTokens"] = loop.engine.max_total_tokens
            entry["healthy"] = loop.health().healthy
        return JSONResponse({"models": [entry]})

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        return await predictor.handle(request, "/invocations")

    @app.post("/predictions/{model_name:path}")
    async def predictions(request: Request, model_name: str) -> Response:
        return await predictor.handle(request, f"/predictions/{model_name}", model_name)

    return app


_MODEL_STATUS = {Phase.LOADING: "LOADING", Phase.READY: "READY", Phase.FAILED: "FAILED"}
