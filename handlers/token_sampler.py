"""Choosing the next token of each request in a batch, each with its own parameters.

The logits processors are transformers' own (`RepetitionPenaltyLogitsProcessor`, `TemperatureLogitsWarper`,
`TopKLogitsWarper`, `TopPLogitsWarper`), applied row by row because every request brings its own values;
greedy rows without penalties take a single batched argmax. Presence/frequency penalties follow OpenAI's
definition (logit -= presence * [count > 0] + frequency * count); transformers has no processor for them.

Each sampling request owns a `torch.Generator`, seeded from its `seed` when given, so the same seed gives
the same text regardless of what else shares the batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from handlers.engine import SamplingParams


@dataclass
class SamplerState:
    """Per-request sampling state: its processors, generator and token history (for penalties)."""

    params: SamplingParams
    history: list[int]  # prompt + generated ids (repetition penalty looks at both, as in HF generate)
    prompt_length: int
    processors: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    generator: torch.Generator | None = None

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: list[int]) -> "SamplerState":
        processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        generator = None
        if not params.greedy:
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
            generator = torch.Generator()
            generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        return cls(params, list(prompt_ids), len(prompt_ids), processors, generator)

    @property
    def needs_processing(self) -> bool:
        p = self.params
        return bool(self.processors) or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


@dataclass(frozen=True)
class Choice:
    token_id: int
    log_prob: float
    top: tuple[tuple[int, float], ...]  # (token id, log prob) of the most likely alternatives
    error: str | None = None  # this row's processing failed; the request ends with an error, its batch-mates go on


def sample(logits: torch.Tensor, states: list[SamplerState]) -> list[Choice]:
    """logits: [rows, vocab] (float32 or lower), one row per state; returns one choice per row."""
    logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)  # reported log-probs are the model's, before processing
    chosen = logits.argmax(dim=-1)
    errors: dict[int, str] = {}
    for row, state in enumerate(states):
        if not state.needs_processing and state.params.greedy:
            continue
        try:
            chosen[row] = _choose(logits[row:row + 1], state)
        except (RuntimeError, ValueError) as error:  # e.g. multinomial on non-finite probabilities
            errors[row] = f"sampling failed: {error}"
    top_n = max((state.params.top_n_tokens for state in states), default=0)
    top_values = top_ids = None
    if top_n:
        top_values, top_ids = log_probs.topk(top_n, dim=-1)
    choices = []
    chosen_list = chosen.tolist()
    chosen_log_probs = log_probs.gather(1, chosen.view(-1, 1)).view(-1).tolist()
    for row, state in enumerate(states):
        token = chosen_list[row]
        state.history.append(token)
        top: tuple[tuple[int, float], ...] = ()
        n = state.params.top_n_tokens
        if n and top_ids is not None:
            top = tuple(zip(top_ids[row, :n].tolist(), top_values[row, :n].tolist()))
        choices.append(Choice(token, chosen_log_probs[row], top, errors.get(row)))
    return choices


def _choose(scores: torch.Tensor, state: SamplerState) -> int:
    if state.needs_processing:
        scores = _penalize(scores.clone(), state)
    if state.params.greedy:
        return int(scores.argmax(dim=-1)[0])
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=state.generator)[0, 0])


def _penalize(scores: torch.Tensor, state: SamplerState) -> torch.Tensor:
    params = state.params
    history = torch.tensor([state.history], dtype=torch.long)
    if params.presence_penalty or params.frequency_penalty:
        generated = history[0, state.prompt_length:]
        if generated.numel():
            counts = torch.bincount(generated, minlength=scores.shape[-1])[: scores.shape[-1]].to(scores.dtype)
            scores = scores - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(scores.dtype)
    return state.processors(history, scores)
