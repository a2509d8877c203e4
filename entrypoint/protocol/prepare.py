"""One request's preparation, the same for every route and for DJL's `handle()`: from the body's bytes to
the engine requests to submit, and the objects that turn their outputs into the response.

`prepare` does, once each and in this order, so that anything that can be refused is refused before
anything reaches the engine (a bad request costs the running batch nothing):
  1. the body as a JSON object, parsed by the API's schema (`lmi`, `openai`), the model name checked;
  2. the admission bound: prompts x sequences per prompt (n, best_of) above job_queue_size could never be
     admitted (all or none is), so it is a 400, not a 503 a client would retry forever;
  3. tokenizing (`tokenization`: a prompt too long for any tokenization is refused unread);
  4. fan-out: each prompt's sequences, with ids `<id>` (one) or `<id>-<i>` (several, in order: every
     sequence of prompt 0 first) and seeds seed + i, so sequence i is what the request with that seed
     alone gives (the engine's seeds are 0..2**63-1: larger ones fold);
  5. the prompt-length check, once per prompt (`engine.validate`), its error naming the API's field.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping, Protocol

from entrypoint.protocol.errors import ModelNotFound, exception_for_output
from entrypoint.protocol.lmi import Accumulator, LmiParameters, build_response, parse_lmi
from entrypoint.protocol.openai import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    parse_chat,
    parse_completion,
)
from entrypoint.protocol.openai_response import CompletionBuilder, CompletionStreamEncoder
from entrypoint.protocol.streaming import BatchStreamEncoder, ChunkEncoder, Format, StreamEncoder, choose_format
from entrypoint.protocol.tokenization import PromptTokenizer
from entrypoint.protocol.validation import load_json_object
from handlers.engine import Engine, GenerationRequest, InvalidRequest, RequestOutput, SamplingParams
from handlers.engine_loop import EngineLoop
from handlers.serving_properties import OutputFormatter

#: counts ignored request fields: (api, how many)
IgnoredCounter = Callable[[str, int], None]


class Api(str, Enum):
    LMI = "lmi"
    COMPLETIONS = "completions"
    CHAT = "chat"


#: what the body should look like, for the message when it is not a JSON object
_EXAMPLES = {Api.LMI: '{"inputs": "..."}', Api.COMPLETIONS: '{"model": "...", "prompt": "..."}',
             Api.CHAT: '{"model": "...", "messages": [...]}'}
_JSONLINES_TYPES = ("application/jsonlines", "application/x-ndjson", "application/jsonl")


class Server(Protocol):
    """What preparation needs of the server: its model names and its engine loop (`http.state.ServerState`)."""

    model_name: str

    def knows_model(self, name: str) -> bool: ...

    def require_loop(self) -> EngineLoop: ...


@dataclass(frozen=True)
class Route:
    """How a request arrived: which API, how it may be answered."""

    api: Api
    accept: str | None = None  # the Accept header
    output_formatter: OutputFormatter = OutputFormatter.JSON
    chat_bodies: bool = True  # LMI: a body with "messages" is an OpenAI chat request (LMI served those too)
    no_stream: str | None = None  # why streaming is refused here (DJL's handle() has no token stream)


@dataclass
class Prepared:
    """A request ready to submit to `loop`: its engine requests, one `Accumulator` per request for their
    outputs, the JSON body once all are in (`body`), or the stream's framing (`encoder`)."""

    loop: EngineLoop
    requests: list[GenerationRequest]
    results: list[Accumulator]
    body: Callable[[], Any]
    encoder: ChunkEncoder | None = None
    fields: Mapping[str, str] = field(default_factory=dict)  # the engine's field names -> the API's

    def failure(self, output: RequestOutput) -> Exception | None:
        """The error a final output stands for, naming the API's field (None for a successful finish)."""
        return exception_for_output(output, self.fields) if output.finished else None


async def prepare(body: bytes, route: Route, server: Server, tokenizer: PromptTokenizer, request_id: str,
                  count_ignored: IgnoredCounter | None = None) -> Prepared:
    """Parse, check, tokenize and fan out one request body (see the module docstring); raises
    `InvalidRequest` (naming the field), `ModelNotFound` or `ModelNotReady`."""
    data = load_json_object(body, _EXAMPLES[route.api])
    if route.api is Api.LMI and route.chat_bodies and "messages" in data:
        # Streamed as OpenAI's SSE chunks (LMI's sse_chat, what its vLLM front end sends), or as LMI's
        # jsonlines_chat when the client or the deployment asks for JSON lines.
        accept = (route.accept or "").lower()
        jsonlines = any(kind in accept for kind in _JSONLINES_TYPES) or \
            (route.output_formatter.value == "jsonlines" and "text/event-stream" not in accept)
        # /invocations serves whichever model this is, so the body's "model" is not checked there
        return await _prepare_openai(parse_chat(data, count_ignored), jsonlines, server, tokenizer, request_id)
    if route.api is Api.LMI:
        return await _prepare_lmi(data, route, server, tokenizer, request_id, count_ignored)
    parsed = parse_chat(data, count_ignored) if route.api is Api.CHAT else parse_completion(data, count_ignored)
    check_model(server, parsed.model)
    return await _prepare_openai(parsed, False, server, tokenizer, request_id)


def check_model(server: Server, name: str | None) -> None:
    """A name this server answers to. One model is served, so besides its names (and their last path part),
    any HF id or path (a name with a "/") means it: benchmark clients send the one value they also load the
    tokenizer from. A bare name that is none of ours is still a 404 (a typo, another model)."""
    if name is not None and not server.knows_model(name) and "/" not in name:
        raise ModelNotFound(f"The model `{name}` does not exist; this server serves `{server.model_name}` "
                            "(GET /v1/models)")


# ---- LMI ------------------------------------------------------------------------------------------------
async def _prepare_lmi(data: dict[str, Any], route: Route, server: Server, tokenizer: PromptTokenizer,
                       request_id: str, count_ignored: IgnoredCounter | None) -> Prepared:
    lmi, parameters, params = parse_lmi(data, count_ignored)
    returned, generated = parameters.sequences()
    if lmi.stream and route.no_stream:
        raise InvalidRequest(route.no_stream, "stream")
    fmt = Format.JSON if route.no_stream else choose_format(lmi.stream, route.accept, route.output_formatter)
    if fmt.streaming and generated > 1:
        raise InvalidRequest("parameters.n and best_of above 1 are not streamed (the best sequence is known only at "
                             "the end, as in LMI); set \"stream\": false", "parameters.best_of")
    loop = server.require_loop()
    prompts = lmi.prompts
    if len(prompts) * generated > loop.job_queue_size:
        raise InvalidRequest(f"this request asks for {len(prompts) * generated} sequences ({len(prompts)} inputs x "
                             f"best_of {generated}), more than this server ever admits at once "
                             f"(job_queue_size={loop.job_queue_size}); send fewer inputs per request", "inputs")
    engine = loop.engine
    tokenized = [(prompt, _truncate(parameters, await tokenizer.encode(engine, prompt))) for prompt in prompts]
    requests = _fan_out(tokenized, generated, request_id, lambda ids: params,
                        lambda exc, index: _lmi_error(exc, index, len(prompts)), engine)
    results = [Accumulator(request.prompt, request.params) for request in requests]
    encoder: ChunkEncoder | None = None
    if fmt.streaming:  # a one-element list streams like its string (LMI clients send it)
        encoder = StreamEncoder(fmt, results[0]) if len(results) == 1 else BatchStreamEncoder(fmt, results)
    return Prepared(loop, requests, results, lambda: build_response(results, lmi.is_batch, returned, generated),
                    encoder, _LMI_FIELDS)


def _truncate(parameters: LmiParameters, ids: list[int]) -> list[int]:
    """The prompt's token ids after parameters.truncate: its last N tokens, as TGI."""
    return ids[-parameters.truncate:] if parameters.truncate is not None else ids


#: the engine's field names as LMI's request has them
_LMI_FIELDS = {"max_new_tokens": "parameters.max_new_tokens"}


def _lmi_error(exc: InvalidRequest, index: int, inputs: int) -> InvalidRequest:
    field = _LMI_FIELDS.get(exc.field or "", exc.field)
    # in a list, say which input is the problem
    return InvalidRequest(f"inputs[{index}]: {exc}" if inputs > 1 else str(exc), field)


# ---- OpenAI ---------------------------------------------------------------------------------------------
async def _prepare_openai(parsed: CompletionRequest | ChatCompletionRequest, jsonlines: bool, server: Server,
                          tokenizer: PromptTokenizer, request_id: str) -> Prepared:
    chat = isinstance(parsed, ChatCompletionRequest)
    # the prompts' shape is checked before the loop is asked for: a malformed request is a 400 even while loading
    prompts = parsed.prompts() if isinstance(parsed, CompletionRequest) else [parsed.chat_messages()]
    loop = server.require_loop()
    n = parsed.sequences_per_prompt  # best_of generates more than it returns
    if len(prompts) * n > loop.job_queue_size:  # could never be admitted: a retry would not help either
        raise InvalidRequest(f"{len(prompts)} prompt(s) x {n} sequences each (n, best_of) = {len(prompts) * n} "
                             f"generations are more than this server admits at once (job_queue_size="
                             f"{loop.job_queue_size})", "best_of" if n > parsed.choices_per_prompt else "n")
    engine = loop.engine
    if isinstance(parsed, ChatCompletionRequest):
        tokenized = [await tokenizer.chat(engine, prompts[0])]
        requested = parsed.completion_limit
    else:
        tokenized = [await _completion_prompt(engine, tokenizer, prompt) for prompt in prompts]
        requested = COMPLETIONS_DEFAULT_MAX_TOKENS if parsed.max_tokens is None else parsed.max_tokens
    fields = {"inputs": "messages" if chat else "prompt", "max_new_tokens": parsed.limit_param}
    prompt_field = fields["inputs"]

    def params(ids: list[int]) -> SamplingParams:
        """Chat without a limit gets the rest of the context."""
        if requested is not None:
            return parsed.sampling_params(requested)
        if len(ids) >= engine.max_total_tokens:
            raise InvalidRequest(f"This model's maximum context length is {engine.max_total_tokens} tokens. However, "
                                 f"your messages resulted in {len(ids)} tokens, which leaves no room for a completion. "
                                 "Please reduce the length of the messages.", "messages")
        return parsed.sampling_params(engine.max_total_tokens - len(ids))

    def error(exc: InvalidRequest, index: int) -> InvalidRequest:
        """The engine's refusal in OpenAI's words and field names."""
        ids, limit = tokenized[index][1], engine.max_total_tokens
        if exc.field == "max_new_tokens" and requested is not None:
            return InvalidRequest(f"This model's maximum context length is {limit} tokens. However, you requested "
                                  f"{len(ids) + requested} tokens ({len(ids)} in the {prompt_field}, {requested} in "
                                  f"the completion). Please reduce the length of the {prompt_field} or the "
                                  "completion.", parsed.limit_param)
        return InvalidRequest(str(exc), fields.get(exc.field or "", exc.field))

    requests = _fan_out(tokenized, n, request_id, params, error, engine)
    results = [Accumulator(request.prompt, request.params) for request in requests]
    completion = CompletionBuilder(
        chat=chat, id=("chatcmpl-" if chat else "cmpl-") + request_id, created=int(time.time()),
        model=parsed.model if parsed.model and server.knows_model(parsed.model) else server.model_name,
        results=results, prompt_tokens=sum(len(ids) for _, ids in tokenized), logprobs=parsed.wants_logprobs,
        echo=bool(getattr(parsed, "echo", False)), token_ids=bool(parsed.return_tokens_as_token_ids),
        choices_per_prompt=parsed.choices_per_prompt, sequences_per_prompt=n)
    encoder = CompletionStreamEncoder(completion, parsed.include_usage, jsonlines, fields) if parsed.stream else None
    return Prepared(loop, requests, results, completion.body, encoder, fields)


async def _completion_prompt(engine: Engine, tokenizer: PromptTokenizer,
                             prompt: str | list[int]) -> tuple[str, list[int]]:
    if isinstance(prompt, str):
        return prompt, await tokenizer.encode(engine, prompt, "prompt")
    # Ids beyond the vocabulary would crash the engine's embedding lookup for the whole batch.
    size = len(engine.tokenizer) if hasattr(engine.tokenizer, "__len__") else None
    if size is not None and max(prompt) >= size:
        raise InvalidRequest(f"prompt holds token id {max(prompt)}, outside the vocabulary of {size} tokens", "prompt")
    return await tokenizer.decode(engine, prompt), prompt


# ---- both -----------------------------------------------------------------------------------------------
def _fan_out(prompts: list[tuple[str, list[int]]], sequences: int, request_id: str,
             params: Callable[[list[int]], SamplingParams],
             error: Callable[[InvalidRequest, int], InvalidRequest], engine: Engine) -> list[GenerationRequest]:
    """`sequences` engine requests per (prompt, ids), each prompt checked once against the engine's limits
    (`error(exc, prompt index)` words the refusal for the API)."""
    single = len(prompts) * sequences == 1
    requests = []
    for prompt_index, (prompt, ids) in enumerate(prompts):
        first = params(ids)
        try:
            engine.validate(GenerationRequest(request_id, prompt, ids, first))
        except InvalidRequest as exc:
            raise error(exc, prompt_index) from None
        for number in range(sequences):
            seeded = first if first.seed is None or number == 0 else \
                first.model_copy(update={"seed": (first.seed + number) % 2**63})
            index = prompt_index * sequences + number
            requests.append(GenerationRequest(request_id if single else f"{request_id}-{index}", prompt, ids, seeded))
    return requests
