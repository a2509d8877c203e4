"""POST /invocations and /predictions/{model}: from an LMI request to generated text (or a token stream).

Order matters for "a bad request never affects the batch": the body is read (size-checked), parsed,
validated, tokenized and checked against the engine's limits *before* anything is submitted, so a bad
request costs the running batch nothing.

What the engine must provide here (all safe to use from the server, not only from the loop thread):
  engine.tokenizer.encode(text) -> list[int]   run on one dedicated tokenizer thread, never concurrently
  engine.validate(request)                     pure check of the request against engine limits

A body with "messages" is an OpenAI chat request (LMI accepted those on /invocations too): it goes to the
OpenAI chat path and gets the chat completion response, with LMI's error shape. Collecting or streaming
the outputs, and cancelling on disconnect, is `generation.respond`'s, shared with the OpenAI routes.
"""

from __future__ import annotations

import uuid
from typing import Any, Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response

from entrypoint.http.access_log import AccessRecord, RequestObserver
from entrypoint.http.client_connection import read_body
from entrypoint.http.errors import ErrorFamily, ModelNotFound
from entrypoint.http.generation import answer, respond
from entrypoint.http.lmi_protocol import Accumulator, build_response, load_json_object, parse_lmi
from entrypoint.http.state import ServerState
from entrypoint.http.streaming import StreamEncoder, choose_format
from entrypoint.http.tokenization import PromptTokenizer
from handlers.serving_properties import ServingProperties
from handlers.engine import Engine, GenerationRequest, InvalidRequest, SamplingParams

#: answers a chat body (`{"messages": [...]}`) posted to /invocations: (request, record, parsed body)
ChatHandler = Callable[[Request, AccessRecord, dict[str, Any]], Awaitable[Response]]


class Predictor:
    def __init__(self, properties: ServingProperties, state: ServerState, tokenizer: PromptTokenizer,
                 observer: RequestObserver | None = None, chat: ChatHandler | None = None):
        self.properties = properties
        self.state = state
        self.tokenizer = tokenizer
        self.observer = observer
        self.chat = chat

    async def handle(self, request: Request, route: str, model_name: str | None = None) -> Response:
        record = AccessRecord(route, uuid.uuid4().hex, self.observer)
        return await answer(record, ErrorFamily.LMI, lambda: self._handle(request, record, model_name))

    async def _handle(self, request: Request, record: AccessRecord, model_name: str | None) -> Response:
        if model_name is not None and not self.state.knows_model(model_name):
            raise ModelNotFound(f"model {model_name!r} is not served here; this server serves "
                                f"{self.state.model_name!r}")
        data = load_json_object(await read_body(request, self.properties.max_request_size, self.properties.request_read_timeout))
        if "messages" in data and self.chat is not None:  # LMI served OpenAI chat bodies on /invocations too
            return await self.chat(request, record, data)
        lmi, params = parse_lmi(data)
        fmt = choose_format(lmi.stream, request.headers.get("accept"), self.properties.output_formatter)
        if fmt.streaming and lmi.is_batch:
            raise InvalidRequest(f"streaming ({fmt.value}) needs one string in inputs, got a list of "
                                 f"{len(lmi.inputs)}; send one request per input or set \"stream\": false",
                                 "inputs")
        loop = self.state.require_loop()
        if len(lmi.prompts) > loop.job_queue_size:
            # All or none is admitted, so this list could never fit: a 503 would make clients that honour
            # Retry-After resend it forever (issue 11). Checked before tokenizing anything.
            raise InvalidRequest(f"inputs has {len(lmi.prompts)} prompts, more than this server ever admits at once "
                                 f"(job_queue_size={loop.job_queue_size}); send at most {loop.job_queue_size} "
                                 "inputs per request", "inputs")
        requests = await self._requests(loop.engine, record, lmi.prompts, params)
        streams = loop.streams(requests)  # QueueFull / EngineUnavailable raise here, before any output
        record.admit(requests)
        results = [Accumulator(request.prompt, params) for request in requests]
        encoder = StreamEncoder(fmt, results[0]) if fmt.streaming else None
        return await respond(request, streams, record, results=results, encoder=encoder,
                             build=lambda: build_response(results, lmi.is_batch),
                             headers={"X-Request-Id": record.request_id})

    async def _requests(self, engine: Engine, record: AccessRecord, prompts: list[str],
                        params: SamplingParams) -> list[GenerationRequest]:
        requests = []
        for index, prompt in enumerate(prompts):
            ids = await self.tokenizer.encode(engine, prompt)
            request_id = record.request_id if len(prompts) == 1 else f"{record.request_id}-{index}"
            requests.append(GenerationRequest(request_id, prompt, ids, params))
        for index, generation in enumerate(requests):
            try:
                engine.validate(generation)
            except InvalidRequest as exc:
                if len(requests) > 1:  # say which input of the list is the problem
                    raise InvalidRequest(f"inputs[{index}]: {exc}", exc.field) from None
                raise
        return requests
