"""From sampled token ids to what clients receive: text, stop sequences, log-probabilities, finish reasons.

Any engine feeds it the same way, whatever it schedules (the rolling batch's steps, a static batch): `add` a
request, then `process` the `StepEvent`s of a step (a sampled token, a finish decided by a token id or the
length, prompt log-probabilities), and `final` when a request ends without a token (cancel). It keeps each
request's incremental detokenizer and stop-sequence matcher (`handlers.detokenizer`) and builds one
`RequestOutput` per request that progressed. A stop sequence is found here, after the text is decoded; the
engine tells its scheduler (`ProcessedStep.stopped`), which may already have the request in the next step on
the device: that step's token for it is dropped (the engine overlaps this work with the device, as vLLM v1's
output processor runs beside its engine core).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from handlers.detokenizer import IncrementalDetokenizer, StopSequenceMatcher
from handlers.engine import FinishReason, GenerationRequest, InvalidRequest, RequestOutput, Token
from handlers.step_events import PromptScores, StepEvent, TokenStops


@dataclass
class _Output:
    request: GenerationRequest
    detokenizer: IncrementalDetokenizer
    stops: StopSequenceMatcher
    prompt_details: list[Token] = field(default_factory=list)  # with params.prompt_logprobs
    reported_prompt: bool = False


@dataclass(frozen=True)
class ProcessedStep:
    outputs: list[RequestOutput]
    stopped: list[str]  # requests a stop sequence ended that the scheduler still holds


class OutputProcessor:
    def __init__(self, tokenizer: Any, eos_token_ids: Iterable[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ()) | self.eos_token_ids
        self._special_by_text = _special_tokens(tokenizer)
        vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else None
        self._vocab = vocab
        self._requests: dict[str, _Output] = {}

    def add(self, request: GenerationRequest) -> TokenStops:
        """Track a request; returns the finishes its token ids decide, for its scheduler. A stop sequence that is
        one of the tokenizer's special tokens is matched on the token id, since text is decoded without them.
        Raises `InvalidRequest` for stop token ids that are not the model's."""
        params = request.params
        vocab = self._vocab
        bad = [token for token in params.stop_token_ids if token < 0 or (vocab is not None and token >= vocab)]
        if bad:
            raise InvalidRequest(f"stop_token_ids {bad} are not token ids of this model "
                                 f"(0..{vocab - 1 if vocab else '?'})", "stop_token_ids")
        special = [text for text in params.stop_sequences if text in self._special_by_text]
        text_stops = [text for text in params.stop_sequences if text not in self._special_by_text]
        self._requests[request.request_id] = _Output(request, IncrementalDetokenizer(self.tokenizer,
                                                                                     request.prompt_token_ids),
                                                     StopSequenceMatcher(text_stops))
        return TokenStops(stop_ids=frozenset(params.stop_token_ids) | {self._special_by_text[t] for t in special},
                          eos_ids=frozenset() if params.ignore_eos else self.eos_token_ids,
                          max_new_tokens=params.max_new_tokens)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def process(self, events: list[StepEvent]) -> ProcessedStep:
        outputs: list[RequestOutput] = []
        stopped: list[str] = []
        for event in events:
            state = self._requests.get(event.request_id)
            if state is None:
                continue  # ended meanwhile (cancelled)
            if event.prompt_scores is not None:
                self._record_prompt(state, event.prompt_scores)
            if event.choice is None and event.finish is None:
                continue  # a prompt chunk: nothing to tell the client yet
            output = self._advance(state, event)
            if output.finished and event.finish is None:
                stopped.append(event.request_id)
            outputs.append(output)
        return ProcessedStep(outputs, stopped)

    def final(self, request_id: str, reason: FinishReason, *, generated_tokens: int,
              error: str | None = None) -> RequestOutput | None:
        """End a request without a new token (cancel): whatever text was held back for a possible stop sequence
        goes out with it."""
        state = self._requests.get(request_id)
        if state is None:
            return None
        return self._final(state, (), reason, state.stops.flush(), generated_tokens, error)

    # ---- one request --------------------------------------------------------------------------------
    def _advance(self, state: _Output, event: StepEvent) -> RequestOutput:
        choice = event.choice
        if choice is None:  # the prompt was scored and nothing is generated
            return self._final(state, (), event.finish or FinishReason.LENGTH, "", event.generated_tokens)
        if choice.error is not None:
            return self._final(state, (), FinishReason.ERROR, state.stops.flush(), event.generated_tokens,
                               choice.error)
        # A token that ends the request by its id (end of sequence, a stop token) is not part of the text.
        by_id = event.finish in (FinishReason.EOS_TOKEN, FinishReason.STOP_SEQUENCE)
        piece = "" if by_id else state.detokenizer.add(choice.token_id)
        visible = state.stops.add(piece)
        token = self._token(choice.token_id, choice.log_prob, choice.top, text=piece)
        reason = FinishReason.STOP_SEQUENCE if state.stops.stopped else event.finish
        if reason is None:
            return RequestOutput(event.request_id, (token,), visible, prompt_tokens=event.prompt_tokens,
                                 generated_tokens=event.generated_tokens, prompt_token_details=self._prompt_once(state))
        return self._final(state, (token,), reason, visible + state.stops.flush(), event.generated_tokens)

    def _final(self, state: _Output, tokens: tuple[Token, ...], reason: FinishReason, text: str,
               generated_tokens: int, error: str | None = None) -> RequestOutput:
        del self._requests[state.request.request_id]
        return RequestOutput(state.request.request_id, tokens, text, finished=True, finish_reason=reason, error=error,
                             prompt_tokens=len(state.request.prompt_token_ids), generated_tokens=generated_tokens,
                             prompt_token_details=self._prompt_once(state))

    def _prompt_once(self, state: _Output) -> tuple[Token, ...]:
        if state.reported_prompt or not state.request.params.prompt_logprobs:
            return ()
        state.reported_prompt = True
        return tuple(state.prompt_details)

    def _record_prompt(self, state: _Output, scores: PromptScores) -> None:
        if scores.first:
            state.prompt_details.append(self._token(state.request.prompt_token_ids[0], math.nan, ()))
        for token_id, value, top in zip(scores.token_ids, scores.log_probs, scores.top):
            state.prompt_details.append(self._token(token_id, value, top))

    def _token(self, token_id: int, log_prob: float, top: tuple[tuple[int, float], ...],
               text: str | None = None) -> Token:
        decode = self.tokenizer.decode
        return Token(id=token_id, text=decode([token_id]) if text is None else text, log_prob=log_prob,
                     special=token_id in self.special_ids,
                     top_tokens=tuple(Token(i, decode([i]), lp, special=i in self.special_ids) for i, lp in top))


def _special_tokens(tokenizer: Any) -> dict[str, int]:
    """Text -> id of the tokenizer's special and added tokens (`</s>`, `<|im_end|>`): a stop sequence equal to
    one of them is matched on the token id, since generated text is decoded without special tokens."""
    found: dict[str, int] = {}
    for text in getattr(tokenizer, "all_special_tokens", ()) or ():
        token_id = tokenizer.convert_tokens_to_ids(text)
        if isinstance(token_id, int) and token_id >= 0:
            found[text] = token_id
    added = getattr(tokenizer, "get_added_vocab", None)
    if added is not None:
        for text, token_id in added().items():
            found.setdefault(text, token_id)
    return found
