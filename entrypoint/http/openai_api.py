"""POST /v1/completions, POST /v1/chat/completions and GET /v1/models: OpenAI's API on the same path as
/invocations (the body prepared by `entrypoint.protocol.prepare`, then `generation.respond`), with errors
in OpenAI's shape.
"""

from __future__ import annotations

import uuid

from fastapi import Request
from fastapi.responses import Response

from entrypoint.http.access_log import AccessRecord, RequestObserver
from entrypoint.http.client_connection import read_body
from entrypoint.http.generation import answer, respond
from entrypoint.http.state import ServerState
from entrypoint.protocol.errors import ErrorFamily
from entrypoint.protocol.prepare import Api, Route, check_model, prepare
from entrypoint.protocol.schema import ModelCard, ModelList
from entrypoint.protocol.tokenization import PromptTokenizer
from handlers.serving_properties import ServingProperties


class OpenAIApi:
    def __init__(self, properties: ServingProperties, state: ServerState, tokenizer: PromptTokenizer,
                 observer: RequestObserver | None = None):
        self.properties = properties
        self.state = state
        self.tokenizer = tokenizer
        self.observer = observer

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "/v1/completions", Api.COMPLETIONS)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "/v1/chat/completions", Api.CHAT)

    async def _generate(self, request: Request, path: str, api: Api) -> Response:
        record = AccessRecord(path, uuid.uuid4().hex, self.observer)

        async def work() -> Response:
            body = await read_body(request, self.properties.max_request_size, self.properties.request_read_timeout)
            prepared = await prepare(body, Route(api), self.state, self.tokenizer, record.request_id,
                                     getattr(self.observer, "ignored_fields", None))
            return await respond(request, prepared, record)

        return await answer(record, ErrorFamily.OPENAI, work)

    def models(self) -> ModelList:
        return ModelList(object="list", data=[self.model_card()])

    def model_card(self, name: str | None = None) -> ModelCard:
        if name is not None:
            check_model(self.state, name)
        loop = self.state.loop
        # max_model_len is vLLM's extension: the context clients may use
        return ModelCard(id=self.state.model_name, object="model", created=int(self.state.started_at), owned_by="lmi",
                         **({"max_model_len": loop.engine.max_total_tokens} if loop is not None else {}))
