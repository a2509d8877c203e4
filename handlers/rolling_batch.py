"""The rolling-batch engine: a scheduler, a runner, one sampler and an output processor, with the host's work
hidden behind the device's.

`handlers.scheduler` decides each step (admission by free KV blocks, chunked prefill, Dynamic SplitFuse);
the `Runner` turns it into forward passes (one ragged pass for FastGen, decode and prefill passes otherwise);
`handlers.token_sampler` draws every row's token on the device; `handlers.output_processor` turns tokens into
text, stop sequences, log-probabilities and finish reasons.

On a device whose passes run asynchronously (CUDA), a step launches pass n+1 as soon as pass n's token ids are
read back (the one host synchronisation per step), and only then processes pass n's outputs, which the engine
loop then delivers to clients while the device computes: detokenizing, stop strings, token details and the
hand-over to HTTP streams stay off the path between two launches (vLLM v1's async scheduling; Holmes et al.,
2024, measure the same host gap in FastGen's own loop). A request that a stop sequence or a cancel ends while
it is in the pass on the device loses that pass's token; its KV blocks are given back once the pass is read.
On a CPU a pass returns when it is computed, so a step runs, reads and processes one pass before it returns,
and each token reaches its client before the next pass starts.

Why our own instead of transformers' `ContinuousBatchingManager`: its do_sample and seed are manager-wide,
it has no stop sequences or per-request penalties, and it runs its own thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from handlers.engine import (
    Engine,
    EngineHealth,
    EngineOutOfMemory,
    EngineStats,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    RequestOutput,
)
from handlers.kv_blocks import BlockAllocator
from handlers.output_processor import OutputProcessor
from handlers.runner import Runner
from handlers.scheduler import DynamicBatching, ScheduledRequest, Scheduler, StepPlan
from handlers.step_events import PromptScores, StepEvent
from handlers.token_sampler import PendingChoices, SequenceSampling, TokenSampler


@dataclass
class _InFlight:
    """A step launched on the device and not read back yet."""

    plan: StepPlan
    sampled: list[ScheduledRequest]
    choices: PendingChoices | None
    prompt_scores: Any  # (log_probs, targets, top values, top ids, start, count) tensors of a scored chunk, or None


class RollingBatchEngine(Engine):
    def __init__(self, runner: Runner, tokenizer: Any, *, allocator: BlockAllocator, max_batch: int,
                 max_prefill_tokens: int, max_total_tokens: int, eos_token_ids: Iterable[int],
                 vocab_size: int | None = None, batching: DynamicBatching | None = None, name: str = "autotp",
                 summary: dict[str, Any] | None = None, overlap: bool | None = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.allocator = allocator
        self.batching = batching
        self.max_batch = max(max_batch, batching.batch_size if batching else 0)
        self.max_prefill_tokens = max_prefill_tokens
        # A request longer than the whole KV cache could never be admitted: refuse it at validation.
        self.max_total_tokens = min(max_total_tokens, allocator.budget.tokens)
        self.eos_token_ids = frozenset(eos_token_ids)
        # the model's embedding rows: a larger id would index past them on the device (a CUDA device-side
        # assert that takes every request of the process down), e.g. a tokenizer with more tokens than the model
        self.vocab_size = vocab_size
        self.name = name
        self._summary = summary or {}
        #: launch pass n+1 before processing pass n's outputs (see the module docstring)
        self.overlap = runner.asynchronous if overlap is None else overlap
        self.sampler = TokenSampler(self.max_batch, self.max_total_tokens)
        self.scheduler = Scheduler(runner, allocator, max_batch=self.max_batch, max_prefill_tokens=max_prefill_tokens,
                                   batching=batching, release_sampling=self.sampler.release)
        self.output = OutputProcessor(tokenizer, self.eos_token_ids)
        self._in_flight: _InFlight | None = None
        self._unprocessed: list[StepEvent] = []  # read back before a launch that raised; processed next step
        # A tensor-parallel runner checks its ranks while idle (see handlers.tensor_parallel).
        self.heartbeat_interval = runner.heartbeat_interval

    # ---- Engine interface ---------------------------------------------------------------------------
    def add_request(self, request: GenerationRequest) -> None:
        if request.request_id in self.output or self.scheduler.get(request.request_id) is not None:
            raise InvalidRequest(f"request id {request.request_id!r} is already active", "request_id")
        self.validate(request)
        if request.params.prompt_logprobs and self.batching is not None and self.batching.aligned_tokens:
            raise InvalidRequest(f"prompt log-probabilities (decoder_input_details, prompt_logprobs, echo with "
                                 f"logprobs) are not available on the {self.name} engine: its kernels compute a "
                                 "batch's prompts in one pass and keep only their last positions", "prompt_logprobs")
        ids = request.prompt_token_ids
        if self.vocab_size is not None and (max(ids) >= self.vocab_size or min(ids) < 0):
            outside = [t for t in ids if not 0 <= t < self.vocab_size]
            if outside:
                raise InvalidRequest(f"the prompt holds token ids {sorted(set(outside))[:5]} outside this model's "
                                     f"vocabulary (0..{self.vocab_size - 1}): the tokenizer has more tokens than the "
                                     "model has embeddings", "inputs")
        stops = self.output.add(request)
        self.scheduler.add(ScheduledRequest(request, SequenceSampling.create(request.params, ids), stops))

    def step(self) -> list[RequestOutput]:
        events, self._unprocessed = self._unprocessed, []
        if self.overlap:
            events += self._resolve()
            try:
                self._launch()
            except EngineOutOfMemory:
                self._unprocessed = events  # the engine loop fails some requests; the others keep these
                raise
        else:
            self._launch()
            events += self._resolve()
        processed = self.output.process(events)
        for request_id in processed.stopped:
            request = self.scheduler.get(request_id)
            if request is not None:
                self.scheduler.finish(request)
        return processed.outputs

    def cancel(self, request_id: str) -> RequestOutput | None:
        request = self.scheduler.get(request_id)
        if request is None:
            return None
        self.scheduler.finish(request)
        return self.output.final(request_id, FinishReason.CANCELLED, generated_tokens=len(request.generated))

    def sequence_of(self, request_id: str) -> int | None:
        """The sequence slot (KV block-table row, FastGen uid) an admitted request holds."""
        request = self.scheduler.get(request_id)
        return None if request is None or request.sequence < 0 else request.sequence

    def health(self) -> EngineHealth:
        # A failing forward pass raises out of step(); the engine loop turns that into the failure.
        return EngineHealth(True)

    def has_unfinished(self) -> bool:
        return (self.scheduler.busy or self._in_flight is not None
                or any(event.request_id in self.output for event in self._unprocessed))

    def watch(self, abort: Any) -> None:
        """Hand `abort` to a runner that watches parts outside the engine thread (tensor-parallel ranks)."""
        self.runner.watch(abort)

    def heartbeat(self) -> None:
        self.runner.heartbeat()

    def shutdown(self) -> None:
        self.runner.shutdown()

    def stats(self) -> EngineStats:
        budget = self.allocator.budget
        used = self.allocator.used_blocks
        scheduler = self.scheduler
        return EngineStats(running=len(scheduler.running), waiting=len(scheduler.queued) + len(scheduler.prefilling),
                           kv_cache_usage=used / budget.num_blocks if budget.num_blocks else 0.0,
                           kv_cache_tokens=used * budget.block_size, kv_cache_capacity_tokens=budget.tokens)

    def summary(self) -> dict[str, Any]:
        batching = ({"batching": "continuous (rolling batch)", "max_rolling_batch_size": self.max_batch}
                    if self.batching is None else
                    {"batching": "dynamic (rolling_batch=disable)", "batch_size": self.batching.batch_size,
                     "max_batch_delay_ms": round(self.batching.max_batch_delay * 1000)})
        return {**self._summary, "engine": self.name, **batching,
                "max_rolling_batch_prefill_tokens": self.max_prefill_tokens,
                "max_total_tokens": self.max_total_tokens, **self.allocator.budget.summary()}

    # ---- one pass on the device ---------------------------------------------------------------------
    def _launch(self) -> None:
        """Schedule the next step and queue it on the device: its forward pass(es) and its sampling."""
        plan = self.scheduler.schedule()
        if plan.empty:
            self.scheduler.abandon(plan)
            return
        try:
            rows, sampled = plan.sampling_rows()
            logits = None
            batch = plan.batch()
            if batch is not None:
                logits = self.runner.forward(batch)
                if len(rows) != logits.shape[0]:
                    logits = logits.index_select(0, torch.tensor(rows, device=logits.device)) if rows else None
            prompt_scores = None
            if plan.scored is not None:
                last, prompt_scores = self._score_prompt(*plan.scored)
                if last is not None:
                    sampled = sampled + [plan.scored[0]]
                    logits = last if logits is None else torch.cat([logits, last])
            choices = self.sampler.launch(logits, [r.sampling for r in sampled]) if sampled else None
        except BaseException:
            self.scheduler.abandon(plan)
            raise
        self._in_flight = _InFlight(plan, sampled, choices, prompt_scores)

    def _resolve(self) -> list[StepEvent]:
        """Read the step on the device back (the host waits for it here) and apply it to the scheduler."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return []
        choices = flight.choices.resolve() if flight.choices is not None else []
        scores = self._read_prompt_scores(*flight.prompt_scores) if flight.prompt_scores is not None else None
        return self.scheduler.update(flight.plan, flight.sampled, choices, scores)

    def _score_prompt(self, request: ScheduledRequest, size: int) -> tuple[Any, Any]:
        """The pass of a chunk whose every position's logits are kept (prompt log-probabilities): the log-
        probabilities of prompt tokens start+1 .. start+size (each predicted by the position before it; the
        last position of the prompt predicts a generated token), queued on the device; and the chunk's
        last-token logits when it completes a prompt that generates (else None)."""
        start = request.prefilled
        chunk = request.prompt[start:start + size]
        logits = self.runner.prefill([request.sequence], [chunk], [start], all_logits=True)[0]
        prompt = request.prompt
        end = min(start + size, len(prompt) - 1)
        count = max(end - start, 0)
        log_probs = torch.log_softmax(logits[:count].float(), dim=-1)
        targets = torch.tensor(prompt[start + 1:end + 1], device=log_probs.device, dtype=torch.long)
        chosen = log_probs.gather(1, targets.view(-1, 1)).view(-1)
        n = request.params.top_n_tokens
        top = log_probs.topk(n, dim=-1) if n and count else None
        last = None
        if start + size >= len(prompt) and request.params.max_new_tokens > 0:
            last = logits[size - 1:size]
        return last, (start == 0, prompt[start + 1:end + 1], chosen, top)

    @staticmethod
    def _read_prompt_scores(first: bool, token_ids: list[int], chosen: Any, top: Any) -> PromptScores:
        values = chosen.tolist()
        tops: list[tuple[tuple[int, float], ...]] = [()] * len(values)
        if top is not None:
            tops = [tuple(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        return PromptScores(first, token_ids, values, tops)
