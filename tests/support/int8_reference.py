"""The W8A8 rule written out independently of quantization/ for tests to compare the int8 paths with."""

from __future__ import annotations

import torch


def reference_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per row as the W8A8 rule says: a float32 scale (absmax / 127) and the float32
    quotient rounded half to even (torch.round's rule); returned in float64 for exact products."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
    return torch.round(x / scale).clamp(-127, 127).double(), scale.double()


def reference_w8a8(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W8A8 of x [rows, in] and weight [out, in], in float64: both quantized (rows of x, rows of the weight),
    multiplied exactly, scaled back."""
    xq, xs = reference_rows(x)
    wq, ws = reference_rows(weight)
    return (xq @ wq.t()) * xs * ws.t()
