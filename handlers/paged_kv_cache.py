"""A paged KV cache behind transformers' `Cache` interface, for running Hugging Face models eagerly (AutoTP).

Each layer holds one pool of K and one of V, `[blocks * block_size, kv_heads, head_dim]`, allocated once
from the engine's `KVBudget` (`handlers.kv_blocks`). A request owns a row of the block table (its
"sequence slot"): the ids of its blocks, in order. A forward pass says which sequences its rows belong to
and at which absolute positions its tokens sit; each layer's `update` scatters the new keys/values into the
pool at those positions' slots and returns, for attention, the rows' keys/values gathered from their blocks
up to the longest position of the pass. The attention mask is built from positions alone (key j is visible
to a query at position p iff j <= p, and p - j < window on sliding-window layers), so padding needs no
bookkeeping: gathered columns past a row's own length are never visible to its queries.

Why not transformers' own paged cache (`PagedAttentionCache`): it is driven by its continuous-batching
manager, which decides sampling and seeds for the whole batch; our rolling batch needs per-request
sampling, penalties and stop conditions. Why gather instead of a paged attention kernel: the AutoTP engine
runs the model's own attention (SDPA) so that it works for every architecture transformers has; FastGen
(DeepSpeed's blocked flash attention) is the fast path on GPUs. The gather is transient (one layer at a
time) and the memory budget measures it at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from handlers.kv_blocks import SCRATCH_BLOCKS, blocks_for


@dataclass
class PagedStep:
    """What the next forward pass writes and reads."""

    write_slots: torch.Tensor  # int64 [rows * q]: pool slot of every new token
    read_blocks: torch.Tensor  # int64 [rows, kv_length / block_size]: each row's blocks, in position order
    kv_length: int  # max(positions) + 1, rounded up to whole blocks (the columns past it are masked)
    past_length: int  # kv_length - q (what transformers calls the tokens already seen)


class _PagedLayer(DynamicLayer):
    """One layer's K and V pools, allocated from the first keys seen (their head count is per rank under
    tensor parallelism, known only after the model is sharded)."""

    def __init__(self, owner: "PagedKVCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        slots = self.owner.num_slots
        self.keys = torch.zeros((slots, key_states.shape[1], key_states.shape[-1]), dtype=self.dtype, device=self.device)
        self.values = torch.zeros((slots, value_states.shape[1], value_states.shape[-1]), dtype=self.dtype,
                                  device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        step = self.owner.step
        rows, heads, q, dim = key_states.shape
        # [rows, heads, q, dim] -> [rows * q, heads, dim], scattered to the tokens' slots
        self.keys.index_copy_(0, step.write_slots, key_states.transpose(1, 2).reshape(rows * q, heads, dim))
        self.values.index_copy_(0, step.write_slots,
                                value_states.transpose(1, 2).reshape(rows * q, value_states.shape[1], -1))
        return self._gathered(self.keys, step), self._gathered(self.values, step)

    def _gathered(self, pool: torch.Tensor, step: PagedStep) -> torch.Tensor:
        """The rows' keys or values in position order, [rows, heads, kv_length, dim]: whole blocks are
        copied (one index per block, not per position: the gather is most of what paging costs a CPU step)."""
        size = self.owner.block_size
        rows, blocks = step.read_blocks.shape
        blocked = pool.view(-1, size, pool.shape[1], pool.shape[2])
        gathered = blocked.index_select(0, step.read_blocks.reshape(-1))
        return gathered.view(rows, blocks * size, pool.shape[1], pool.shape[2]).transpose(1, 2)

    def get_seq_length(self) -> int:
        step = self.owner.step
        return step.past_length if step is not None else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return (self.keys.numel() + self.values.numel()) * self.keys.element_size()


class PagedKVCache(Cache):
    """Block pools for `num_blocks` blocks (plus the scratch block) and a block table of `max_sequences` rows,
    each long enough for `max_length` positions."""

    def __init__(self, num_layers: int, *, num_blocks: int, block_size: int, max_sequences: int, max_length: int,
                 device: torch.device | str, sliding_window: int | None = None, layer_types: list[str] | None = None):
        self.block_size = block_size
        self.num_blocks = num_blocks + SCRATCH_BLOCKS
        self.num_slots = self.num_blocks * block_size
        self.max_sequences = max_sequences
        self.device = torch.device(device)
        # one spare position: a padded query of a batched prefill may sit one past the longest request
        self.blocks_per_sequence = blocks_for(max_length + 1, block_size)
        # Unassigned entries point at block 0, the scratch block, which no request owns.
        self.block_table = torch.zeros((max_sequences, self.blocks_per_sequence), dtype=torch.long, device=self.device)
        self.sliding_window = sliding_window
        self.layer_types = layer_types
        self.step: PagedStep | None = None
        super().__init__(layers=[_PagedLayer(self) for _ in range(num_layers)])

    def assign(self, sequence: int, blocks: list[int]) -> None:
        """Give sequence slot `sequence` these blocks (in position order); the rest of its row is scratch."""
        if len(blocks) > self.blocks_per_sequence:
            raise ValueError(f"{len(blocks)} blocks for one sequence; at most {self.blocks_per_sequence}")
        row = torch.zeros(self.blocks_per_sequence, dtype=torch.long)
        row[:len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        self.block_table[sequence] = row.to(self.device)

    def prepare(self, sequences: torch.Tensor, positions: torch.Tensor) -> Any:
        """Set up the next forward pass (`sequences` int64 [rows], `positions` int64 [rows, q], both on the
        device) and return its attention mask: [rows, 1, q, kv] booleans (True = attend), or a dict by layer
        type for models that mix full and sliding-window layers."""
        rows, q = positions.shape
        size = self.block_size
        kv_blocks = blocks_for(int(positions.max()) + 1, size)
        kv_length = kv_blocks * size
        # Positions past the block table (padding of a batched prefill) land in the scratch block; reading,
        # they repeat the row's last block, in columns past every real query's position (masked).
        block_index = (positions // size).clamp_(max=self.blocks_per_sequence - 1)
        tables = self.block_table.index_select(0, sequences)
        write = tables.gather(1, block_index) * size + positions % size
        read = tables[:, torch.arange(kv_blocks, device=positions.device).clamp_(max=self.blocks_per_sequence - 1)]
        self.step = PagedStep(write.reshape(-1), read, kv_length, kv_length - q)
        columns = torch.arange(kv_length, device=positions.device)
        keys = columns.view(1, 1, 1, -1)
        queries = positions.view(rows, 1, q, 1)
        full = keys <= queries
        if not self.sliding_window:
            return full
        sliding = full & (keys > queries - self.sliding_window)
        if self.layer_types and "full_attention" in self.layer_types:
            return {"full_attention": full, "sliding_attention": sliding}
        return sliding

    def allocated_bytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def attention_window(config: Any) -> tuple[int | None, list[str] | None]:
    """The sliding window the model's layers use (None: full attention everywhere) and, for models that mix
    full and sliding-window layers, their per-layer types (`config.layer_types`, transformers' convention)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    if layer_types is not None:
        if "sliding_attention" not in layer_types:
            return None, None
        return window, list(layer_types)
    return window or None, None
