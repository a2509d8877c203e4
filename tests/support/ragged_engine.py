"""A stand-in for DeepSpeed-FastGen's `InferenceEngineV2` that runs on a CPU: the same `put`/`flush`/
`free_blocks` contract, computed by a Hugging Face model with one DynamicCache per uid, and strict about the
limits DeepSpeed enforces (tokens and sequences per put, tracked sequences, KV blocks allocated lazily as
sequences grow). It tests what the project adds around FastGen (the runner, the ragged step, admission by
blocks); DeepSpeed's kernels themselves are tested on the GPU (tests/gpu/test_gpu_fastgen.py)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from handlers.model_runner import cache_keyword


class OutOfKVBlocks(AssertionError):
    """DeepSpeed would fail this put: our admission let more tokens in than its cache holds."""


class ReferenceRaggedEngine:
    def __init__(self, model: Any, *, num_blocks: int, block_size: int = 64, max_tokens_per_put: int = 768,
                 max_sequences: int = 32, q_block: int = 128, max_atoms: int | None = None):
        """`max_atoms`: DeepSpeed's attention-atom buffer (one atom per `q_block` new tokens of each sequence);
        as in DeepSpeed 0.19.8, a put that needs more is not refused: the sequences whose atoms fall past
        the buffer get no attention, emulated here by computing them (then and from then on: their cached KV is
        wrong too) without their context."""
        self.model = model
        self._cache_keyword = cache_keyword(model)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_tokens_per_put = max_tokens_per_put
        self.max_sequences = max_sequences
        self.q_block = q_block
        self.max_atoms = max_atoms
        self.atoms: list[int] = []  # atoms each put needed
        self.poisoned: set[int] = set()  # uids a put computed past the atom buffer
        self.caches: dict[int, DynamicCache] = {}
        self.seen: dict[int, int] = {}
        self.puts: list[tuple[list[int], list[int]]] = []  # (uids, tokens per uid) of every put
        self.flushed: list[int] = []

    @property
    def free_blocks(self) -> torch.Tensor:
        used = sum(-(-seen // self.block_size) for seen in self.seen.values())
        return torch.tensor([self.num_blocks - used])

    def put(self, batch_uids: list[int], batch_tokens: list[torch.Tensor], do_checks: bool = True) -> torch.Tensor:
        assert not do_checks, "do_checks=True raises TypeError in DeepSpeed 0.19.8's can_schedule"
        uids = list(batch_uids)
        assert len(set(uids)) == len(uids), f"a uid twice in one put: {uids}"
        assert all(t.dim() == 1 and t.dtype == torch.int64 and t.device.type == "cpu" for t in batch_tokens)
        total = sum(t.numel() for t in batch_tokens)
        assert total <= self.max_tokens_per_put, f"{total} tokens in one put (max_ragged_batch_size)"
        assert len(uids) <= self.max_sequences, f"{len(uids)} sequences in one put (max_ragged_sequence_count)"
        assert len(set(self.seen) | set(uids)) <= self.max_sequences, "more sequences tracked than configured"
        for uid, tokens in zip(uids, batch_tokens):
            self.seen[uid] = self.seen.get(uid, 0) + tokens.numel()
        used = sum(-(-seen // self.block_size) for seen in self.seen.values())
        if used > self.num_blocks:
            raise OutOfKVBlocks(f"{used} KV blocks needed, {self.num_blocks} exist")
        self.puts.append((uids, [t.numel() for t in batch_tokens]))
        atoms = 0
        rows = []
        with torch.inference_mode():
            for uid, tokens in zip(uids, batch_tokens):
                cache = self.caches.setdefault(uid, DynamicCache())
                out = self.model(input_ids=tokens.view(1, -1), use_cache=True, **{self._cache_keyword: cache})
                atoms += -(-tokens.numel() // self.q_block)
                if self.max_atoms is not None and atoms > self.max_atoms:  # past DeepSpeed's buffer
                    self.poisoned.add(uid)  # its KV of every later layer came from unattended hidden states
                if uid in self.poisoned:
                    out = self.model(input_ids=tokens[-1:].view(1, -1))
                rows.append(out.logits[0, -1].to(torch.float16))  # DeepSpeed returns the activation dtype
        self.atoms.append(atoms)
        return torch.stack(rows)

    def flush(self, uid: int) -> None:
        self.caches.pop(uid, None)
        self.poisoned.discard(uid)
        self.seen.pop(uid, None)
        self.flushed.append(uid)
