"""What one engine step did to one request, as the scheduler reports it to the output processor, and the
finishes a token id decides.

A finish by token id (end of sequence, a stop token, max_new_tokens) is decided as soon as the token is read
back, before the next step is scheduled, so no step is spent on a finished request; a stop sequence needs the
decoded text and is the output processor's (`handlers.output_processor`). Every engine, whatever it
schedules, decides them with the same `TokenStops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from handlers.engine import FinishReason
from handlers.token_sampler import Choice


@dataclass(frozen=True)
class TokenStops:
    """The token ids that end a request and its length limit."""

    stop_ids: frozenset[int]  # stop_token_ids, and stop sequences that are special tokens (`</s>`, `<|im_end|>`)
    eos_ids: frozenset[int]  # empty with ignore_eos
    max_new_tokens: int

    def reason(self, token_id: int, generated: int) -> FinishReason | None:
        """Why the request ends with `token_id`, its `generated`-th token, or None. A stop token outranks the
        end of sequence, which outranks the length (the finish reason clients see)."""
        if token_id in self.stop_ids:
            return FinishReason.STOP_SEQUENCE
        if token_id in self.eos_ids:
            return FinishReason.EOS_TOKEN
        if generated >= self.max_new_tokens:
            return FinishReason.LENGTH
        return None


@dataclass(frozen=True)
class PromptScores:
    """Prompt log-probabilities of one scored chunk: for prompt tokens start+1 .. start+len(ids)."""

    first: bool  # the chunk starts the prompt (its first token has no log-probability)
    token_ids: list[int]
    log_probs: list[float]
    top: list[tuple[tuple[int, float], ...]]


class StepEvent(NamedTuple):
    """What a resolved step did to one request, for the output processor (a named tuple: one per running
    request is made between two launches)."""

    request_id: str
    choice: Choice | None = None  # the token it sampled (None: a prompt scored without generating)
    finish: FinishReason | None = None  # decided by the token id or the length; stop strings come later
    prompt_scores: PromptScores | None = None
    generated_tokens: int = 0
    prompt_tokens: int = 0
