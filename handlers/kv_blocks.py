"""KV memory in fixed-size blocks: the budget (how many blocks fit), and their allocation to requests.

Paged KV, as in vLLM's PagedAttention (Kwon et al., SOSP 2023) and nano-vllm's block manager: the cache is
one pool of blocks of `block_size` token positions; a request owns a list of blocks (its block table), so
memory is never reserved for a request's padding to the longest one and never moved when requests come and
go. Admission is by free blocks: a request is admitted only when blocks for its whole prompt plus
`max_new_tokens` are free, and reserves them up front, so a step never runs out of KV memory half way (no
preemption is needed). A request that could not fit even into an empty cache is refused at validation.

`KVBudget` is shared by every engine: the AutoTP engine allocates its pool from it, FastGen gives the block
count to DeepSpeed's own blocked KV cache and admits with the same `BlockAllocator` arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

#: block 0 of every pool is a scratch block that is never allocated: padded positions of a batched prefill
#: write there (see handlers.paged_kv_cache)
SCRATCH_BLOCKS = 1


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass(frozen=True)
class KVBudget:
    """How much KV memory an engine has, and how that was decided (for the start-up summary)."""

    block_size: int  # token positions per block
    num_blocks: int  # allocatable blocks (the scratch block not counted)
    bytes_per_token: int  # K and V of one position, all layers, this rank
    basis: str  # how the size was chosen, in words

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes(self) -> int:
        return self.tokens * self.bytes_per_token

    def summary(self) -> dict[str, object]:
        return {"kv_cache_tokens": self.tokens, "kv_cache_blocks": self.num_blocks, "kv_block_size": self.block_size,
                "kv_cache_gib": round(self.bytes / 2**30, 3), "kv_budget": self.basis}


def size_kv_budget(*, available_bytes: int, bytes_per_token: int, block_size: int, basis: str) -> KVBudget:
    """The largest number of blocks that `available_bytes` holds. Raises when not even one request of the
    largest size fits, naming the numbers, so a model too large for the memory fails at start-up."""
    block_bytes = bytes_per_token * block_size
    num_blocks = max(0, available_bytes // block_bytes - SCRATCH_BLOCKS)
    budget = KVBudget(block_size, int(num_blocks), bytes_per_token, basis)
    if budget.tokens < block_size:
        raise MemoryError(f"no memory is left for the KV cache ({basis}); {bytes_per_token} bytes per token; "
                          "lower max_rolling_batch_prefill_tokens or max_tokens, use a larger device or more "
                          "tensor-parallel ranks, or raise gpu_memory_utilization / cpu_kv_cache_bytes")
    return budget


class BlockAllocator:
    """Free-list allocation of the pool's blocks; all-or-nothing, so admission never half-succeeds."""

    def __init__(self, budget: KVBudget):
        self.budget = budget
        self.block_size = budget.block_size
        # Allocate low block ids first (pop from the end): the pool's first blocks stay warm in caches.
        self._free = list(range(SCRATCH_BLOCKS + budget.num_blocks - 1, SCRATCH_BLOCKS - 1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.budget.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    def fits_ever(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= self.budget.num_blocks

    def allocate(self, tokens: int) -> list[int] | None:
        """Blocks for `tokens` positions, or None when not enough are free."""
        needed = self.blocks_for(tokens)
        if needed > len(self._free):
            return None
        blocks = self._free[-needed:] if needed else []
        del self._free[len(self._free) - needed:]
        return blocks[::-1]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


def available_kv_bytes(device: "torch.device", *, gpu_memory_utilization: float, cpu_kv_cache_bytes: int,
                       probe: Callable[[], None]) -> tuple[int, str]:
    """Bytes the KV cache may take on `device`, and how that was decided (for `KVBudget.basis`).

    On a GPU (vLLM's `gpu_memory_utilization` rule): run `probe` (the engine's largest step, against a cache
    with no real blocks), measure its peak allocation, then give the KV cache what is left of
    `gpu_memory_utilization` of the device after everything already in use (weights, CUDA context, other
    processes) and that peak. On a CPU: `cpu_kv_cache_bytes` (`probe` still runs: it is how an engine learns
    the K/V shapes of its layers)."""
    import torch

    if device.type != "cuda":
        probe()
        return cpu_kv_cache_bytes, f"cpu_kv_cache_bytes={cpu_kv_cache_bytes}"
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    probe()
    torch.cuda.synchronize(device)
    step_peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free
    gib = 2**30
    basis = (f"gpu_memory_utilization={gpu_memory_utilization} of {total / gib:.1f} GiB; in use before the cache "
             f"{in_use / gib:.2f} GiB (weights, CUDA context, other processes); largest step measured "
             f"{step_peak / gib:.2f} GiB")
    return int(gpu_memory_utilization * total) - in_use - step_peak, basis
