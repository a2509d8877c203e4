"""The interface the rolling batch drives: a model runner, on one process or across tensor-parallel ranks.

`handlers.model_runner.ModelRunner` runs the model in this process; `handlers.tensor_parallel.
TensorParallelRunner` wraps one and keeps the other ranks in step. Both are `Runner`s, so the engine calls
the lifecycle methods below directly instead of probing for them with `getattr`.
"""

from __future__ import annotations

import abc
from typing import Any, Callable


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
    #: ragged batch): the engine then puts decode tokens and prefill chunks into the same pass (`ragged`)
    ragged: bool = False

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
