"""A KV cache with one slot (row) per running request, so requests of different lengths decode together.

Why not transformers' own caches: `DynamicCache` keeps one length for the whole batch, so a request that
joins later must be left-padded and the whole cache re-concatenated (TGI's old `CausalLMBatch.concatenate`
does that, copying every layer at every join); `StaticCache` also shares one write position across the
batch. transformers' continuous-batching `PagedAttentionCache` fits, but its manager decides do_sample and
the random seed for the whole batch, and we need per-request seeds, penalties and stop sequences.

So: every request owns a row of a preallocated buffer `[slots, kv_heads, capacity, head_dim]` per layer.
Each forward pass says which rows it touches and at which absolute positions its tokens sit; `update`
writes the new keys/values there and returns a *view* of those rows up to the longest position. The
attention mask is built from the positions alone (key j is visible to a query at position p iff j <= p),
so no padding bookkeeping exists. Rows are kept dense (running requests occupy rows 0..n-1): when a
request leaves, the last row moves into its place, one small copy per layer.

Row `staging_row` (one past the running rows' maximum) receives chunked prefills; a request moves to its
running row once its prompt is complete.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer


@dataclass
class ForwardPlan:
    """What the next forward pass writes: rows [row_start, row_start + rows) at `positions` [rows, q]."""

    row_start: int
    positions: torch.Tensor  # int64 [rows, q]
    kv_length: int  # max(positions) + 1


class _SlotLayer(DynamicLayer):
    """One layer's slot buffers; allocated lazily from the first keys seen (their head count is per rank
    under tensor parallelism, so it cannot be known before the model is sharded)."""

    def __init__(self, owner: "SlotKVCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        shape_k = (self.owner.slots, key_states.shape[1], self.owner.capacity, key_states.shape[-1])
        shape_v = (self.owner.slots, value_states.shape[1], self.owner.capacity, value_states.shape[-1])
        self.keys = torch.zeros(shape_k, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape_v, dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif self.keys.shape[2] < self.owner.capacity:
            self._grow(self.owner.capacity)
        plan = self.owner.plan
        rows = key_states.shape[0]
        row_slice = slice(plan.row_start, plan.row_start + rows)
        if key_states.shape[2] == 1 or rows > 1:
            # Scatter: each row writes at its own position(s). Advanced indices around a slice put the
            # indexed dims first: [rows, q, heads, dim].
            row_index = torch.arange(plan.row_start, plan.row_start + rows, device=self.device).unsqueeze(1)
            self.keys[row_index, :, plan.positions] = key_states.transpose(1, 2)
            self.values[row_index, :, plan.positions] = value_states.transpose(1, 2)
        else:
            # One row, consecutive positions (a prefill chunk): a plain slice copy.
            start = int(plan.positions[0, 0])
            self.keys[plan.row_start, :, start:start + key_states.shape[2]] = key_states[0]
            self.values[plan.row_start, :, start:start + value_states.shape[2]] = value_states[0]
        return self.keys[row_slice, :, :plan.kv_length], self.values[row_slice, :, :plan.kv_length]

    def _grow(self, capacity: int) -> None:
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.zeros((old.shape[0], old.shape[1], capacity, old.shape[3]), dtype=old.dtype, device=old.device)
            new[:, :, :old.shape[2]] = old
            setattr(self, name, new)

    def move_row(self, source: int, target: int, length: int) -> None:
        if self.is_initialized and length > 0:
            self.keys[target, :, :length] = self.keys[source, :, :length]
            self.values[target, :, :length] = self.values[source, :, :length]

    def get_seq_length(self) -> int:
        return self.owner.plan.kv_length if self.owner.plan is not None else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length(), 0

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() * 2


class SlotKVCache(Cache):
    """Per-request rows of KV memory for `max_batch` running requests plus one staging row."""

    def __init__(self, num_layers: int, max_batch: int, max_length: int, initial_capacity: int = 256):
        self.max_batch = max_batch
        self.slots = max_batch + 1
        self.staging_row = max_batch
        self.max_length = max_length + 1  # one spare column so a full-length row never indexes past the end
        self.capacity = min(initial_capacity, self.max_length)
        self.plan: ForwardPlan | None = None
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    def prepare(self, row_start: int, positions: torch.Tensor) -> torch.Tensor:
        """Set up the next forward pass and return its attention mask [rows, 1, q, kv] (True = attend)."""
        kv_length = int(positions.max()) + 1
        if kv_length > self.capacity:
            # Grow geometrically so a long generation reallocates O(log n) times; layers copy on next update.
            self.capacity = min(self.max_length, max(kv_length, 2 * self.capacity))
        self.plan = ForwardPlan(row_start, positions, kv_length)
        keys = torch.arange(kv_length, device=positions.device)
        return (keys.view(1, 1, 1, -1) <= positions.view(positions.shape[0], 1, -1, 1))

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy a request's first `length` positions from row `source` to row `target`."""
        if source != target:
            for layer in self.layers:
                layer.move_row(source, target, length)

    def allocated_bytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
