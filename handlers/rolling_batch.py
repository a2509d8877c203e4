"""Rolling (continuous) batching over a `ModelRunner` and a paged KV cache: the engine behind the AutoTP path.

A request goes through three states:
  queued      -> admitted when a sequence slot and KV blocks for its prompt + max_new_tokens are free
                 (`handlers.kv_blocks`); first come, first served, so a large request is not starved;
  prefilling  -> its prompt is written to the cache in chunks, several requests per forward pass;
  running     -> one token per step, all running requests in one batched forward pass.

One `step()` decodes the running batch, then spends up to `max_rolling_batch_prefill_tokens` prompt tokens
on prefilling (requests whose prompt completes sample their first token and join the running batch), and
returns one `RequestOutput` per request that progressed. Because KV blocks are reserved at admission, no
step can run out of KV memory; requests that do not fit wait in the queue (the engine loop's queue bound
turns an overflow into 503s).

The scheduling is the iteration-level scheduling of Orca (Yu et al., OSDI 2022) with chunked prefill as in
Sarathi (Agrawal et al., 2023). With `rolling_batch=disable` the same engine batches dynamically as DJL
Serving did (`DynamicBatching`): requests that arrive within `max_batch_delay` of the first form one batch
(at most `batch_size`), which runs to completion before the next one is formed; each request keeps its own
parameters and stop conditions and finishes and streams on its own.

Why our own instead of transformers' `ContinuousBatchingManager`: its do_sample and seed are manager-wide,
it has no stop sequences or per-request penalties, and it runs its own thread.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

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
from handlers.kv_blocks import BlockAllocator
from handlers.runner import Runner
from handlers.token_sampler import Choice, SequenceSampling, TokenSampler

logger = logging.getLogger(__name__)

#: a prefill pass keeps one row of logits per distinct chunk length (see ModelRunner.prefill), so a group
#: of chunks holds at most this many lengths
MAX_DISTINCT_CHUNK_LENGTHS = 4
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


@dataclass(frozen=True)
class DynamicBatching:
    """`rolling_batch=disable`: DJL Serving's dynamic batching (batch_size, max_batch_delay in seconds)."""

    batch_size: int
    max_batch_delay: float

    @classmethod
    def for_plan(cls, properties: Any, plan: Any) -> "DynamicBatching | None":
        """None (continuous batching) unless the plan turned rolling batch off; `max_batch_delay` is in ms."""
        if getattr(plan, "rolling_batch", True):
            return None
        return cls(properties.batch_size, properties.max_batch_delay / 1000.0)


@dataclass
class _Active:
    request: GenerationRequest
    sampling: SequenceSampling
    detokenizer: IncrementalDetokenizer
    stops: StopSequenceMatcher
    stop_ids: frozenset[int]
    sequence: int = -1  # sequence slot (block-table row) once admitted
    blocks: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens whose KV is cached
    generated: list[int] = field(default_factory=list)
    prompt_details: list[Token] = field(default_factory=list)  # with params.prompt_logprobs
    reported_prompt: bool = False

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def params(self) -> Any:
        return self.request.params


class RollingBatchEngine(Engine):
    def __init__(self, runner: Runner, tokenizer: Any, *, allocator: BlockAllocator, max_batch: int,
                 max_prefill_tokens: int, max_total_tokens: int, eos_token_ids: Iterable[int],
                 vocab_size: int | None = None, batching: DynamicBatching | None = None, name: str = "autotp",
                 summary: dict[str, Any] | None = None):
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
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ()) | self.eos_token_ids
        self._special_by_text = _special_tokens(tokenizer)
        self.name = name
        self._summary = summary or {}
        self.sampler = TokenSampler(self.max_batch, self.max_total_tokens)
        self._queued: collections.deque[_Active] = collections.deque()
        self._prefilling: list[_Active] = []
        self._running: list[_Active] = []
        self._by_id: dict[str, _Active] = {}
        self._free_sequences = list(range(self.max_batch - 1, -1, -1))
        # A tensor-parallel runner checks its ranks while idle (see handlers.tensor_parallel).
        self.heartbeat_interval = runner.heartbeat_interval

    # ---- Engine interface ---------------------------------------------------------------------------
    def add_request(self, request: GenerationRequest) -> None:
        if request.request_id in self._by_id:
            raise InvalidRequest(f"request id {request.request_id!r} is already active", "request_id")
        self.validate(request)
        ids = request.prompt_token_ids
        if self.vocab_size is not None and (max(ids) >= self.vocab_size or min(ids) < 0):
            outside = [t for t in ids if not 0 <= t < self.vocab_size]
            if outside:
                raise InvalidRequest(f"the prompt holds token ids {sorted(set(outside))[:5]} outside this model's "
                                     f"vocabulary (0..{self.vocab_size - 1}): the tokenizer has more tokens than the "
                                     "model has embeddings", "inputs")
        params = request.params
        special_stops = [text for text in params.stop_sequences if text in self._special_by_text]
        text_stops = [text for text in params.stop_sequences if text not in self._special_by_text]
        vocab = len(self.tokenizer) if hasattr(self.tokenizer, "__len__") else None
        bad = [token for token in params.stop_token_ids if token < 0 or (vocab is not None and token >= vocab)]
        if bad:
            raise InvalidRequest(f"stop_token_ids {bad} are not token ids of this model (0..{vocab - 1 if vocab else '?'})",
                                 "stop_token_ids")
        active = _Active(
            request=request,
            sampling=SequenceSampling.create(params, request.prompt_token_ids),
            detokenizer=IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids),
            stops=StopSequenceMatcher(text_stops),
            stop_ids=frozenset(params.stop_token_ids) | {self._special_by_text[text] for text in special_stops},
        )
        self._queued.append(active)
        self._by_id[request.request_id] = active

    def step(self) -> list[RequestOutput]:
        self._admit()
        if self.runner.ragged:
            return self._ragged_step()
        outputs: list[RequestOutput] = []
        if self._running:
            outputs += self._decode()
        outputs += self._prefill()
        return outputs

    def cancel(self, request_id: str) -> RequestOutput | None:
        active = self._by_id.get(request_id)
        if active is None:
            return None
        if active in self._queued:
            self._queued.remove(active)
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
        budget = self.allocator.budget
        used = self.allocator.used_blocks
        return EngineStats(running=len(self._running), waiting=len(self._queued) + len(self._prefilling),
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

    # ---- admission ----------------------------------------------------------------------------------
    def _admit(self) -> None:
        if not self._queued:
            return
        if self.batching is not None:
            if self._running or self._prefilling:
                return  # a dynamic batch runs to completion before the next one forms
            waited = time.monotonic() - self._queued[0].request.arrival_time
            if len(self._queued) < self.batching.batch_size and waited < self.batching.max_batch_delay:
                # Wait for batch-mates; the engine loop calls again (it steps while requests are pending).
                time.sleep(min(0.002, self.batching.max_batch_delay - waited))
                return
        limit = self.batching.batch_size if self.batching is not None else self.max_batch
        while self._queued and self._free_sequences and len(self._running) + len(self._prefilling) < limit:
            head = self._queued[0]
            blocks = self.allocator.allocate(len(head.prompt) + head.params.max_new_tokens)
            if blocks is None:
                return  # first come, first served: later requests wait behind the head
            self._queued.popleft()
            head.sequence = self._free_sequences.pop()
            head.blocks = blocks
            self.runner.assign(head.sequence, blocks)
            self._prefilling.append(head)

    # ---- the two phases of a step -------------------------------------------------------------------
    def _decode(self) -> list[RequestOutput]:
        running = list(self._running)
        logits = self.runner.decode([a.sequence for a in running], [a.generated[-1] for a in running],
                                    [len(a.prompt) + len(a.generated) - 1 for a in running])
        choices = self.sampler.sample(logits, [a.sampling for a in running])
        return [self._advance(active, choice) for active, choice in zip(running, choices)]

    def _ragged_step(self) -> list[RequestOutput]:
        """Decode tokens and prefill chunks in one forward pass (Dynamic SplitFuse, DeepSpeed-FastGen: Holmes
        et al., 2024): every running request's next token plus, within `max_prefill_tokens`, the next chunks
        of prefilling requests, first come first served. A request that asked for prompt log-probabilities
        needs every position's logits, which a ragged pass does not return: it is prefilled on its own."""
        outputs: list[RequestOutput] = []
        if self._prefilling and self._prefilling[0].params.prompt_logprobs:
            outputs += self._prefill_group(*self._next_group(self.max_prefill_tokens))
        running = list(self._running)
        eligible = list(itertools.takewhile(lambda a: not a.params.prompt_logprobs, self._prefilling))
        chunks = split_prefill_budget([len(a.prompt) - a.prefilled for a in eligible], self.max_prefill_tokens)
        group = eligible[:len(chunks)]
        if not running and not group:
            return outputs
        pieces = [active.prompt[active.prefilled:active.prefilled + size] for active, size in zip(group, chunks)]
        logits = self.runner.ragged_forward([a.sequence for a in running] + [a.sequence for a in group],
                                            [[a.generated[-1]] for a in running] + pieces)
        if running:
            choices = self.sampler.sample(logits[:len(running)], [a.sampling for a in running])
            outputs += [self._advance(active, choice) for active, choice in zip(running, choices)]
        if group:
            outputs += self._prefilled(group, chunks, logits[len(running):])
        return outputs

    def _prefill(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        budget = self.max_prefill_tokens
        while budget > 0 and self._prefilling:
            group, chunks = self._next_group(budget)
            if not group:
                break
            budget -= len(group) * max(chunks)
            outputs += self._prefill_group(group, chunks)
        return outputs

    def _next_group(self, budget: int) -> tuple[list[_Active], list[int]]:
        """Prefilling requests, first come first served, whose next chunks go through one forward pass:
        padded to the longest chunk within the budget, with few distinct chunk lengths. A request that asked
        for prompt log-probabilities goes alone."""
        group: list[_Active] = []
        chunks: list[int] = []
        for active in self._prefilling:
            remaining = len(active.prompt) - active.prefilled
            if active.params.prompt_logprobs:
                if group:
                    break
                return [active], [min(remaining, budget, PROMPT_LOGPROB_CHUNK)]
            chunk = min(remaining, budget)
            longest = max(chunks + [chunk])
            if group and (longest * (len(group) + 1) > budget or len(set(chunks + [chunk])) > MAX_DISTINCT_CHUNK_LENGTHS):
                break
            group.append(active)
            chunks.append(chunk)
        return group, chunks

    def _prefill_group(self, group: list[_Active], chunks: list[int]) -> list[RequestOutput]:
        pieces = [active.prompt[active.prefilled:active.prefilled + size] for active, size in zip(group, chunks)]
        starts = [active.prefilled for active in group]
        wants_all = group[0].params.prompt_logprobs
        logits = self.runner.prefill([a.sequence for a in group], pieces, starts, all_logits=wants_all)
        if wants_all:
            self._record_prompt_log_probs(group[0], logits[0], starts[0], len(pieces[0]))
            logits = logits[:, len(pieces[0]) - 1, :]
        return self._prefilled(group, chunks, logits)

    def _prefilled(self, group: list[_Active], chunks: list[int], logits: Any) -> list[RequestOutput]:
        """After a pass that wrote these chunks (`logits`: each chunk's last-token logits): requests whose
        prompt is now complete sample their first token and join the running batch."""
        outputs = []
        sampling, rows = [], []  # requests whose prompt is complete and that generate, and their logits rows
        for row, (active, size) in enumerate(zip(group, chunks)):
            active.prefilled += size
            if active.prefilled < len(active.prompt):
                continue
            self._prefilling.remove(active)
            if active.params.max_new_tokens == 0:  # prompt scoring only
                outputs.append(self._final(active, (), FinishReason.LENGTH))
            else:
                sampling.append(active)
                rows.append(row)
        if sampling:
            if len(rows) != logits.shape[0]:
                logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
            self._running.extend(sampling)
            choices = self.sampler.sample(logits, [a.sampling for a in sampling])
            outputs += [self._advance(active, choice) for active, choice in zip(sampling, choices)]
        return outputs

    def _record_prompt_log_probs(self, active: _Active, logits: Any, start: int, length: int) -> None:
        """Log-probabilities of prompt tokens start+1 .. start+length (each predicted by the position before
        it); the first prompt token has none."""
        prompt = active.prompt
        if start == 0:
            active.prompt_details.append(self._token(prompt[0], math.nan, ()))
        end = min(start + length, len(prompt) - 1)  # the last position predicts a generated token
        if end <= start:
            return
        log_probs = torch.log_softmax(logits[:end - start].float(), dim=-1)
        targets = torch.tensor(prompt[start + 1:end + 1], device=log_probs.device)
        chosen = log_probs.gather(1, targets.view(-1, 1)).view(-1).tolist()
        n = active.params.top_n_tokens
        tops: list[tuple[tuple[int, float], ...]] = [()] * len(chosen)
        if n:
            values, ids = log_probs.topk(n, dim=-1)
            tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        for token_id, value, top in zip(prompt[start + 1:end + 1], chosen, tops):
            active.prompt_details.append(self._token(token_id, value, top))

    # ---- per-request bookkeeping --------------------------------------------------------------------
    def _token(self, token_id: int, log_prob: float, top: tuple[tuple[int, float], ...], text: str | None = None) -> Token:
        decode = self.tokenizer.decode
        return Token(id=token_id, text=decode([token_id]) if text is None else text, log_prob=log_prob,
                     special=token_id in self.special_ids,
                     top_tokens=tuple(Token(i, decode([i]), lp, special=i in self.special_ids) for i, lp in top))

    def _advance(self, active: _Active, choice: Choice) -> RequestOutput:
        """Record one sampled token and decide whether the request is finished."""
        params = active.params
        if choice.error is not None:
            return self._final(active, (), FinishReason.ERROR, text=active.stops.flush(), error=choice.error)
        token_id = choice.token_id
        active.generated.append(token_id)
        is_eos = token_id in self.eos_token_ids and not params.ignore_eos
        is_stop_id = token_id in active.stop_ids
        piece = "" if (is_eos or is_stop_id) else active.detokenizer.add(token_id)
        visible = active.stops.add(piece)
        token = self._token(token_id, choice.log_prob, choice.top, text=piece)
        reason = None
        if active.stops.stopped or is_stop_id:
            reason = FinishReason.STOP_SEQUENCE
        elif is_eos:
            reason = FinishReason.EOS_TOKEN
        elif len(active.generated) >= params.max_new_tokens:
            reason = FinishReason.LENGTH
        if reason is None:
            return RequestOutput(active.request.request_id, (token,), visible, prompt_tokens=len(active.prompt),
                                 generated_tokens=len(active.generated), prompt_token_details=self._prompt_once(active))
        visible += active.stops.flush()
        return self._final(active, (token,), reason, text=visible)

    def _prompt_once(self, active: _Active) -> tuple[Token, ...]:
        if active.reported_prompt or not active.params.prompt_logprobs:
            return ()
        active.reported_prompt = True
        return tuple(active.prompt_details)

    def _final(self, active: _Active, tokens: tuple[Token, ...], reason: FinishReason, text: str = "",
               error: str | None = None) -> RequestOutput:
        self._release(active)
        return RequestOutput(active.request.request_id, tokens, text, finished=True, finish_reason=reason,
                             error=error, prompt_tokens=len(active.prompt), generated_tokens=len(active.generated),
                             prompt_token_details=self._prompt_once(active))

    def _release(self, active: _Active) -> None:
        """Give back everything the request holds: its place in the batch, KV blocks, sequence slot."""
        self._by_id.pop(active.request.request_id, None)
        if active in self._running:
            self._running.remove(active)
        if active in self._prefilling:
            self._prefilling.remove(active)
        if active.sequence >= 0:
            self.runner.release(active.sequence)
            self.allocator.free(active.blocks)
            self._free_sequences.append(active.sequence)
            active.sequence, active.blocks = -1, []
        self.sampler.release(active.sampling)


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
