"""Which requests the next engine step runs, and what a finished step means for each of them.

A request goes through three states:
  queued      -> admitted when a sequence slot and KV blocks for its prompt + max_new_tokens are free
                 (`handlers.kv_blocks`); first come, first served, so a large request is not starved;
  prefilling  -> its prompt is written to the cache in chunks;
  running     -> one token per step.

Every step decodes the whole running batch and spends up to `max_prefill_tokens` prompt tokens on prefilling
requests, first come first served, the last one taking what is left of the budget (Dynamic SplitFuse,
DeepSpeed-FastGen: Holmes et al., 2024; chunked prefill as in Sarathi: Agrawal et al., 2023; iteration-level
scheduling as in Orca: Yu et al., OSDI 2022). How a step's sequences become forward passes is the runner's
business (`Runner.forward`: one ragged pass, or a decode pass and padded prefill passes), so every engine
schedules the same way. Because KV blocks are reserved at admission, no step can run out of KV memory;
requests that do not fit wait in the queue (the engine loop's queue bound turns an overflow into 503s).

A request that asked for prompt log-probabilities needs every position's logits, which the step's pass does
not return: its chunks (at most `PROMPT_LOGPROB_CHUNK` tokens) go in a pass of their own (`StepPlan.scored`).

`update` applies a finished step: prompt progress, the sampled tokens, and the finishes a token id decides
(end of sequence, stop token ids, max_new_tokens), so the next step is scheduled without them. Stop strings
are the output processor's (`handlers.output_processor`); it reports them back through `finish`, which, like a
cancel, may come while a step that holds the request is still on the device: its slot and blocks are then
given back once that step is resolved.

With `rolling_batch=disable` the same scheduler batches dynamically as DJL Serving did (`DynamicBatching`):
requests that arrive within `max_batch_delay` of the first form one batch (at most `batch_size`), which runs
to completion before the next one is formed. A runner whose K/V holds one batch whose rows advance together
(kernel injection: `DynamicBatching.aligned_tokens`) gets every prompt of the batch whole in its first step, and
a request joins a batch only while the longest prompt plus the most new tokens asked fits those positions (the
rows are padded to the longest prompt and all run until the last finishes); one that does not fit starts the
next batch.
"""

from __future__ import annotations

import collections
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from handlers.engine import FinishReason, GenerationRequest
from handlers.kv_blocks import BlockAllocator
from handlers.runner import Runner, StepBatch
from handlers.step_events import PromptScores, StepEvent, TokenStops
from handlers.token_sampler import Choice, SequenceSampling

#: requests that asked for prompt log-probabilities are prefilled alone, in chunks of at most this many
#: tokens: every position's logits ([chunk, vocab] floats) are kept for them
PROMPT_LOGPROB_CHUNK = 512


def split_prefill_budget(remaining: list[int], budget: int) -> list[int]:
    """One step's prefill chunks (Dynamic SplitFuse): prefilling sequences, first come first served, each take
    what is left of their prompt (`remaining`) until `budget` tokens are spent; the one that does not fit
    whole takes the rest of the budget and ends the step. The start-up correctness gate uses the same split."""
    chunks: list[int] = []
    for left in remaining:
        if budget <= 0:
            break
        chunks.append(min(left, budget))
        budget -= chunks[-1]
    return chunks


def batch_rows(properties: Any, plan: Any) -> int:
    """A rolling batch holds max_rolling_batch_size sequences; so does a dynamic batch the plan chose under
    rolling_batch=auto (an engine measured fastest that batches dynamically); rolling_batch=disable's batches hold
    batch_size, as DJL Serving's did."""
    from handlers.serving_properties import RollingBatch

    if plan.rolling_batch or properties.rolling_batch is not RollingBatch.DISABLE:
        return properties.max_rolling_batch_size
    return properties.batch_size


@dataclass(frozen=True)
class DynamicBatching:
    """`rolling_batch=disable`: DJL Serving's dynamic batching (batch_size, max_batch_delay in seconds)."""

    batch_size: int
    max_batch_delay: float
    #: rows advance together through this many positions: whole prompts in one pass, and a batch's longest prompt
    #: plus its largest max_new_tokens within it (None: rows are independent)
    aligned_tokens: int | None = None

    @classmethod
    def for_plan(cls, properties: Any, plan: Any, aligned_tokens: int | None = None) -> "DynamicBatching | None":
        """None (continuous batching) unless the plan turned rolling batch off; `max_batch_delay` is in ms."""
        if getattr(plan, "rolling_batch", True):
            return None
        return cls(batch_rows(properties, plan), properties.max_batch_delay / 1000.0, aligned_tokens)

    def complete(self, queued: list["ScheduledRequest"]) -> bool:
        """Whether the batch the queue's head would form can take no one else: batch_size requests are waiting,
        or one of them cannot join the batch of those before it (so waiting for more mates only delays it)."""
        if len(queued) >= self.batch_size:
            return True
        return any(not self.fits(queued[:i], queued[i]) for i in range(1, len(queued)))

    def fits(self, members: list["ScheduledRequest"], candidate: "ScheduledRequest") -> bool:
        """Whether `candidate` can join a batch of `members` within the aligned positions."""
        if self.aligned_tokens is None:
            return True
        batch = members + [candidate]
        return (max(len(r.prompt) for r in batch) + max(r.params.max_new_tokens for r in batch)
                <= self.aligned_tokens)


@dataclass(eq=False)
class ScheduledRequest:
    """A request as the scheduler tracks it."""

    request: GenerationRequest
    sampling: SequenceSampling
    stops: TokenStops  # the finishes its token ids decide
    sequence: int = -1  # sequence slot (block-table row) once admitted
    blocks: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens whose KV is cached
    generated: list[int] = field(default_factory=list)
    finished: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def params(self) -> Any:
        return self.request.params


@dataclass
class StepPlan:
    """One step: the running batch's decodes, then prefill chunks (request, tokens), and at most one scored
    chunk in a pass of its own. `sampled` lists the requests that draw a token from this step, in the order of
    the logits rows the engine samples."""

    decodes: list[ScheduledRequest]
    chunks: list[tuple[ScheduledRequest, int]]
    scored: tuple[ScheduledRequest, int] | None
    pass_tokens: int

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.chunks and self.scored is None

    @property
    def members(self) -> list[ScheduledRequest]:
        scored = [self.scored[0]] if self.scored else []
        return self.decodes + [r for r, _ in self.chunks] + scored

    def batch(self) -> StepBatch | None:
        """The decodes and ordinary chunks as the runner takes them (None when there are none)."""
        if not self.decodes and not self.chunks:
            return None
        sequences = [r.sequence for r in self.decodes] + [r.sequence for r, _ in self.chunks]
        tokens = [[r.generated[-1]] for r in self.decodes] + \
                 [r.prompt[r.prefilled:r.prefilled + size] for r, size in self.chunks]
        starts = [len(r.prompt) + len(r.generated) - 1 for r in self.decodes] + [r.prefilled for r, _ in self.chunks]
        return StepBatch(sequences, tokens, starts, len(self.decodes), self.pass_tokens)

    def completes(self, request: ScheduledRequest, size: int) -> bool:
        return request.prefilled + size >= len(request.prompt)

    def sampling_rows(self) -> tuple[list[int], list[ScheduledRequest]]:
        """Which rows of the batch's logits are sampled (decodes and chunks that complete a prompt of a request
        that generates), and for which requests; the scored chunk's row, if it samples, comes last."""
        rows = list(range(len(self.decodes)))
        sampled = list(self.decodes)
        for offset, (request, size) in enumerate(self.chunks):
            if self.completes(request, size) and request.params.max_new_tokens > 0:
                rows.append(len(self.decodes) + offset)
                sampled.append(request)
        return rows, sampled


class Scheduler:
    """Admission, step plans and step results for a rolling (or dynamic) batch; see the module docstring."""

    def __init__(self, runner: Runner, allocator: BlockAllocator, *, max_batch: int, max_prefill_tokens: int,
                 batching: DynamicBatching | None = None, release_sampling: Any = None):
        self.runner = runner
        self.allocator = allocator
        self.batching = batching
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self._release_sampling = release_sampling or (lambda sampling: None)
        self.queued: collections.deque[ScheduledRequest] = collections.deque()
        self.prefilling: list[ScheduledRequest] = []
        self.running: list[ScheduledRequest] = []
        self.by_id: dict[str, ScheduledRequest] = {}
        self._free_sequences = list(range(max_batch - 1, -1, -1))
        self._in_flight: set[ScheduledRequest] = set()  # members of the step on the device
        self._deferred: list[ScheduledRequest] = []  # finished while in flight: released at the next update

    def add(self, request: ScheduledRequest) -> None:
        self.queued.append(request)
        self.by_id[request.request_id] = request

    def get(self, request_id: str) -> ScheduledRequest | None:
        return self.by_id.get(request_id)

    @property
    def busy(self) -> bool:
        """Requests to serve, or a step to resolve."""
        return bool(self.by_id) or bool(self._in_flight) or bool(self._deferred)

    # ---- the next step --------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        self._admit()
        plan = StepPlan(list(self.running), [], None, self.max_prefill_tokens)
        head = self.prefilling[0] if self.prefilling else None
        if head is not None and head.params.prompt_logprobs:
            plan.scored = (head, min(len(head.prompt) - head.prefilled, self.max_prefill_tokens, PROMPT_LOGPROB_CHUNK))
        eligible = list(itertools.takewhile(lambda r: not r.params.prompt_logprobs, self.prefilling[1:] if plan.scored
                                            else self.prefilling))
        budget = self.max_prefill_tokens - (plan.scored[1] if plan.scored else 0)
        if self.batching is not None and self.batching.aligned_tokens is not None:
            budget = sum(len(r.prompt) - r.prefilled for r in eligible)  # whole prompts, one pass
        sizes = split_prefill_budget([len(r.prompt) - r.prefilled for r in eligible], budget)
        plan.chunks = list(zip(eligible, sizes))
        self._in_flight = set(plan.members)
        return plan

    def _admit(self) -> None:
        if not self.queued:
            return
        if self.batching is not None:
            if self.running or self.prefilling:
                return  # a dynamic batch runs to completion before the next one forms
            waited = time.monotonic() - self.queued[0].request.arrival_time
            if not self.batching.complete(list(self.queued)) and waited < self.batching.max_batch_delay:
                # Wait for batch-mates; the engine loop calls again (it steps while requests are pending).
                time.sleep(min(0.002, self.batching.max_batch_delay - waited))
                return
        limit = self.batching.batch_size if self.batching is not None else self.max_batch
        while self.queued and self._free_sequences and len(self.running) + len(self.prefilling) < limit:
            head = self.queued[0]
            if self.batching is not None and not self.batching.fits(self.prefilling, head):
                return  # it starts the next batch
            blocks = self.allocator.allocate(len(head.prompt) + head.params.max_new_tokens)
            if blocks is None:
                return  # first come, first served: later requests wait behind the head
            self.queued.popleft()
            head.sequence = self._free_sequences.pop()
            head.blocks = blocks
            self.runner.assign(head.sequence, blocks)
            self.prefilling.append(head)

    # ---- a resolved step ------------------------------------------------------------------------------
    def update(self, plan: StepPlan, sampled: list[ScheduledRequest], choices: list[Choice],
               prompt_scores: PromptScores | None = None) -> list[StepEvent]:
        """Apply a step the device has finished: `choices` are the tokens drawn for `sampled` (in order). A
        request finished meanwhile (cancel, stop string) gets no event; its slot is given back now."""
        self._in_flight = set()
        events: list[StepEvent] = []
        for request, size in plan.chunks + ([plan.scored] if plan.scored else []):
            if request.finished:
                continue
            request.prefilled += size
            if request.prefilled >= len(request.prompt):
                self.prefilling.remove(request)
                if request.params.max_new_tokens == 0:  # prompt scoring only
                    scores = prompt_scores if plan.scored and plan.scored[0] is request else None
                    events.append(self._finish_event(request, None, FinishReason.LENGTH, scores))
                    prompt_scores = None if scores is not None else prompt_scores
                    continue
                self.running.append(request)
        if prompt_scores is not None and plan.scored is not None and not plan.scored[0].finished:
            request = plan.scored[0]
            events.append(StepEvent(request.request_id, prompt_scores=prompt_scores, prompt_tokens=len(request.prompt)))
        for request, choice in zip(sampled, choices):
            if request.finished:
                continue
            events.append(self._token_event(request, choice))
        for request in self._deferred:
            self._release(request)
        self._deferred = []
        return events

    def _token_event(self, request: ScheduledRequest, choice: Choice) -> StepEvent:
        if choice.error is not None:
            return self._finish_event(request, choice, FinishReason.ERROR)
        request.generated.append(choice.token_id)
        reason = request.stops.reason(choice.token_id, len(request.generated))
        if reason is not None:
            return self._finish_event(request, choice, reason)
        return StepEvent(request.request_id, choice, None, generated_tokens=len(request.generated),
                         prompt_tokens=len(request.prompt))

    def _finish_event(self, request: ScheduledRequest, choice: Choice | None, reason: FinishReason,
                      scores: PromptScores | None = None) -> StepEvent:
        self.finish(request)
        return StepEvent(request.request_id, choice, reason, scores, generated_tokens=len(request.generated),
                         prompt_tokens=len(request.prompt))

    def abandon(self, plan: StepPlan) -> None:
        """The planned step never reached the device (its launch raised): nothing of it is in flight."""
        self._in_flight = set()
        for request in self._deferred:
            self._release(request)
        self._deferred = []

    # ---- leaving ----------------------------------------------------------------------------------------
    def finish(self, request: ScheduledRequest) -> None:
        """The request is done (finished, stopped by a stop string, cancelled): it leaves every queue now; its
        slot and blocks are given back now, or after the step on the device that holds it is resolved."""
        if request.finished:
            return
        request.finished = True
        self.by_id.pop(request.request_id, None)
        if request in self.running:
            self.running.remove(request)
        elif request in self.prefilling:
            self.prefilling.remove(request)
        elif request in self.queued:
            self.queued.remove(request)
        if request in self._in_flight:
            self._deferred.append(request)
        else:
            self._release(request)

    def _release(self, request: ScheduledRequest) -> None:
        if request.sequence >= 0:
            self.runner.release(request.sequence)
            self.allocator.free(request.blocks)
            self._free_sequences.append(request.sequence)
            request.sequence, request.blocks = -1, []
        self._release_sampling(request.sampling)
