"""POST /invocations and /predictions/{model}: from an LMI request to generated text (or a token stream).

The body is read here (size limit, read timeout) and prepared by `entrypoint.protocol.prepare`, which
refuses whatever it can before anything is submitted, so a bad request costs the running batch nothing.
A body with "messages" is an OpenAI chat request (LMI accepted those on /invocations too): it is prepared
as a chat completion and answered in that shape, with LMI's error shape. Collecting or streaming the
outputs, and cancelling on disconnect, is `generation.respond`'s, shared with the OpenAI routes.
"""

from __future__ import annotations

import uuid

from fastapi import Request
from fastapi.responses import Response

from entrypoint.http.access_log import AccessRecord, RequestObserver
from entrypoint.http.client_connection import read_body
from entrypoint.http.generation import answer, respond
from entrypoint.http.state import ServerState
from entrypoint.protocol.errors import ErrorFamily, ModelNotFound
from entrypoint.protocol.prepare import Api, Route, prepare
from entrypoint.protocol.tokenization import PromptTokenizer
from handlers.serving_properties import ServingProperties


class Predictor:
    def __init__(self, properties: ServingProperties, state: ServerState, tokenizer: PromptTokenizer,
                 observer: RequestObserver | None = None):
        self.properties = properties
        self.state = state
        self.tokenizer = tokenizer
        self.observer = observer

    async def handle(self, request: Request, route: str, model_name: str | None = None) -> Response:
        record = AccessRecord(route, uuid.uuid4().hex, self.observer)
        return await answer(record, ErrorFamily.LMI, lambda: self._handle(request, record, model_name))

    async def _handle(self, request: Request, record: AccessRecord, model_name: str | None) -> Response:
        if model_name is not None and not self.state.knows_model(model_name):
            raise ModelNotFound(f"model {model_name!r} is not served here; this server serves "
                                f"{self.state.model_name!r}")
        body = await read_body(request, self.properties.max_request_size, self.properties.request_read_timeout)
        route = Route(Api.LMI, request.headers.get("accept"), self.properties.output_formatter)
        prepared = await prepare(body, route, self.state, self.tokenizer, record.request_id,
                                 getattr(self.observer, "ignored_fields", None))
        return await respond(request, prepared, record)
