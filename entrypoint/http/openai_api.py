"""POST /v1/completions, POST /v1/chat/completions and GET /v1/models: OpenAI's API on the same engine path
as /invocations (tokenize, validate, submit to the EngineLoop, then `generation.respond`).

As in `predict`, everything that can be refused is refused before anything is submitted: the request is
parsed, its model checked, its prompts tokenized (chat through the tokenizer's chat template) and checked
against the context, so a bad request costs the running batch nothing. Errors use OpenAI's shape here;
a chat body posted to /invocations (LMI accepted those) takes the same path with LMI's error shape.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from entrypoint.http.access_log import AccessRecord, RequestObserver
from entrypoint.http.client_connection import read_body
from entrypoint.protocol.errors import ErrorFamily, ModelNotFound
from entrypoint.http.generation import answer, respond
from entrypoint.protocol.lmi import Accumulator
from entrypoint.protocol.validation import load_json_object
from entrypoint.protocol.openai import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    parse_chat,
    parse_completion,
)
from entrypoint.protocol.openai_response import Completion, CompletionStreamEncoder
from entrypoint.http.state import ServerState
from entrypoint.protocol.tokenization import PromptTokenizer
from handlers.serving_properties import ServingProperties
from handlers.engine import Engine, GenerationRequest, InvalidRequest
from handlers.engine_loop import EngineLoop



class OpenAIApi:
    def __init__(self, properties: ServingProperties, state: ServerState, tokenizer: PromptTokenizer,
                 observer: RequestObserver | None = None):
        self.properties = properties
        self.state = state
        self.tokenizer = tokenizer
        self.observer = observer

    # ---- routes -------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        record = AccessRecord("/v1/completions", uuid.uuid4().hex, self.observer)
        return await answer(record, ErrorFamily.OPENAI, lambda: self._completions(request, record))

    async def chat_completions(self, request: Request) -> Response:
        record = AccessRecord("/v1/chat/completions", uuid.uuid4().hex, self.observer)

        async def work() -> Response:
            data = load_json_object(await read_body(request, self.properties.max_request_size, self.properties.request_read_timeout),
                                    '{"model": "...", "messages": [...]}')
            return await self.chat(request, record, data, check_model=True)

        return await answer(record, ErrorFamily.OPENAI, work)

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self, name: str | None = None) -> dict[str, Any]:
        if name is not None:
            self._check_model(name)
        card: dict[str, Any] = {"id": self.state.model_name, "object": "model", "created": int(self.state.started_at),
                                "owned_by": "lmi"}
        loop = self.state.loop
        if loop is not None:
            card["max_model_len"] = loop.engine.max_total_tokens  # vLLM's extension: the context clients may use
        return card

    # ---- the two generation endpoints ---------------------------------------------------------------
    async def chat(self, request: Request, record: AccessRecord, data: dict[str, Any], *,
                   check_model: bool, jsonlines: bool = False) -> Response:
        """A chat completion for a parsed body; failures raise (the caller renders them in its family).
        /invocations passes check_model=False: its model is the one served, whatever the body names; and
        jsonlines=True for LMI's jsonlines_chat stream format (chunks as JSON lines, no [DONE])."""
        chat = parse_chat(data, getattr(self.observer, "ignored_fields", None))
        if check_model:
            self._check_model(chat.model)
        messages = chat.chat_messages()
        loop = self.state.require_loop()
        prompt, ids = await self.tokenizer.chat(loop.engine, messages)
        return await self._generate(request, record, loop, chat, [(prompt, ids)], chat.completion_limit, jsonlines)

    async def _completions(self, request: Request, record: AccessRecord) -> Response:
        data = load_json_object(await read_body(request, self.properties.max_request_size, self.properties.request_read_timeout),
                                '{"model": "...", "prompt": "..."}')
        completion = parse_completion(data, getattr(self.observer, "ignored_fields", None))
        self._check_model(completion.model)
        loop = self.state.require_loop()
        prompts = []
        for prompt in completion.prompts():
            if isinstance(prompt, str):
                prompts.append((prompt, await self.tokenizer.encode(loop.engine, prompt, "prompt")))
            else:
                _check_token_ids(loop.engine, prompt)
                prompts.append((await self.tokenizer.decode(loop.engine, prompt), prompt))
        return await self._generate(request, record, loop, completion, prompts,
                                    COMPLETIONS_DEFAULT_MAX_TOKENS if completion.max_tokens is None
                                    else completion.max_tokens)

    async def _generate(self, request: Request, record: AccessRecord, loop: EngineLoop,
                        parsed: CompletionRequest | ChatCompletionRequest, prompts: list[tuple[str, list[int]]],
                        max_tokens: int | None, jsonlines: bool = False) -> Response:
        chat = isinstance(parsed, ChatCompletionRequest)
        engine = loop.engine
        n = parsed.sequences_per_prompt  # best_of generates more than it returns
        if len(prompts) * n > loop.job_queue_size:  # could never be admitted: a retry would not help either
            raise InvalidRequest(f"{len(prompts)} prompt(s) x {n} sequences each (n, best_of) = {len(prompts) * n} "
                                 f"generations are more than this server admits at once (job_queue_size="
                                 f"{loop.job_queue_size})", "best_of" if n > parsed.choices_per_prompt else "n")
        requests = []
        for prompt_index, (prompt, ids) in enumerate(prompts):
            budget = _completion_budget(engine, ids, max_tokens, chat, parsed.limit_param)
            for choice in range(n):
                index = prompt_index * n + choice  # OpenAI's choice order: all choices of prompt 0 first
                request_id = record.request_id if len(prompts) * n == 1 else f"{record.request_id}-{index}"
                generation = GenerationRequest(request_id, prompt, ids, parsed.sampling_params(budget, choice))
                _validate(engine, generation, {"inputs": "messages" if chat else "prompt",
                                               "max_new_tokens": parsed.limit_param})
                requests.append(generation)
        streams = loop.streams(requests)  # QueueFull / EngineUnavailable raise here, before any output
        record.admit(requests)
        results = [Accumulator(generation.prompt, generation.params) for generation in requests]
        completion = Completion(
            chat=chat, id=("chatcmpl-" if chat else "cmpl-") + record.request_id, created=int(time.time()),
            model=parsed.model if parsed.model and self.state.knows_model(parsed.model) else self.state.model_name,
            results=results,
            prompt_tokens=sum(len(ids) for _, ids in prompts), logprobs=parsed.wants_logprobs,
            echo=bool(getattr(parsed, "echo", False)), choices_per_prompt=parsed.choices_per_prompt,
            sequences_per_prompt=n)
        encoder = CompletionStreamEncoder(completion, parsed.include_usage, jsonlines) if parsed.stream else None
        return await respond(request, streams, record, results=results, build=completion.body, encoder=encoder,
                             headers={"X-Request-Id": record.request_id})

    def _check_model(self, name: str | None) -> None:
        """A name this server answers to. One model is served, so besides its names (and their last path
        part), any HF id or path (a name with a "/") means it: benchmark clients send the one value they also
        load the tokenizer from. A bare name that is none of ours is still a 404 (a typo, another model)."""
        if name is not None and not self.state.knows_model(name) and "/" not in name:
            raise ModelNotFound(f"The model `{name}` does not exist; this server serves `{self.state.model_name}` "
                                "(GET /v1/models)")


def _completion_budget(engine: Engine, ids: list[int], requested: int | None, chat: bool, param: str) -> int:
    """max_new_tokens for one prompt: what was asked, or (chat) the rest of the context; a 400 in OpenAI's
    words when prompt and completion do not fit."""
    limit = engine.max_total_tokens
    if requested is None:
        requested = limit - len(ids)
        if requested < 1:
            raise InvalidRequest(f"This model's maximum context length is {limit} tokens. However, your messages "
                                 f"resulted in {len(ids)} tokens, which leaves no room for a completion. Please "
                                 "reduce the length of the messages.", "messages")
    if len(ids) + requested > limit:
        raise InvalidRequest(f"This model's maximum context length is {limit} tokens. However, you requested "
                             f"{len(ids) + requested} tokens ({len(ids)} in the {'messages' if chat else 'prompt'}, "
                             f"{requested} in the completion). Please reduce the length of the "
                             f"{'messages' if chat else 'prompt'} or the completion.", param)
    return requested


def _validate(engine: Engine, generation: GenerationRequest, params: dict[str, str]) -> None:
    try:
        engine.validate(generation)
    except InvalidRequest as exc:  # the engine names its own fields (`params` maps them); the client knows OpenAI's
        raise InvalidRequest(str(exc), params.get(exc.field or "", exc.field)) from None


def _check_token_ids(engine: Engine, ids: list[int]) -> None:
    """Ids beyond the vocabulary would crash the engine's embedding lookup for the whole batch."""
    size = len(engine.tokenizer) if hasattr(engine.tokenizer, "__len__") else None
    if size is not None and max(ids) >= size:
        raise InvalidRequest(f"prompt holds token id {max(ids)}, outside the vocabulary of {size} tokens", "prompt")
