"""OpenAI's response bodies: a completion or chat completion as one JSON object, or as server-sent chunks.

Streams follow OpenAI's framing: `data: {chunk}` events and a last `data: [DONE]`. A chat choice's first
chunk carries `"role": "assistant"`; the chunk of a choice's last output carries its finish_reason. With
`stream_options.include_usage` every chunk has `"usage": null` and one more chunk before [DONE] has empty
choices and the usage. A failure after the headers went out is sent as `data: {"error": {...}}` (OpenAI's
error shape), then [DONE], so clients end their read loop normally. LMI's jsonlines_chat format (a chat body
on /invocations streamed as JSON lines) carries the same chunks one per line, without [DONE].

best_of: `results` hold every generated sequence (`sequences_per_prompt` per prompt); the body returns the
`choices_per_prompt` of each prompt with the highest mean log-probability per token, best first.

Counts: usage.prompt_tokens is each prompt's token count once (however many choices share it), as OpenAI
counts; completion_tokens is every generated token, including an end-of-sequence token, so it equals the
number of logprobs entries. finish_reason is "stop" (end-of-sequence or a stop sequence) or "length".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from entrypoint.protocol.errors import ErrorFamily, error_body, exception_for_output
from entrypoint.protocol import schema
from entrypoint.protocol.lmi import Accumulator
from entrypoint.protocol.schema import body, build
from handlers.engine import FinishReason, RequestOutput, Token

DONE = b"data: [DONE]\n\n"
#: what a log-probability of -inf is reported as: JSON has no infinity
LOG_PROB_FLOOR = -9999.0

_FINISH_REASONS = {FinishReason.EOS_TOKEN: "stop", FinishReason.STOP_SEQUENCE: "stop", FinishReason.LENGTH: "length"}


@dataclass
class CompletionBuilder:
    """One OpenAI response under construction: its choices (one Accumulator each, in index order)."""

    chat: bool
    id: str
    created: int
    model: str
    results: list[Accumulator]
    prompt_tokens: int  # each prompt counted once
    logprobs: bool = False
    echo: bool = False  # completions: the prompt text starts each choice's text
    token_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:<id>"
    choices_per_prompt: int = 1  # n
    sequences_per_prompt: int = 1  # best_of (>= n)

    def chosen(self) -> list[Accumulator]:
        """The returned choices in order: per prompt, the n best of its best_of sequences."""
        if self.sequences_per_prompt == self.choices_per_prompt:
            return self.results
        chosen = []
        for start in range(0, len(self.results), self.sequences_per_prompt):
            group = self.results[start:start + self.sequences_per_prompt]
            chosen += sorted(group, key=lambda result: result.mean_log_prob, reverse=True)[:self.choices_per_prompt]
        return chosen

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def usage(self) -> schema.Usage:
        completion = sum(result.generated_tokens for result in self.results)
        return build(schema.Usage, prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion)

    def body(self) -> dict[str, Any]:
        choices: list[Any] = []
        for index, result in enumerate(self.chosen()):
            reason = finish_reason(result.finish_reason)
            if self.chat:
                message = build(schema.ChatMessage, role="assistant", content=result.text, refusal=None)
                choices.append(build(schema.ChatChoice, index=index, message=message, finish_reason=reason,
                                     logprobs=chat_logprobs(result.tokens, self.token_ids) if self.logprobs else None))
            else:
                tokens = [*result.prompt_details, *result.tokens] if self.echo else result.tokens
                choices.append(build(schema.CompletionChoice, index=index, finish_reason=reason,
                                     text=(result.prompt if self.echo else "") + result.text,
                                     logprobs=completion_logprobs(tokens, 0, self.token_ids) if self.logprobs else None))
        model = schema.ChatCompletion if self.chat else schema.Completion
        return body(build(model, id=self.id, object=self.object, created=self.created, model=self.model,
                          choices=choices, usage=self.usage()))


class CompletionStreamEncoder:
    """A `streaming.ChunkEncoder` for one `Completion`, as OpenAI's chunks."""

    def __init__(self, completion: CompletionBuilder, include_usage: bool, jsonlines: bool = False,
                 fields: Mapping[str, str] | None = None):
        self.fields = fields  # the engine's field names -> OpenAI's, for a refusal's param
        self.jsonlines = jsonlines
        self.media_type = "application/jsonlines" if jsonlines else "text/event-stream"
        self.completion = completion
        self.results = completion.results
        self.include_usage = include_usage
        self.failure: BaseException | None = None
        self._started: set[int] = set()  # choices that sent their first chunk
        self._offsets = [0] * len(completion.results)  # completions' text_offset so far, per choice

    def feed(self, index: int, output: RequestOutput) -> list[bytes]:
        result = self.results[index]
        released = result.add(output)
        error = exception_for_output(output, self.fields) if output.finished else None
        if error is not None:
            return self.error(error)
        first = index not in self._started
        reason = finish_reason(result.finish_reason) if output.finished else None
        if not (first or output.text or reason or (self.completion.logprobs and released)):
            return []  # nothing the client can see yet (text held back for a stop sequence or UTF-8)
        self._started.add(index)
        choice: dict[str, Any] = {"index": index}
        if self.completion.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": output.text} if first else {}
            if output.text and not first:
                delta["content"] = output.text
            choice["delta"] = delta
            logprobs = chat_logprobs(released, self.completion.token_ids) if self.completion.logprobs else None
            choice["logprobs"] = body(logprobs) if logprobs is not None else None
        else:
            prefix = result.prompt if first and self.completion.echo else ""
            choice["text"] = prefix + output.text
            logprobs = None
            if self.completion.logprobs:
                tokens = [*result.prompt_details, *released] if prefix else released
                logprobs = body(completion_logprobs(tokens, self._offsets[index], self.completion.token_ids))
                self._offsets[index] += sum(len(token.text) for token in tokens)
            choice["logprobs"] = logprobs
        choice["finish_reason"] = reason
        return [self._chunk([choice])]

    def error(self, exc: BaseException) -> list[bytes]:
        self.failure = exc
        return [self._frame(error_body(exc, ErrorFamily.OPENAI)), *self._done()]

    def end(self) -> list[bytes]:
        chunks = [self._chunk([], usage=body(self.completion.usage()))] if self.include_usage else []
        return chunks + self._done()

    def _done(self) -> list[bytes]:
        return [] if self.jsonlines else [DONE]

    def _frame(self, obj: dict[str, Any]) -> bytes:
        return (json.dumps(obj, ensure_ascii=False) + "\n").encode() if self.jsonlines else _event(obj)

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        c = self.completion
        chunk: dict[str, Any] = {"id": c.id, "object": "chat.completion.chunk" if c.chat else "text_completion",
                                 "created": c.created, "model": c.model, "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage
        return self._frame(chunk)


def finish_reason(reason: FinishReason | None) -> str | None:
    return _FINISH_REASONS.get(reason) if reason is not None else None


def token_name(token: Token, as_id: bool) -> str:
    """How logprobs name a token: its text, or with vLLM's return_tokens_as_token_ids "token_id:<id>"."""
    return f"token_id:{token.id}" if as_id else token.text


def chat_logprobs(tokens: list[Token] | tuple[Token, ...], as_ids: bool = False) -> schema.ChatLogprobs:
    def entry(token: Token, model: type[schema.TopLogprob]) -> Any:
        top = {"top_logprobs": [entry(alternative, schema.TopLogprob) for alternative in token.top_tokens]} \
            if model is schema.ChatTokenLogprob else {}
        return build(model, token=token_name(token, as_ids), logprob=_log_prob(token.log_prob),
                     bytes=list(token.text.encode()), **top)

    return build(schema.ChatLogprobs, content=[entry(token, schema.ChatTokenLogprob) for token in tokens], refusal=None)


def completion_logprobs(tokens: list[Token] | tuple[Token, ...], offset: int,
                        as_ids: bool = False) -> schema.CompletionLogprobs:
    """The legacy completions shape: parallel lists, `text_offset` counted from the start of the choice's text.
    top_logprobs always holds the chosen token too, even when it is not among the most likely (as OpenAI and
    vLLM answer). A prompt token without context (the first, echo) has null for both, as OpenAI's."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return build(schema.CompletionLogprobs, tokens=[token_name(token, as_ids) for token in tokens],
                 token_logprobs=[None if math.isnan(token.log_prob) else _log_prob(token.log_prob) for token in tokens],
                 top_logprobs=[None if math.isnan(token.log_prob) else _top_logprobs(token, as_ids) for token in tokens],
                 text_offset=offsets)


def _top_logprobs(token: Token, as_ids: bool = False) -> dict[str, float]:
    top = {token_name(alternative, as_ids): _log_prob(alternative.log_prob) for alternative in token.top_tokens}
    top.setdefault(token_name(token, as_ids), _log_prob(token.log_prob))
    return top


def _log_prob(value: float) -> float:
    return LOG_PROB_FLOOR if math.isnan(value) or value < LOG_PROB_FLOOR else value


def _event(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()
