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
from typing import Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response

from entrypoint.http.access_log import AccessRecord, RequestObserver
from entrypoint.http.client_connection import read_body
from entrypoint.protocol.errors import ErrorFamily, ModelNotFound
from entrypoint.http.generation import ChunkEncoder, answer, respond
from entrypoint.protocol.lmi import Accumulator, LmiRequest, build_response, generation_requests, parse_lmi
from entrypoint.protocol.validation import load_json_object
from entrypoint.http.state import ServerState
from entrypoint.protocol.streaming import BatchStreamEncoder, StreamEncoder, choose_format
from entrypoint.protocol.tokenization import PromptTokenizer
from handlers.serving_properties import ServingProperties
from handlers.engine import Engine, GenerationRequest, InvalidRequest, SamplingParams

#: answers a chat body (`{"messages": [...]}`) posted to /invocations: (request, record, parsed body, jsonlines=)
ChatHandler = Callable[..., Awaitable[Response]]


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
            # Streamed as OpenAI's SSE chunks (LMI's sse_chat, what its vLLM front end sends), or as LMI's
            # jsonlines_chat when the client or the deployment asks for JSON lines.
            accept = (request.headers.get("accept") or "").lower()
            jsonlines = any(kind in accept for kind in ("application/jsonlines", "application/x-ndjson",
                                                        "application/jsonl")) \
                or (self.properties.output_formatter.value == "jsonlines" and "text/event-stream" not in accept)
            return await self.chat(request, record, data, jsonlines=jsonlines)
        lmi, params = parse_lmi(data, getattr(self.observer, "ignored_fields", None))
        fmt = choose_format(lmi.stream, request.headers.get("accept"), self.properties.output_formatter)
        if fmt.streaming and lmi.sequences[1] > 1:
            raise InvalidRequest("parameters.n and best_of above 1 are not streamed (the best sequence is known only at "
                                 "the end, as in LMI); set \"stream\": false", "parameters.best_of")
        loop = self.state.require_loop()
        sequences = len(lmi.prompts) * lmi.sequences[1]  # best_of sequences per input
        if sequences > loop.job_queue_size:
            # All or none is admitted, so this request could never fit: a 503 would make clients that honour
            # Retry-After resend it forever. Checked before tokenizing anything.
            raise InvalidRequest(f"this request asks for {sequences} sequences ({len(lmi.prompts)} inputs x best_of "
                                 f"{lmi.sequences[1]}), more than this server ever admits at once "
                                 f"(job_queue_size={loop.job_queue_size}); send fewer inputs per request", "inputs")
        requests = await self._requests(loop.engine, record, lmi, params)
        streams = loop.streams(requests)  # QueueFull / EngineUnavailable raise here, before any output
        record.admit(requests)
        results = [Accumulator(request.prompt, request.params) for request in requests]
        encoder: ChunkEncoder | None = None
        if fmt.streaming:  # a one-element list streams like its string (LMI clients send it)
            encoder = StreamEncoder(fmt, results[0]) if len(results) == 1 else BatchStreamEncoder(fmt, results)
        return await respond(request, streams, record, results=results, encoder=encoder,
                             build=lambda: build_response(results, lmi),
                             headers={"X-Request-Id": record.request_id})

    async def _requests(self, engine: Engine, record: AccessRecord, lmi: LmiRequest,
                        params: SamplingParams) -> list[GenerationRequest]:
        prompt_ids = [await self.tokenizer.encode(engine, prompt) for prompt in lmi.prompts]
        return generation_requests(engine, lmi, params, prompt_ids, record.request_id)
