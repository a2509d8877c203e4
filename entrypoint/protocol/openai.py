"""OpenAI's request schema for /v1/completions and /v1/chat/completions, and how it maps onto the engine.

Parameters and ranges are the ones OpenAI documents; a bad value is `InvalidRequest` whose `field` is the
OpenAI parameter name (rendered as the error's `param`). Mapping to `SamplingParams`:
  temperature  default 1 and sampling, as OpenAI; 0 (or top_p 0) means greedy decoding
  max_tokens / max_completion_tokens  max_new_tokens; unset: 16 for completions (OpenAI's default), the
               rest of the context for chat
  stop         stop_sequences (a string or up to 4); the stop text is not part of the output
  logprobs     top_n_tokens (chat: logprobs true + top_logprobs 0..20; completions: logprobs 0..5)
  n            n independent engine requests; with a seed, choice i is sampled with seed + i, so each
               choice is what the same request with that seed and n=1 would give
  best_of      completions: best_of >= n sequences are generated and the n with the highest mean
               log-probability per token are returned, best first (OpenAI's and vLLM's meaning)
  echo + logprobs  completions: the prompt's tokens and log-probabilities lead each choice's logprobs
               (the first prompt token has none: null); with max_tokens 0 only the prompt is scored
  top_k, repetition_penalty, ignore_eos  accepted as vLLM's extensions to OpenAI's schema
  return_tokens_as_token_ids  vLLM's: in logprobs each token (and each top_logprobs key) is "token_id:<id>",
               so a client can send the generated ids back (text does not identify a token)
Unknown parameters are accepted and ignored, as vLLM does (`validation.IGNORED_FIELDS`); known ones this
server cannot honour (tools, logit_bias, suffix, use_beam_search true, ...) are refused by name rather than
silently ignored. Types are strict (`validation`): no booleans for numbers, only true/false for booleans.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from entrypoint.protocol.validation import IGNORED_FIELDS, Bool, StrictModel, Text, stop_sequences, validation_error
from handlers.engine import (
    OPENAI_PENALTY_RANGE,
    REPETITION_PENALTY_RANGE,
    TOP_N_TOKENS_RANGE,
    InvalidRequest,
    SamplingParams,
)

#: most choices per request; OpenAI documents the same bound for n
MAX_N = 128
#: OpenAI's default max_tokens for completions
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
MAX_STOP_SEQUENCES = 4
ROLES = ("system", "developer", "user", "assistant")

#: parameters OpenAI has that this server cannot honour; sending them with a value is a 400 naming them
UNSUPPORTED = {
    "tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
    "function_call": "function calling", "audio": "audio output", "modalities": "output modalities",
    "prediction": "predicted outputs", "web_search_options": "web search", "reasoning_effort": "reasoning effort",
    "suffix": "suffix (insertion)",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: Bool | None = None
    include_obfuscation: Bool | None = None  # OpenAI pads chunks against side channels; nothing to hide here


class _OpenAIRequest(StrictModel):
    """The parameters both endpoints share."""

    model_config = ConfigDict(extra="allow")  # unknown fields are ignored (and counted)

    model: str | None = None  # OpenAI requires it; absent means the served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float | None = Field(None, **OPENAI_PENALTY_RANGE)
    frequency_penalty: float | None = Field(None, **OPENAI_PENALTY_RANGE)
    logit_bias: dict[str, float] | None = None
    stream: Bool | None = None
    stream_options: StreamOptions | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: no top-k
    repetition_penalty: float | None = Field(None, **REPETITION_PENALTY_RANGE)
    ignore_eos: Bool | None = None
    use_beam_search: Bool | None = None  # benchmark clients send false; true is refused (no beam search)
    return_tokens_as_token_ids: Bool | None = None  # logprobs name each token "token_id:<id>", as vLLM does

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        return stop_sequences(value, MAX_STOP_SEQUENCES)

    @field_validator("use_beam_search")
    @classmethod
    def _beam_search(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("beam search is not supported by this server; send false or leave it out")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported by this server; leave it out or send {}")
        return value

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def limit_param(self) -> str:
        """The parameter that sets max_new_tokens, for error messages."""
        return "max_tokens"

    def top_n_tokens(self) -> int:
        """How many alternatives per token the response shows (0: none)."""
        raise NotImplementedError

    @property
    def wants_logprobs(self) -> bool:
        raise NotImplementedError

    def prompt_logprobs(self) -> bool:
        """Whether the prompt's log-probabilities are wanted (completions' echo with logprobs)."""
        return False

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        """The engine parameters of one prompt's first choice (`prepare` seeds the others)."""
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        greedy = temperature == 0.0 or top_p == 0.0  # both limits select the most likely token
        values: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": not greedy,
            "temperature": temperature if not greedy else 1.0,
            "top_p": top_p if not greedy else 1.0,
            "top_k": max(self.top_k or 0, 0),
            "repetition_penalty": self.repetition_penalty or 1.0,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "stop_sequences": [self.stop] if isinstance(self.stop, str) else (self.stop or []),
            "ignore_eos": bool(self.ignore_eos),
            "top_n_tokens": self.top_n_tokens(),
            "prompt_logprobs": self.prompt_logprobs(),
            # OpenAI takes any 64-bit seed; the engine's are 0..2**63-1, so fold, keeping "same seed, same text"
            "seed": None if self.seed is None else self.seed % 2**63,
        }
        try:
            return SamplingParams(**values)
        except ValidationError as exc:  # not expected after the checks above; still a 400, not a 500
            raise validation_error(exc, "", SamplingParams) from None


#: JSON schemas of the fields checked by hand (for the OpenAPI document; `prompts` and `chat_messages` check them)
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
PROMPT_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1},
                           {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                           _TOKEN_IDS, {"type": "array", "minItems": 1, "items": _TOKEN_IDS}]}
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
MESSAGES_SCHEMA = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role", "content"], "additionalProperties": False,
    "properties": {"role": {"enum": list(ROLES)}, "name": {"type": "string"},
                   "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}}}}


class CompletionRequest(_OpenAIRequest):
    prompt: Any = Field(json_schema_extra=PROMPT_SCHEMA)  # checked in `prompts`
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt only (echo + logprobs)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Bool | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    def prompt_logprobs(self) -> bool:
        # max_tokens 0 is prompt scoring, the engine contract's combination with prompt_logprobs
        return bool(self.echo) and (self.wants_logprobs or self.max_tokens == 0)

    @property
    def sequences_per_prompt(self) -> int:
        """How many sequences are generated per prompt: best_of, of which the n best are returned."""
        return max(self.best_of or 1, self.choices_per_prompt)

    def top_n_tokens(self) -> int:
        return self.logprobs or 0

    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or token ids; OpenAI allows one or a list of either."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(item, str) for item in prompt):
                return list(prompt)
            if all(_is_token_id(item) for item in prompt):
                return [[int(item) for item in prompt]]
            if all(isinstance(item, list) and item and all(_is_token_id(i) for i in item) for item in prompt):
                return [[int(i) for i in item] for item in prompt]
        raise InvalidRequest("prompt must be a string, a non-empty list of strings, a list of token ids, or a list "
                             "of lists of token ids", "prompt")


class ChatCompletionRequest(_OpenAIRequest):
    messages: Any = Field(json_schema_extra=MESSAGES_SCHEMA)  # checked in `chat_messages`
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Bool | None = None
    top_logprobs: int | None = Field(None, **TOP_N_TOKENS_RANGE)
    response_format: dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") != "text":
            raise ValueError('only {"type": "text"} is supported (no JSON mode or structured outputs)')
        return value

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)

    def top_n_tokens(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else 0

    @property
    def completion_limit(self) -> int | None:
        """max_completion_tokens, or the older max_tokens it replaces."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def limit_param(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None and self.max_tokens else "max_completion_tokens"

    @property
    def sequences_per_prompt(self) -> int:
        return self.choices_per_prompt

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them: role and content text."""
        if not isinstance(self.messages, list) or not self.messages:
            raise InvalidRequest("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
        return [_message(index, message) for index, message in enumerate(self.messages)]


def parse_completion(data: dict[str, Any], count: Any = None) -> CompletionRequest:
    request = _parse(CompletionRequest, data, count)
    if request.best_of is not None and request.best_of < request.choices_per_prompt:
        raise InvalidRequest(f"best_of = {request.best_of} must be at least n = {request.choices_per_prompt}: best_of "
                             "sequences are generated and the n best returned", "best_of")
    if request.stream and request.sequences_per_prompt > request.choices_per_prompt:
        raise InvalidRequest("best_of greater than n cannot be streamed: the best sequences are known only at the end; "
                             "send stream: false", "best_of")
    if request.max_tokens == 0 and not request.echo:
        raise InvalidRequest("max_tokens = 0 generates nothing; it scores the prompt with echo: true (and logprobs)",
                             "max_tokens")
    return request


def parse_chat(data: dict[str, Any], count: Any = None) -> ChatCompletionRequest:
    request = _parse(ChatCompletionRequest, data, count)
    if request.top_logprobs is not None and not request.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs set to true", "top_logprobs")
    return request


def _parse(model: type[_OpenAIRequest], data: dict[str, Any], count: Any = None) -> Any:
    for name, feature in UNSUPPORTED.items():
        value = data.get(name)
        if value is not None and value != [] and not (name == "tool_choice" and value == "none"):
            raise InvalidRequest(f"{name}: {feature} is not supported by this server", name)
    data = {key: value for key, value in data.items() if key not in UNSUPPORTED}
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, "", model) from None
    ignored = list(request.model_extra or {})
    if request.stream_options is not None:
        ignored += [f"stream_options.{name}" for name in request.stream_options.model_extra or {}]
    IGNORED_FIELDS.note("openai", ignored, count)
    if request.stream_options is not None and not request.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true", "stream_options")
    return request


def _message(index: int, message: Any) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where} must be an object with role and content", where)
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequest(f"{where}.role = {role!r} is not supported; use one of {', '.join(ROLES)}",
                             f"{where}.role")
    if message.get("tool_calls") or message.get("function_call"):
        raise InvalidRequest(f"{where}: tool calls are not supported by this server", f"{where}.tool_calls")
    unknown = set(message) - {"role", "content", "name", "refusal", "tool_calls", "function_call"}
    if unknown:
        raise InvalidRequest(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; a message has role, content and "
                             "optionally name", f"{where}.{sorted(unknown)[0]}")
    return {"role": "system" if role == "developer" else role,  # chat templates know OpenAI's older name only
            "content": _content(where, message.get("content"))}


def _content(where: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        texts = []
        for number, part in enumerate(content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{where}.content[{number}]: only text parts ({{\"type\": \"text\", \"text\": "
                                     f"\"...\"}}) are supported, got type {part.get('type')!r}",
                                     f"{where}.content[{number}]")
            texts.append(part["text"])
        return "\n".join(texts)  # as vLLM joins text parts for templates that take a string
    raise InvalidRequest(f"{where}.content must be a string or a list of text parts", f"{where}.content")


def _is_token_id(value: Any) -> bool:
    """A non-negative integer; 7.0 counts, as JSON Schema's "integer" (the document's) has it."""
    integral = isinstance(value, int) or isinstance(value, float) and value.is_integer()
    return integral and not isinstance(value, bool) and value >= 0
