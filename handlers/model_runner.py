"""Runs the Hugging Face model (bare or wrapped by DeepSpeed) for the rolling batch: prefill chunks and
batched decode steps over a `SlotKVCache`."""

from __future__ import annotations

from typing import Any

import torch

from handlers.engine import EngineOutOfMemory
from handlers.runner import Runner
from handlers.slot_kv_cache import SlotKVCache


class ModelRunner(Runner):
    def __init__(self, model: Any, max_batch: int, max_length: int, device: torch.device | str = "cpu"):
        """`model` is a transformers causal LM (DeepSpeed's AutoTP shards its linear layers in place, so the
        module keeps its Hugging Face forward signature)."""
        self.model = model
        self.device = torch.device(device)
        num_layers = model.config.num_hidden_layers
        self.cache = SlotKVCache(num_layers, max_batch=max_batch, max_length=max_length)

    @property
    def staging_row(self) -> int:
        return self.cache.staging_row

    def prefill(self, row: int, token_ids: list[int], start: int) -> torch.Tensor:
        """Write the KV of `token_ids` (prompt positions start..) into `row`; return the last token's logits [vocab]."""
        positions = torch.arange(start, start + len(token_ids), device=self.device).unsqueeze(0)
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        return self._forward(row, ids, positions)[0]

    def prefill_many(self, row_start: int, prompts: list[list[int]]) -> torch.Tensor:
        """Prefill whole prompts into rows row_start.. in one forward pass; returns each prompt's last-token
        logits [n, vocab]. Shorter prompts are right-padded: the padding writes keys/values past the end of
        its row, which no query attends to (a query at position p sees keys <= p) and which the row's own
        next tokens overwrite before they could be seen."""
        lengths = [len(prompt) for prompt in prompts]
        longest = max(lengths)
        ids = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        positions = torch.arange(longest).expand(len(prompts), longest)
        ids, positions = ids.to(self.device), positions.to(self.device)
        if len(set(lengths)) == 1:
            return self._forward(row_start, ids, positions)
        last = torch.tensor(lengths, device=self.device) - 1
        return self._forward(row_start, ids, positions, last_positions=last)

    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of rows 0..n-1 at their own positions; returns logits [n, vocab]."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device).unsqueeze(1)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device).unsqueeze(1)
        return self._forward(0, ids, pos)

    def move_row(self, source: int, target: int, length: int) -> None:
        with torch.inference_mode():  # the buffers are inference tensors; they may only change in this mode
            self.cache.move_row(source, target, length)

    def _forward(self, row_start: int, ids: torch.Tensor, positions: torch.Tensor,
                 last_positions: torch.Tensor | None = None) -> torch.Tensor:
        try:
            with torch.inference_mode():
                mask = self.cache.prepare(row_start, positions)
                if last_positions is None:
                    output = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                        past_key_values=self.cache, use_cache=True,
                                        logits_to_keep=1)  # only the last position's logits are sampled from
                    return output.logits[:, -1, :]
                # Rows end at different positions: keep the logits of every distinct last position, then
                # pick each row's own. transformers takes a tensor of sequence indices for logits_to_keep.
                distinct, which = torch.unique(last_positions, return_inverse=True)
                output = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                    past_key_values=self.cache, use_cache=True, logits_to_keep=distinct)
                rows = torch.arange(ids.shape[0], device=ids.device)
                return output.logits[rows, which, :]
        except torch.OutOfMemoryError as error:
            raise EngineOutOfMemory(f"out of device memory: {error}") from error
        except RuntimeError as error:
            if "can't allocate memory" in str(error) or "out of memory" in str(error).lower():
                raise EngineOutOfMemory(f"out of memory: {error}") from error
            raise
