"""Runs the Hugging Face model (bare or wrapped by DeepSpeed AutoTP) for the rolling batch: batched prefill
chunks and batched decode steps over a `PagedKVCache`.

Every operation takes plain Python lists, so a tensor-parallel rank 0 can forward the same call to the
other ranks (`handlers.tensor_parallel`) and every rank's cache stays identical.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from handlers.engine import EngineOutOfMemory
from handlers.paged_kv_cache import PagedKVCache
from handlers.runner import Runner


def cache_keyword(model: Any) -> str:
    """transformers renamed forward's `past_key_values` to `cache` (5.2x; the old name is removed in 5.40):
    pass the cache by the name the installed version takes."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class ModelRunner(Runner):
    def __init__(self, model: Any, cache: PagedKVCache, device: torch.device | str = "cpu"):
        """`model` is a transformers causal LM (DeepSpeed's AutoTP shards its linear layers in place, so the
        module keeps its Hugging Face forward signature)."""
        self.model = model
        self.cache = cache
        self.device = torch.device(device)
        self._cache_keyword = cache_keyword(model)

    def assign(self, sequence: int, blocks: list[int]) -> None:
        """Sequence slot `sequence` now owns `blocks` (a newly admitted request)."""
        self.cache.assign(sequence, blocks)

    def prefill(self, sequences: list[int], chunks: list[list[int]], starts: list[int],
                all_logits: bool = False) -> torch.Tensor:
        """Write the KV of each chunk (prompt positions start.. of its sequence) in one forward pass.

        Returns each chunk's last-token logits [rows, vocab], or with `all_logits` every position's
        [rows, longest chunk, vocab] (prompt log-probabilities). Shorter chunks are right-padded: padded
        positions write past the chunk's end (into the scratch block, or into the row's own future positions,
        which its next tokens overwrite before any query could see them)."""
        lengths = [len(chunk) for chunk in chunks]
        longest = max(lengths)
        ids = torch.zeros((len(chunks), longest), dtype=torch.long)
        for row, chunk in enumerate(chunks):
            ids[row, :len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        positions = torch.tensor(starts, dtype=torch.long).view(-1, 1) + torch.arange(longest).view(1, -1)
        ids, positions = ids.to(self.device), positions.to(self.device)
        sequence_index = torch.tensor(sequences, dtype=torch.long, device=self.device)
        if all_logits:
            return self._forward(sequence_index, ids, positions, keep=0)
        if len(set(lengths)) == 1:
            return self._forward(sequence_index, ids, positions, keep=1)[:, -1, :]
        # Rows end at different positions: keep the logits of every distinct last position, then pick each
        # row's own. transformers takes a tensor of sequence indices for logits_to_keep.
        last = torch.tensor(lengths, device=self.device) - 1
        distinct, which = torch.unique(last, return_inverse=True)
        logits = self._forward(sequence_index, ids, positions, keep=distinct)
        return logits[torch.arange(len(chunks), device=self.device), which, :]

    def decode(self, sequences: list[int], token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each sequence at its own position; returns logits [rows, vocab]."""
        ids = torch.tensor(token_ids, dtype=torch.long).view(-1, 1).to(self.device)
        pos = torch.tensor(positions, dtype=torch.long).view(-1, 1).to(self.device)
        sequence_index = torch.tensor(sequences, dtype=torch.long, device=self.device)
        return self._forward(sequence_index, ids, pos, keep=1)[:, -1, :]

    def _forward(self, sequences: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, keep: Any) -> torch.Tensor:
        try:
            with torch.inference_mode():
                mask = self.cache.prepare(sequences, positions)
                output = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                    use_cache=True, logits_to_keep=keep, **{self._cache_keyword: self.cache})
                return output.logits
        except torch.OutOfMemoryError as error:
            raise EngineOutOfMemory(f"out of device memory: {error}") from error
        except RuntimeError as error:
            if "can't allocate memory" in str(error) or "out of memory" in str(error).lower():
                raise EngineOutOfMemory(f"out of memory: {error}") from error
            raise
