"""Rolling (continuous) batching over a `ModelRunner`: the engine behind the CPU/AutoTP path.

One `step()`:
  1. decodes one token for every running request in a single batched forward pass;
  2. spends up to `max_rolling_batch_prefill_tokens` prompt tokens prefilling waiting requests, first come
     first served, while the running batch has room (`max_rolling_batch_size`). A prompt longer than the
     remaining budget is prefilled in chunks over several steps (in the staging row), so one long prompt
     never stalls the running batch for more than one budget's worth of compute. A request whose prompt is
     complete samples its first token from the prefill's logits and joins the running batch;
  3. returns one `RequestOutput` per request that progressed. Finished requests leave the batch at once.

The scheduling is the iteration-level scheduling of Orca (Yu et al., OSDI 2022) with chunked prefill as in
Sarathi (Agrawal et al., 2023). Why our own instead of transformers' `ContinuousBatchingManager`: its
do_sample and seed are manager-wide, it has no stop sequences or per-request penalties, and it runs its own
thread; see `handlers/slot_kv_cache.py` for the cache side.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

from handlers.detokenizer import IncrementalDetokenizer, StopSequenceMatcher
from handlers.engine import (
    Engine,
    EngineHealth,
    EngineStats,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    RequestOutput,
    Token,
)
from handlers.runner import Runner
from handlers.token_sampler import Choice, SamplerState, sample

logger = logging.getLogger(__name__)

#: a prefill pass keeps one row of logits per distinct prompt length (see ModelRunner.prefill_many), so a
#: group of whole prompts holds at most this many lengths
MAX_DISTINCT_PROMPT_LENGTHS = 4


@dataclass
class _Active:
    request: GenerationRequest
    sampler: SamplerState
    detokenizer: IncrementalDetokenizer
    stops: StopSequenceMatcher
    prefilled: int = 0  # prompt tokens whose KV is cached
    cached: int = 0  # all tokens whose KV is cached (prompt + generated fed back)
    generated: list[int] = field(default_factory=list)

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_token_ids


class RollingBatchEngine(Engine):
    def __init__(self, runner: Runner, tokenizer: Any, *, max_batch: int, max_prefill_tokens: int,
                 max_total_tokens: int, eos_token_ids: Iterable[int], name: str = "autotp",
                 summary: dict[str, Any] | None = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.max_total_tokens = max_total_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.name = name
        self._summary = summary or {}
        self._waiting: collections.deque[_Active] = collections.deque()
        self._running: list[_Active] = []  # index == KV cache row
        self._by_id: dict[str, _Active] = {}
        # A tensor-parallel runner checks its ranks while idle (see handlers.tensor_parallel).
        self.heartbeat_interval = runner.heartbeat_interval

    # ---- Engine interface ---------------------------------------------------------------------------
    def add_request(self, request: GenerationRequest) -> None:
        if request.request_id in self._by_id:
            raise InvalidRequest(f"request id {request.request_id!r} is already active", "request_id")
        self.validate(request)
        active = _Active(
            request=request,
            sampler=SamplerState.create(request.params, request.prompt_token_ids),
            detokenizer=IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids),
            stops=StopSequenceMatcher(request.params.stop_sequences),
        )
        self._waiting.append(active)
        self._by_id[request.request_id] = active

    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        if self._running:
            outputs += self._decode()
        outputs += self._prefill()
        return outputs

    def cancel(self, request_id: str) -> RequestOutput | None:
        active = self._by_id.get(request_id)
        if active is None:
            return None
        if active in self._running:
            self._remove_running([self._running.index(active)])
        else:
            self._waiting.remove(active)
            del self._by_id[request_id]
        return self._final(active, (), FinishReason.CANCELLED, text=active.stops.flush())

    def health(self) -> EngineHealth:
        # A failing forward pass raises out of step(); the engine loop turns that into the failure.
        return EngineHealth(True)

    def has_unfinished(self) -> bool:
        return bool(self._by_id)

    def watch(self, abort: Any) -> None:
        """Hand `abort` to a runner that watches parts outside the engine thread (tensor-parallel ranks)."""
        self.runner.watch(abort)

    def heartbeat(self) -> None:
        self.runner.heartbeat()

    def shutdown(self) -> None:
        self.runner.shutdown()

    def stats(self) -> EngineStats:
        cache = self.runner.cache
        used = sum(active.cached for active in self._running)
        capacity = cache.max_batch * cache.max_length
        return EngineStats(running=len(self._running), waiting=len(self._waiting),
                           kv_cache_usage=used / capacity if capacity else 0.0, kv_cache_tokens=used)

    def summary(self) -> dict[str, Any]:
        return {**self._summary, "engine": self.name, "max_rolling_batch_size": self.max_batch,
                "max_rolling_batch_prefill_tokens": self.max_prefill_tokens, "max_total_tokens": self.max_total_tokens}

    # ---- the two phases of a step -------------------------------------------------------------------
    def _decode(self) -> list[RequestOutput]:
        running = self._running
        logits = self.runner.decode([a.generated[-1] for a in running], [a.cached for a in running])
        for active in running:
            active.cached += 1
        choices = sample(logits, [a.sampler for a in running])
        outputs, finished_rows = [], []
        for row, (active, choice) in enumerate(zip(running, choices)):
            output = self._advance(active, choice)
            outputs.append(output)
            if output.finished:
                finished_rows.append(row)
        self._remove_running(finished_rows)
        return outputs

    def _prefill(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        budget = self.max_prefill_tokens
        while self._waiting and budget > 0 and len(self._running) < self.max_batch:
            head = self._waiting[0]
            if head.prefilled == 0 and len(head.prompt) <= budget:
                group = self._whole_prompts(budget)
                budget -= len(group) * max(len(a.prompt) for a in group)
                outputs += self._prefill_together(group)
                continue
            # A prompt longer than what is left of the budget (or already partly prefilled): one chunk of
            # it in the staging row; it joins the batch when its last chunk is in.
            chunk = head.prompt[head.prefilled:head.prefilled + budget]
            logits = self.runner.prefill(self.runner.staging_row, chunk, start=head.prefilled)
            head.prefilled += len(chunk)
            head.cached = head.prefilled
            budget -= len(chunk)
            if head.prefilled < len(head.prompt):
                break  # budget spent; the rest of this prompt follows next step
            self._waiting.popleft()
            row = len(self._running)
            self.runner.move_row(self.runner.staging_row, row, head.cached)
            self._running.append(head)
            outputs += self._first_tokens([head], logits.unsqueeze(0))
        return outputs

    def _whole_prompts(self, budget: int) -> list[_Active]:
        """The waiting requests, first come first served, whose whole prompts fit in one forward pass:
        padded to the longest, within the budget and the free rows, with few distinct lengths (one row of
        logits is kept per distinct length)."""
        group: list[_Active] = []
        longest, lengths = 0, set()
        for active in self._waiting:
            size = len(active.prompt)
            if (active.prefilled or len(self._running) + len(group) >= self.max_batch
                    or max(longest, size) * (len(group) + 1) > budget
                    or len(lengths | {size}) > MAX_DISTINCT_PROMPT_LENGTHS):
                break
            group.append(active)
            longest, lengths = max(longest, size), lengths | {size}
        for _ in group:
            self._waiting.popleft()
        return group

    def _prefill_together(self, group: list[_Active]) -> list[RequestOutput]:
        """Prefill whole prompts into the next free rows in one forward pass; they join the batch."""
        logits = self.runner.prefill_many(len(self._running), [active.prompt for active in group])
        for active in group:
            active.prefilled = active.cached = len(active.prompt)
            self._running.append(active)
        return self._first_tokens(group, logits)

    def _first_tokens(self, joined: list[_Active], logits: Any) -> list[RequestOutput]:
        """Sample the first token of requests that just joined (the last rows of the batch)."""
        first_row = len(self._running) - len(joined)
        outputs, finished = [], []
        for offset, (active, choice) in enumerate(zip(joined, sample(logits, [a.sampler for a in joined]))):
            output = self._advance(active, choice)
            outputs.append(output)
            if output.finished:
                finished.append(first_row + offset)
        self._remove_running(finished)
        return outputs

    # ---- per-request bookkeeping --------------------------------------------------------------------
    def _advance(self, active: _Active, choice: Choice) -> RequestOutput:
        """Record one sampled token and decide whether the request is finished."""
        params = active.request.params
        if choice.error is not None:
            return self._final(active, (), FinishReason.ERROR, text=active.stops.flush(), error=choice.error)
        token_id = choice.token_id
        active.generated.append(token_id)
        is_eos = token_id in self.eos_token_ids and not params.ignore_eos
        piece = "" if is_eos else active.detokenizer.add(token_id)
        visible = active.stops.add(piece)
        token = Token(id=token_id, text=piece, log_prob=choice.log_prob, special=is_eos,
                      top_tokens=tuple(Token(i, self.tokenizer.decode([i]), lp) for i, lp in choice.top))
        reason = None
        if active.stops.stopped:
            reason = FinishReason.STOP_SEQUENCE
        elif is_eos:
            reason = FinishReason.EOS_TOKEN
        elif len(active.generated) >= params.max_new_tokens:
            reason = FinishReason.LENGTH
        if reason is None:
            return RequestOutput(active.request.request_id, (token,), visible, prompt_tokens=len(active.prompt),
                                 generated_tokens=len(active.generated))
        visible += active.stops.flush()
        return self._final(active, (token,), reason, text=visible)

    def _final(self, active: _Active, tokens: tuple[Token, ...], reason: FinishReason, text: str = "",
               error: str | None = None) -> RequestOutput:
        self._by_id.pop(active.request.request_id, None)
        return RequestOutput(active.request.request_id, tokens, text, finished=True, finish_reason=reason,
                             error=error, prompt_tokens=len(active.prompt), generated_tokens=len(active.generated))

    def _remove_running(self, rows: list[int]) -> None:
        """Drop finished rows, keeping rows dense: the last running row moves into each hole."""
        for row in sorted(rows, reverse=True):
            last = len(self._running) - 1
            if row != last:
                self.runner.move_row(last, row, self._running[last].cached)
                self._running[row] = self._running[last]
            self._running.pop()
