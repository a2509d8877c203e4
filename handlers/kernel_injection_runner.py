"""The runner for kernel injection: one batch at a time, its rows advancing together, as DeepSpeed's injected
kernels keep K/V (`handlers.kernel_injection_model`).

The scheduler batches dynamically with `DynamicBatching.aligned_tokens` (`handlers.scheduler`): a batch's
prompts arrive whole in its first step, and the longest prompt plus the largest max_new_tokens fits the
workspace. The first step is one pass over every prompt, left-padded to the longest (the mask hides the padding);
every later step is one pass with one token per row. A row whose request has finished keeps being fed (its own
last token) until the batch ends, since the kernels advance every row; its logits are dropped. The next prompt
pass restarts the workspace.
"""

from __future__ import annotations

from typing import Any

import torch

from handlers.engine import EngineOutOfMemory
from handlers.runner import Runner, StepBatch


class KernelInjectionRunner(Runner):
    def __init__(self, model: Any, max_rows: int, max_tokens: int):
        """`model`: a `handlers.kernel_injection_model.InjectedModel` whose workspace holds `max_rows` rows of
        `max_tokens` positions (prompt padding included)."""
        self.model = model
        self.device = model.device
        self.cache = None  # the K/V lives in DeepSpeed's workspace
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self._rows: dict[int, int] = {}  # sequence slot -> row of the running batch
        self._last: list[int] = []  # each row's last token (fed again once its request has finished)
        self._lengths: list[int] = []  # each row's real tokens so far (its next position)
        self._mask: torch.Tensor | None = None  # [rows, tokens so far]: 0 on the left padding

    def warm_up(self) -> None:
        """The first forward sizes DeepSpeed's workspace for its own row count: make it a full batch."""
        prompt = [0, 0]
        self.forward(StepBatch(list(range(self.max_rows)), [prompt] * self.max_rows, [0] * self.max_rows, 0,
                               pass_tokens=self.max_rows * len(prompt)))
        self._rows.clear()

    def assign(self, sequence: int, blocks: list[int]) -> None:
        """Nothing to do: rows are given out when the batch's prompt pass runs."""

    def forward(self, batch: StepBatch) -> torch.Tensor:
        try:
            if batch.decodes < len(batch.sequences):
                return self._prompts(batch)
            return self._step(batch)
        except torch.OutOfMemoryError as error:
            raise EngineOutOfMemory(f"out of device memory: {error}") from error

    def _prompts(self, batch: StepBatch) -> torch.Tensor:
        if batch.decodes or any(batch.starts):
            raise RuntimeError("kernel injection takes a batch's prompts whole and before any decode step (the "
                               "scheduler's aligned dynamic batching guarantees it); got decodes="
                               f"{batch.decodes}, starts={batch.starts}")
        rows = len(batch.sequences)
        if rows > self.max_rows:
            raise RuntimeError(f"a batch of {rows} rows exceeds the workspace's {self.max_rows}")
        # a prompt pass must have more than one position: the kernels tell a prompt from a decode step by it
        longest = max(2, max(len(tokens) for tokens in batch.tokens))
        ids = torch.zeros(rows, longest, dtype=torch.long)
        mask = torch.zeros(rows, longest, dtype=torch.long)
        positions = torch.zeros(rows, longest, dtype=torch.long)
        for row, tokens in enumerate(batch.tokens):
            pad = longest - len(tokens)
            ids[row, pad:] = torch.tensor(tokens, dtype=torch.long)
            mask[row, pad:] = 1
            positions[row, pad:] = torch.arange(len(tokens))
        self._rows = {sequence: row for row, sequence in enumerate(batch.sequences)}
        self._last = [tokens[-1] for tokens in batch.tokens]
        self._lengths = [len(tokens) for tokens in batch.tokens]
        self._mask = mask.to(self.device)
        return self.model.forward(ids.to(self.device), self._mask, positions.to(self.device))

    def _step(self, batch: StepBatch) -> torch.Tensor:
        if self._mask is None:
            raise RuntimeError("a decode step before any prompt pass")
        if self._mask.shape[1] + 1 > self.max_tokens:
            raise RuntimeError(f"the batch would pass the workspace's {self.max_tokens} positions")
        wanted = [self._rows[sequence] for sequence in batch.sequences]
        for row, tokens in zip(wanted, batch.tokens):
            self._last[row] = tokens[0]
        ids = torch.tensor(self._last, dtype=torch.long).view(-1, 1)
        positions = torch.tensor(self._lengths, dtype=torch.long).view(-1, 1)
        self._lengths = [length + 1 for length in self._lengths]
        rows = len(self._last)
        self._mask = torch.cat([self._mask, torch.ones(rows, 1, dtype=torch.long, device=self.device)], dim=1)
        logits = self.model.forward(ids.to(self.device), self._mask, positions.to(self.device))
        if wanted == list(range(rows)):
            return logits
        return logits.index_select(0, torch.tensor(wanted, device=logits.device))

    def prefill(self, sequences: list[int], chunks: list[list[int]], starts: list[int],
                all_logits: bool = False) -> Any:
        raise NotImplementedError("kernel injection runs whole batches through forward(); prompt log-probabilities "
                                  "are refused at admission")

    def decode(self, sequences: list[int], token_ids: list[int], positions: list[int]) -> Any:
        return self.forward(StepBatch(sequences, [[t] for t in token_ids], positions, len(sequences), 0))
