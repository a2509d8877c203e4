"""The interface the rolling batch drives: a model runner, on one process or across tensor-parallel ranks.

`handlers.model_runner.ModelRunner` runs the model in this process; `handlers.tensor_parallel.
TensorParallelRunner` wraps one and keeps the other ranks in step. Both are `Runner`s, so the engine calls
the lifecycle methods below directly instead of probing for them with `getattr`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable

import torch

#: a non-ragged prefill pass keeps one row of logits per distinct chunk length (see ModelRunner.prefill), so a
#: pass holds chunks of at most this many lengths
MAX_DISTINCT_CHUNK_LENGTHS = 4


@dataclass(frozen=True)
class StepBatch:
    """One engine step's work for the model: every sequence's new tokens, decodes (one token each) first,
    then prefill chunks. `pass_tokens` bounds the tokens, padding included, of one forward pass of a runner
    that pads (the step's prefill budget, which the KV and activation memory were sized for)."""

    sequences: list[int]
    tokens: list[list[int]]
    starts: list[int]  # the position of each sequence's first new token
    decodes: int  # how many leading sequences decode one token
    pass_tokens: int


def padded_passes(lengths: list[int], pass_tokens: int) -> list[list[int]]:
    """Split prefill chunks (their lengths, in order) into consecutive groups that one padded pass can take:
    the longest chunk times the group's size within `pass_tokens`, and few distinct lengths."""
    groups: list[list[int]] = []
    for index, length in enumerate(lengths):
        if groups:
            group = [lengths[i] for i in groups[-1]] + [length]
            if max(group) * len(group) <= pass_tokens and len(set(group)) <= MAX_DISTINCT_CHUNK_LENGTHS:
                groups[-1].append(index)
                continue
        groups.append([index])
    return groups


class Runner(abc.ABC):
    """A model runner over a paged KV cache. Operations take plain lists, so that a tensor-parallel rank 0
    can send the same call to the other ranks. The lifecycle methods default to "nothing to watch", as a
    single process needs."""

    #: the runner's KV cache (see handlers.paged_kv_cache) and the device its forward passes run on
    cache: Any
    device: Any
    #: seconds between `heartbeat()` calls while the engine is idle; None: no heartbeat needed
    heartbeat_interval: float | None = None
    #: True for runners whose one forward pass takes sequences with any number of new tokens each (FastGen's
    #: ragged batch): `forward` then puts decode tokens and prefill chunks into the same pass
    ragged: bool = False

    @property
    def asynchronous(self) -> bool:
        """Whether a forward pass returns before the device has computed it (CUDA launches), so that host work
        done before reading its results back overlaps the device's work. On a CPU a pass returns when it is
        done, and the engine hands out each step's tokens before it starts the next pass."""
        return getattr(getattr(self, "device", None), "type", "cpu") == "cuda"

    def forward(self, batch: StepBatch) -> Any:
        """Run one step: each sequence's last-token logits [rows, vocab], in the batch's order. A ragged runner
        does it in one pass; this default runs the decodes in one pass and the prefill chunks in padded passes
        (`padded_passes`)."""
        if self.ragged:
            return self.ragged_forward(batch.sequences, batch.tokens)
        parts = []
        d = batch.decodes
        if d:
            parts.append(self.decode(batch.sequences[:d], [t[0] for t in batch.tokens[:d]], batch.starts[:d]))
        for group in padded_passes([len(t) for t in batch.tokens[d:]], batch.pass_tokens):
            rows = [d + i for i in group]
            parts.append(self.prefill([batch.sequences[r] for r in rows], [batch.tokens[r] for r in rows],
                                      [batch.starts[r] for r in rows]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @abc.abstractmethod
    def assign(self, sequence: int, blocks: list[int]) -> None:
        """Sequence slot `sequence` now owns KV `blocks` (a newly admitted request)."""

    @abc.abstractmethod
    def prefill(self, sequences: list[int], chunks: list[list[int]], starts: list[int],
                all_logits: bool = False) -> Any:
        """Write the KV of each chunk (positions start.. of its sequence) in one forward pass; each chunk's
        last-token logits [rows, vocab], or every position's with `all_logits`."""

    @abc.abstractmethod
    def decode(self, sequences: list[int], token_ids: list[int], positions: list[int]) -> Any:
        """One token for each sequence at its own position; logits [rows, vocab]."""

    def ragged_forward(self, sequences: list[int], tokens: list[list[int]]) -> Any:
        """One forward pass over sequences with any number of new tokens each (decode: one; prefill chunk:
        many), continuing where each sequence stopped; each sequence's last-token logits [rows, vocab]. Only
        runners with `ragged = True` implement it."""
        raise NotImplementedError(f"{type(self).__name__} runs prefill and decode as separate passes")

    def release(self, sequence: int) -> None:
        """Sequence slot `sequence` is free again (its request finished or was cancelled): a runner that keeps
        per-sequence state of its own (FastGen's state manager) drops it here."""

    def watch(self, abort: Callable[[str], None]) -> None:
        """Call `abort(reason)` from any thread as soon as a part outside this process fails (a rank died)."""

    def heartbeat(self) -> None:
        """Called while idle every `heartbeat_interval` s; raises when the runner can no longer serve."""

    def shutdown(self) -> None:
        """Release what the runner holds (tell worker ranks to stop)."""
