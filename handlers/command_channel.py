"""The per-step command from rank 0 to the other tensor-parallel ranks, as preallocated int64 tensors.

A command is an operation code and a few flat integer fields (token ids, positions, row numbers; a
block-table KV design adds slot mappings and block tables the same way). It travels as two broadcasts on
the control group:

1. a fixed-size header `[op, field count, length of field 0, length of field 1, ...]`;
2. the fields concatenated, in a payload buffer both sides keep. Only the used prefix is broadcast. When
   a command needs more room than the buffer has, both sides grow it to the same size (the next power of
   two), which each computes from the header alone, so the buffers stay in step without a message of
   their own.

Why not `broadcast_object_list`: it pickles on one side and unpickles on the others, and broadcasts a
size tensor before each object: per step that is two collectives plus pickling of Python lists, where
this is two collectives of raw integers and no allocation in the steady state.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

#: fields one command may carry (the header's size); enough for a paged-KV forward step
MAX_FIELDS = 14
#: the payload buffer's starting size, in int64 elements (grown when a command needs more)
INITIAL_PAYLOAD = 4096

Field = Sequence[int] | torch.Tensor


class CommandChannel:
    """Rank 0 calls `send`, every other rank `receive`, in the same order (one collective each)."""

    def __init__(self, group: Any, src: int = 0, initial_payload: int = INITIAL_PAYLOAD):
        self.group = group
        self.src = src
        self.header = torch.zeros(2 + MAX_FIELDS, dtype=torch.int64)
        self.payload = torch.zeros(initial_payload, dtype=torch.int64)

    def send(self, op: int, *fields: Field) -> None:
        if len(fields) > MAX_FIELDS:
            raise ValueError(f"a command carries at most {MAX_FIELDS} fields, got {len(fields)}")
        tensors = [_as_int64(field) for field in fields]
        lengths = [t.numel() for t in tensors]
        self.header.zero_()
        self.header[0] = op
        self.header[1] = len(tensors)
        self.header[2:2 + len(tensors)] = torch.tensor(lengths, dtype=torch.int64)
        total = sum(lengths)
        self._reserve(total)
        if total:
            torch.cat(tensors, out=self.payload[:total])
        self._broadcast(self.header)
        if total:
            self._broadcast(self.payload[:total])

    def receive(self) -> tuple[int, list[torch.Tensor]]:
        """The next command: its op code and its fields (views into the payload buffer, valid until the
        next `receive`)."""
        self._broadcast(self.header)
        op, count = int(self.header[0]), int(self.header[1])
        lengths = self.header[2:2 + count].tolist()
        total = sum(lengths)
        self._reserve(total)
        if total:
            self._broadcast(self.payload[:total])
        return op, list(torch.split(self.payload[:total], lengths)) if count else []

    def _reserve(self, total: int) -> None:
        if total > self.payload.numel():
            self.payload = torch.zeros(1 << (total - 1).bit_length(), dtype=torch.int64)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist
        dist.broadcast(tensor, src=self.src, group=self.group)


def _as_int64(field: Field) -> torch.Tensor:
    if isinstance(field, torch.Tensor):
        return field.detach().to("cpu", torch.int64).reshape(-1)
    return torch.as_tensor(field, dtype=torch.int64).reshape(-1)
