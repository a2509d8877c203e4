"""A `Runner` over DeepSpeed-FastGen's ragged engine (`deepspeed.inference.v2.InferenceEngineV2`).

FastGen keeps its own blocked KV cache and per-sequence state (its `DSStateManager`): a sequence is known by
a uid, `put(uids, tokens)` appends each sequence's new tokens and returns each sequence's last-token logits,
`flush(uid)` forgets it. Our sequence slots are the uids. The rolling batch reserves KV blocks for a request's
whole prompt plus `max_new_tokens` at admission, with `BlockAllocator` arithmetic over the same block count
and block size as DeepSpeed's cache, so DeepSpeed's lazy per-step allocation can never run short; this is
why `put` runs with `do_checks=False` (its own check, `can_schedule`, raises TypeError in 0.19.8: it
compares the tensor of free blocks per cache group with an int; shared/FACTS.md).

Each `put` fills the same pinned host buffers (`RaggedBatchWrapper.finalize`: token ids, sequence descriptors,
KV block pointers) and copies them to the device with `non_blocking=True`, and nothing in DeepSpeed waits for
those copies before the next `put` refills the buffers. Serving reads every step's token ids back before the
next `put`, but a prompt prefilled over several steps without a sampled token, or prompt log-probabilities
scored one token per `put`, issue puts back to back: while the device is still busy with an earlier pass, the
next `put` overwrites inputs the previous one has not copied yet, and that pass computes on another batch's
token ids and block pointers (measured on an H200: 130-240x HF fp16's deviation on prompts of 6,000-8,000
tokens prefilled alone; RESULTS.md section 10). So the runner waits, before each `put`, until the previous one
has run (a CUDA event; free when its results were already read).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from handlers.engine import EngineOutOfMemory
from handlers.runner import Runner


class FastGenRunner(Runner):
    ragged = True

    def __init__(self, engine: Any, device: torch.device | str, atoms: Any = None,
                 fence: Callable[[], Any] | None = None):
        """`engine`: an `InferenceEngineV2` (or anything with its `put(uids, tokens, do_checks)` and
        `flush(uid)`); `atoms`: its `AtomRoom` (handlers.fastgen_model), checked before every put, since
        DeepSpeed itself computes garbage for a put that needs more attention atoms than it has room for;
        `fence`: records a point on the device's stream after a put, returning something whose `synchronize()`
        waits for it (a CUDA event on a GPU; none on a CPU, where a put is done when it returns)."""
        self.engine = engine
        self.device = torch.device(device)
        self.atoms = atoms
        self.cache = None  # the KV cache lives inside the engine
        self._known: set[int] = set()  # uids the engine holds state for
        self._fence = fence if fence is not None else (_cuda_event if self.device.type == "cuda" else None)
        self._previous_put: Any = None  # the fence after the last put

    def assign(self, sequence: int, blocks: list[int]) -> None:
        # DeepSpeed allocates its own blocks as the sequence grows; `blocks` are the admission's reservation.
        self.release(sequence)  # a slot is released when its request ends; this only guards against reuse

    def release(self, sequence: int) -> None:
        if sequence in self._known:
            self._known.discard(sequence)
            self.engine.flush(sequence)

    def ragged_forward(self, sequences: list[int], tokens: list[list[int]]) -> torch.Tensor:
        batch = [torch.tensor(ids, dtype=torch.int64) for ids in tokens]
        if self.atoms is not None:
            self.atoms.check([len(ids) for ids in tokens])
        if self._previous_put is not None:
            self._previous_put.synchronize()  # its inputs are copied before put() refills the host buffers
        try:
            logits = self.engine.put(sequences, batch, do_checks=False)
        except torch.OutOfMemoryError as error:
            raise EngineOutOfMemory(f"out of device memory: {error}") from error
        self._previous_put = self._fence() if self._fence is not None else None
        self._known.update(sequences)
        # put() returns a view of a buffer the next put() overwrites; the sampler wants float32 anyway.
        return logits.float()

    def prefill(self, sequences: list[int], chunks: list[list[int]], starts: list[int],
                all_logits: bool = False) -> torch.Tensor:
        if not all_logits:
            return self.ragged_forward(sequences, chunks)
        # FastGen unembeds only each sequence's last token. Prompt log-probabilities (one request at a time,
        # see RollingBatchEngine) are therefore teacher-forced one token per pass: slow, and only for the
        # requests that ask for them.
        rows = []
        for sequence, chunk in zip(sequences, chunks):
            rows.append(torch.stack([self.ragged_forward([sequence], [[token]])[0] for token in chunk]))
        longest = max(row.shape[0] for row in rows)
        out = rows[0].new_zeros((len(rows), longest, rows[0].shape[-1]))
        for index, row in enumerate(rows):
            out[index, :row.shape[0]] = row
        return out

    def decode(self, sequences: list[int], token_ids: list[int], positions: list[int]) -> torch.Tensor:
        return self.ragged_forward(sequences, [[token] for token in token_ids])

    def shutdown(self) -> None:
        for sequence in list(self._known):
            self.release(sequence)


def _cuda_event() -> Any:
    event = torch.cuda.Event()
    event.record()
    return event
