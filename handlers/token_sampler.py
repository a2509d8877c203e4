"""Choosing the next token of every request in a batch at once, each request with its own parameters.

One `TokenSampler` serves every engine (AutoTP, FastGen, kernel injection). It runs on the logits' device
and is vectorised across the batch: penalties, temperature, top-k/top-p and the draw are a handful of
batched tensor operations, and the only host synchronisation is reading the chosen ids back.

Why not transformers' logits processors: each holds one value for the whole batch
(`TemperatureLogitsWarper(0.7)`), so a batch whose rows have different temperatures, top-p and penalties
needs one processor call per row (what this module did before: 99 tok/s sampled against 212 greedy on the
CPU). The semantics follow them exactly, batched:
  - repetition penalty: CTRL (Keskar et al., 2019) as `RepetitionPenaltyLogitsProcessor`: over prompt and
    generated tokens, a positive logit is divided by the penalty, a negative one multiplied;
  - presence/frequency penalties: OpenAI's definition, over generated tokens only:
    logit -= presence * [count > 0] + frequency * count;
  - temperature, then top-k, then top-p over the top-k-renormalised distribution (the order of
    `generate`'s warpers); top-p keeps the smallest prefix whose mass reaches p (`TopPLogitsWarper`).

The draw is inverse-CDF sampling with one uniform number per row. The number comes from a counter-based
generator (SplitMix64, Steele et al., OOPSLA 2014) keyed by the request's seed and its token index, so a
seed gives the same text whatever else shares the batch, on any device, without a `torch.Generator` per
row (which is device-bound: a CPU generator cannot drive CUDA sampling). Requests without a seed get a
random one.

Reported log-probabilities are the model's own (log-softmax of the raw logits), as LMI and vLLM's default
report them; the chosen token's is a gather minus a logsumexp per row (no vocabulary-sized copy), and
alternatives (top_n_tokens) are computed only for the rows that asked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from handlers.engine import SamplingParams

#: on a CPU, top-p rows first look at this many most likely tokens (a full sort of the vocabulary per row
#: costs more than the rest of sampling); rows whose nucleus is wider are redone over the whole vocabulary
CPU_TOP_P_CANDIDATES = 256

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def uniform_for(seed: int, index: int) -> float:
    """The uniform number in [0, 1) that token `index` of a request seeded `seed` is drawn with."""
    return (_splitmix64(seed ^ _splitmix64(index)) >> 11) * 2.0**-53


@dataclass
class SequenceSampling:
    """One request's sampling state: its parameters, seed and token history (prompt + generated)."""

    params: SamplingParams
    prompt_length: int
    history: list[int]
    seed: int = 0
    sampled: int = 0  # tokens drawn so far (the counter of the random stream)
    #: row of the penalty history table (see TokenSampler); None until the request needs one
    history_row: int | None = None
    history_synced: int = 0  # how many of `history` are in the device table

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: list[int]) -> "SequenceSampling":
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        return cls(params, len(prompt_ids), list(prompt_ids), seed)

    @property
    def greedy(self) -> bool:
        # SamplingParams.greedy treats temperatures below MIN_SAMPLING_TEMPERATURE as greedy: dividing logits by
        # ~1e-300 would overflow to inf (and NaN probabilities)
        return self.params.greedy

    @property
    def repetition(self) -> bool:
        return self.params.repetition_penalty != 1.0

    @property
    def additive(self) -> bool:
        return self.params.presence_penalty != 0.0 or self.params.frequency_penalty != 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition or self.additive


class Choice(NamedTuple):
    """One row's draw (a named tuple: a step makes one per running request on the path between two launches,
    where a frozen dataclass's slower construction shows)."""

    token_id: int
    log_prob: float
    top: tuple[tuple[int, float], ...]  # (token id, log prob) of the most likely alternatives
    error: str | None = None  # this row's sampling failed; the request ends with an error, its batch-mates go on


@dataclass
class _HistoryTable:
    """Token histories of penalised requests on the device, one row each, so penalties gather and scatter
    over a [rows, length] index instead of a per-row Python loop; rows are reused as requests finish."""

    rows: int
    length: int
    device: torch.device
    ids: torch.Tensor = field(init=False)
    free: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.ids = torch.zeros((self.rows, self.length), dtype=torch.long, device=self.device)
        self.free = list(range(self.rows - 1, -1, -1))


class TokenSampler:
    """Samples one token per row of a logits batch. `max_length` bounds a request's prompt + generated
    tokens (the penalty history table is [max_sequences, max_length] on the device)."""

    def __init__(self, max_sequences: int, max_length: int):
        self.max_sequences = max_sequences
        self.max_length = max_length
        self._histories: _HistoryTable | None = None

    def release(self, state: SequenceSampling) -> None:
        """The request finished: its history row (if any) is free again."""
        if state.history_row is not None and self._histories is not None:
            self._histories.free.append(state.history_row)
            state.history_row = None

    def sample(self, logits: torch.Tensor, states: list[SequenceSampling]) -> list[Choice]:
        """logits: [rows, vocab], one row per state. Appends each chosen token to its state's history."""
        return self.launch(logits, states).resolve()

    def launch(self, logits: torch.Tensor, states: list[SequenceSampling]) -> "PendingChoices":
        """Queue the sampling of every row on the logits' device without reading anything back, so that the
        engine can launch the next forward pass and do host work before it waits (`PendingChoices.resolve`)."""
        raw = logits.float()
        device = raw.device
        scores = self._penalize(raw, states)
        sampled_rows = [row for row, state in enumerate(states) if not state.greedy]
        finite = None
        if len(sampled_rows) < len(states):
            chosen = scores.argmax(dim=-1)
        if sampled_rows:
            draws, finite = self._draw(scores, [states[row] for row in sampled_rows], sampled_rows, device)
            if len(sampled_rows) == len(states):
                chosen = draws
            else:
                chosen = chosen.index_copy(0, torch.tensor(sampled_rows, device=device), draws)
        log_norm = torch.logsumexp(raw, dim=-1)
        chosen_log_probs = raw.gather(1, chosen.view(-1, 1)).view(-1) - log_norm
        top = self._top_alternatives(raw, log_norm, states)
        for state in states:
            state.sampled += 1
        return PendingChoices(states, chosen, chosen_log_probs, sampled_rows, finite, top)

    # ---- penalties ----------------------------------------------------------------------------------
    def _penalize(self, raw: torch.Tensor, states: list[SequenceSampling]) -> torch.Tensor:
        rows = [row for row, state in enumerate(states) if state.penalized]
        if not rows:
            return raw
        scores = raw.clone()
        device = raw.device
        table = self._history_table(device)
        penalized = [states[row] for row in rows]
        self._sync_histories(table, penalized)
        table_rows = torch.tensor([state.history_row for state in penalized], device=device)
        lengths = torch.tensor([len(state.history) for state in penalized], device=device)
        prompt_lengths = torch.tensor([state.prompt_length for state in penalized], device=device)
        width = max(len(state.history) for state in penalized)
        history = table.ids.index_select(0, table_rows)[:, :width]
        columns = torch.arange(width, device=device).view(1, -1)
        valid = columns < lengths.view(-1, 1)
        every_row = len(rows) == len(states)
        row_index = torch.tensor(rows, device=device)
        sub = scores if every_row else scores.index_select(0, row_index)
        if any(state.repetition for state in penalized):
            # Invalid columns point at the row's first token: duplicates gather and scatter the same value.
            ids = torch.where(valid, history, history[:, :1])
            penalty = torch.tensor([s.params.repetition_penalty for s in penalized], device=device).view(-1, 1)
            gathered = sub.gather(1, ids)
            sub.scatter_(1, ids, torch.where(gathered < 0, gathered * penalty, gathered / penalty))
        if any(state.additive for state in penalized):
            generated = valid & (columns >= prompt_lengths.view(-1, 1))
            vocab = sub.shape[1]
            ids = torch.where(generated, history, torch.full_like(history, vocab))  # column `vocab`: a sink
            counts = torch.zeros((len(rows), vocab + 1), device=device)
            counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
            counts = counts[:, :vocab]
            frequency = torch.tensor([s.params.frequency_penalty for s in penalized], device=device).view(-1, 1)
            presence = torch.tensor([s.params.presence_penalty for s in penalized], device=device).view(-1, 1)
            sub = sub - frequency * counts - presence * (counts > 0).to(sub.dtype)
        return sub if every_row else scores.index_copy(0, row_index, sub)

    def _history_table(self, device: torch.device) -> _HistoryTable:
        if self._histories is None or self._histories.device != device:
            self._histories = _HistoryTable(self.max_sequences, self.max_length + 1, device)
        return self._histories

    @staticmethod
    def _sync_histories(table: _HistoryTable, states: list[SequenceSampling]) -> None:
        """Copy the tokens of each state's history not yet in its device row (the prompt once, then one a
        step) with one indexed write for the whole batch."""
        rows: list[int] = []
        columns: list[int] = []
        tokens: list[int] = []
        for state in states:
            if state.history_row is None:
                if not table.free:
                    raise RuntimeError("no free penalty-history row (more penalised requests than max_sequences)")
                state.history_row = table.free.pop()
                state.history_synced = 0
            new = state.history[state.history_synced:]
            rows += [state.history_row] * len(new)
            columns += range(state.history_synced, len(state.history))
            tokens += new
            state.history_synced = len(state.history)
        if tokens:
            device = table.ids.device
            table.ids[torch.tensor(rows, device=device), torch.tensor(columns, device=device)] = \
                torch.tensor(tokens, dtype=torch.long, device=device)

    # ---- the draw -----------------------------------------------------------------------------------
    def _draw(self, scores: torch.Tensor, states: list[SequenceSampling], rows_of_states: list[int],
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled ids for `states` (whose logits are the rows `rows_of_states` of `scores`), and whether each
        one's probabilities were finite (read back with the ids, not here)."""
        rows = len(states)
        temperature = torch.tensor([s.params.temperature for s in states], device=device).view(-1, 1)
        uniforms = torch.tensor([uniform_for(s.seed, s.sampled) for s in states], dtype=torch.float64,
                                device=device)
        top_k = [s.params.top_k for s in states]
        top_p = [s.params.top_p for s in states]
        truncated = [k > 0 or p < 1.0 for k, p in zip(top_k, top_p)]
        ids = torch.empty(rows, dtype=torch.long, device=device)
        finite = torch.ones(rows, dtype=torch.bool, device=device)
        groups = {True: [i for i in range(rows) if truncated[i]], False: [i for i in range(rows) if not truncated[i]]}
        for is_truncated, members in groups.items():
            if not members:
                continue
            index = torch.tensor(members, device=device)
            sub_scores = self._rows(scores, [rows_of_states[i] for i in members]) / temperature.index_select(0, index)
            if is_truncated:
                chosen, ok = self._draw_truncated(sub_scores, [top_k[i] for i in members],
                                                  [top_p[i] for i in members], uniforms.index_select(0, index))
            else:
                chosen, ok = self._draw_full(sub_scores, uniforms.index_select(0, index))
            ids.index_copy_(0, index, chosen)
            finite.index_copy_(0, index, ok)
        return ids, finite

    @staticmethod
    def _rows(scores: torch.Tensor, members: list[int]) -> torch.Tensor:
        if members == list(range(scores.shape[0])):
            return scores
        return scores.index_select(0, torch.tensor(members, device=scores.device))

    @staticmethod
    def _draw_full(scores: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse-CDF draw over the whole vocabulary."""
        probs = torch.softmax(scores, dim=-1)
        cumulative = probs.cumsum(dim=-1)
        total = cumulative[:, -1]
        target = (uniforms * total.double()).to(cumulative.dtype).view(-1, 1)
        chosen = torch.searchsorted(cumulative, target, right=True).view(-1)
        return chosen.clamp_(max=scores.shape[-1] - 1), torch.isfinite(total)

    @staticmethod
    def _draw_truncated(scores: torch.Tensor, top_k: list[int], top_p: list[float],
                        uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k then top-p over the sorted most likely tokens, then an inverse-CDF draw among the kept."""
        device = scores.device
        vocab = scores.shape[-1]
        # a top_k beyond the vocabulary keeps every token (as in vLLM); clamping here also keeps a huge client
        # value (any int passes the request schema) from overflowing the int64 tensor below
        top_k = [min(k, vocab) for k in top_k]
        needed = [k if k > 0 else vocab for k in top_k]
        if device.type == "cpu" and any(k <= 0 and p < 1.0 for k, p in zip(top_k, top_p)):
            needed = [k if k > 0 else min(vocab, CPU_TOP_P_CANDIDATES) for k in top_k]
        width = min(vocab, max(needed))
        values, candidates = scores.topk(width, dim=-1)  # sorted, most likely first
        probs = torch.exp(values - torch.logsumexp(scores, dim=-1, keepdim=True))
        columns = torch.arange(width, device=device).view(1, -1)
        k_limit = torch.tensor([k if k > 0 else vocab for k in top_k], device=device).view(-1, 1)
        kept = probs * (columns < k_limit)
        # top-p over the top-k-renormalised distribution: keep a token if the mass before it is below p
        k_mass = kept.sum(dim=-1, keepdim=True)
        before = (kept.cumsum(dim=-1) - kept) / k_mass
        p_limit = torch.tensor(top_p, device=device, dtype=probs.dtype).view(-1, 1)
        kept = kept * (before < p_limit)
        if width < vocab:
            # CPU shortcut: rows whose top-p nucleus may reach past the candidates are redone with 8x the
            # candidates, then (rarely: nearly flat distributions) over the sorted vocabulary.
            covered = (probs.sum(dim=-1) >= p_limit.view(-1)) | (k_limit.view(-1) <= width)
            short = [i for i, ok in enumerate(covered.tolist()) if not ok]
            if short:
                index = torch.tensor(short, device=device)
                rows, wider_p, wider_u = scores.index_select(0, index), [top_p[i] for i in short], uniforms.index_select(0, index)
                if width * 8 < vocab:
                    redo, redo_ok = TokenSampler._draw_truncated_width(rows, wider_p, wider_u, width * 8)
                else:
                    redo, redo_ok = TokenSampler._draw_nucleus_full(rows, wider_p, wider_u)
                chosen, ok = TokenSampler._inverse_cdf(kept, candidates, uniforms)
                return chosen.index_copy(0, index, redo), ok.index_copy(0, index, redo_ok)
        return TokenSampler._inverse_cdf(kept, candidates, uniforms)

    @staticmethod
    def _draw_truncated_width(scores: torch.Tensor, top_p: list[float], uniforms: torch.Tensor,
                              width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-p rows (no top-k) over their `width` most likely tokens; rows still not covered go to the
        full sort."""
        device = scores.device
        values, candidates = scores.topk(width, dim=-1)
        probs = torch.exp(values - torch.logsumexp(scores, dim=-1, keepdim=True))
        p_limit = torch.tensor(top_p, device=device, dtype=probs.dtype).view(-1, 1)
        kept = probs * ((probs.cumsum(dim=-1) - probs) < p_limit)
        chosen, ok = TokenSampler._inverse_cdf(kept, candidates, uniforms)
        short = [i for i, covered in enumerate((probs.sum(dim=-1) >= p_limit.view(-1)).tolist()) if not covered]
        if short:
            index = torch.tensor(short, device=device)
            redo, redo_ok = TokenSampler._draw_nucleus_full(scores.index_select(0, index), [top_p[i] for i in short],
                                                           uniforms.index_select(0, index))
            chosen, ok = chosen.index_copy(0, index, redo), ok.index_copy(0, index, redo_ok)
        return chosen, ok

    @staticmethod
    def _draw_nucleus_full(scores: torch.Tensor, top_p: list[float],
                           uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, candidates = scores.sort(dim=-1, descending=True)
        probs = torch.softmax(values, dim=-1)
        before = probs.cumsum(dim=-1) - probs
        p_limit = torch.tensor(top_p, device=scores.device, dtype=probs.dtype).view(-1, 1)
        return TokenSampler._inverse_cdf(probs * (before < p_limit), candidates, uniforms)

    @staticmethod
    def _inverse_cdf(kept: torch.Tensor, candidates: torch.Tensor,
                     uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cumulative = kept.cumsum(dim=-1)
        total = cumulative[:, -1]
        target = (uniforms * total.double()).to(cumulative.dtype).view(-1, 1)
        position = torch.searchsorted(cumulative, target, right=True).clamp_(max=kept.shape[-1] - 1)
        return candidates.gather(1, position).view(-1), torch.isfinite(total) & (total > 0)

    # ---- alternatives -------------------------------------------------------------------------------
    @staticmethod
    def _top_alternatives(raw: torch.Tensor, log_norm: torch.Tensor,
                          states: list[SequenceSampling]) -> tuple[list[int], torch.Tensor, torch.Tensor] | None:
        """The rows that asked for top_n_tokens, with their most likely ids and log-probabilities (on the
        device; `PendingChoices.resolve` reads them)."""
        asking = [row for row, state in enumerate(states) if state.params.top_n_tokens > 0]
        if not asking:
            return None
        width = max(states[row].params.top_n_tokens for row in asking)
        index = torch.tensor(asking, device=raw.device)
        values, ids = raw.index_select(0, index).topk(width, dim=-1)
        return asking, ids, values - log_norm.index_select(0, index).view(-1, 1)


class PendingChoices:
    """A batch's sampling, queued on the device: `resolve()` reads the chosen ids (with their log-probabilities
    and any alternatives asked for) back to the host, the one synchronisation of an engine step."""

    def __init__(self, states: list[SequenceSampling], chosen: torch.Tensor, log_probs: torch.Tensor,
                 sampled_rows: list[int], finite: torch.Tensor | None,
                 top: tuple[list[int], torch.Tensor, torch.Tensor] | None):
        self.states = states
        self._chosen = chosen
        self._log_probs = log_probs
        self._sampled_rows = sampled_rows
        self._finite = finite
        self._top = top

    def resolve(self) -> list[Choice]:
        """The chosen token of every row; appends each to its state's history (what penalties count)."""
        chosen = self._chosen.tolist()
        log_probs = self._log_probs.tolist()
        errors: dict[int, str] = {}
        if self._finite is not None:
            for position, ok in enumerate(self._finite.tolist()):
                if not ok:
                    errors[self._sampled_rows[position]] = ("sampling failed: the probabilities are not finite "
                                                            "(the logits contain inf or NaN)")
        top: dict[int, tuple[tuple[int, float], ...]] = {}
        if self._top is not None:
            asking, ids, values = self._top
            for row, id_row, value_row in zip(asking, ids.tolist(), values.tolist()):
                n = self.states[row].params.top_n_tokens
                top[row] = tuple(zip(id_row[:n], value_row[:n]))
        choices = []
        for row, (state, token, log_prob) in enumerate(zip(self.states, chosen, log_probs)):
            state.history.append(token)
            choices.append(Choice(token, log_prob, top.get(row, ()) if top else (), errors.get(row) if errors else None))
        return choices
