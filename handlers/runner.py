"""The interface the rolling batch drives: a model runner, on one process or across tensor-parallel ranks.

`handlers.model_runner.ModelRunner` runs the model in this process; `handlers.tensor_parallel.
TensorParallelRunner` wraps one and keeps the other ranks in step. Both are `Runner`s, so the engine calls
the lifecycle methods below directly instead of probing for them with `getattr`. The forward operations
(prefill / prefill_many / decode / move_row) are the rolling batch's; a runner with another KV design adds
its own operations next to them.
"""

from __future__ import annotations

import abc
from typing import Any, Callable


class Runner(abc.ABC):
    """A model runner. The lifecycle methods default to "nothing to watch", as a single process needs."""

    #: the runner's KV cache and its staging row (see handlers.slot_kv_cache)
    cache: Any
    #: seconds between `heartbeat()` calls while the engine is idle; None: no heartbeat needed
    heartbeat_interval: float | None = None

    @property
    def staging_row(self) -> int:
        return self.cache.staging_row

    @abc.abstractmethod
    def prefill(self, row: int, token_ids: list[int], start: int) -> Any:
        """Write the KV of `token_ids` (positions start..) into `row`; the last token's logits [vocab]."""

    @abc.abstractmethod
    def prefill_many(self, row_start: int, prompts: list[list[int]]) -> Any:
        """Prefill whole prompts into rows row_start.. in one pass; each prompt's last logits [n, vocab]."""

    @abc.abstractmethod
    def decode(self, token_ids: list[int], positions: list[int]) -> Any:
        """One token for each of rows 0..n-1 at its own position; logits [n, vocab]."""

    @abc.abstractmethod
    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` cached positions of row `source` into row `target`."""

    def watch(self, abort: Callable[[str], None]) -> None:
        """Call `abort(reason)` from any thread as soon as a part outside this process fails (a rank died)."""

    def heartbeat(self) -> None:
        """Called while idle every `heartbeat_interval` s; raises when the runner can no longer serve."""

    def shutdown(self) -> None:
        """Release what the runner holds (tell worker ranks to stop)."""
