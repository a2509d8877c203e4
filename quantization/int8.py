"""Symmetric int8 quantization and the int8 x int8 -> int32 matmul (W8A8).

Weights are quantized per output channel (one scale per row of the [out, in] weight) once, at load time;
activations per token (one scale per row of the [tokens, in] input) at every call, from that row's own
abs-max ("dynamic"). Both use the same rule, SmoothQuant's and LLM.int8()'s absmax scheme:
    scale = max|x| / 127,   q = clamp(round(x / scale), -127, 127)
(-128 is left out so the range is symmetric and negation cannot overflow.)

The matmul runs on `torch._int_mm` (int8 inputs, int32 accumulation: exact) where the device and shape
allow it and it was measured to pay off; otherwise on a float32 matmul of the same integer values, which
gives the same products (every int8 product is exact in float32) and differs from the exact int32 sum only
by float32 rounding of the accumulation (relative 2^-24 per addition), far below the quantization error
itself. Which path is taken is decided by `use_int_mm`; benchmarks/int8_matmul_benchmark.py measures it.
"""

from __future__ import annotations

import torch

QMAX = 127
# Floor for a scale: an all-zero row (padding, a dead channel) would otherwise divide by zero.
_MIN_SCALE = 1e-8

# torch._int_mm on CUDA (cuBLASLt) needs more than 16 rows and both other dimensions multiples of 8
# (aten/src/ATen/native/cuda/Blas.cpp, _int_mm_out_cuda).
_CUDA_MIN_ROWS = 17
_CUDA_MULTIPLE = 8
# On CPU, _int_mm takes any shape. Measured on this project's CPU machine (AMD EPYC with AVX-512 VNNI,
# 2 cores, torch 2.13; benchmarks/int8_matmul_benchmark.py, RESULTS.md "int8 matmul on CPU"): it was
# faster than the float32 fallback at every shape measured, so the CPU always takes it.


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row (last dimension) of `x` to int8 with its own scale.

    Returns (q int8 of x's shape, scale float32 of shape [..., 1]) with x ~= q * scale."""
    absmax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = absmax.clamp(min=_MIN_SCALE) / QMAX
    q = torch.round(x.float() / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for the whole tensor (the "naive W8A8" granularity): (q, float32 scale of shape [1, 1])."""
    q, scale = quantize_rows(x.reshape(1, -1))
    return q.reshape(x.shape), scale


def quantize_weight(weight: torch.Tensor, per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel int8 of a [out, in] weight: (int8 [out, in], float32 scale [out]); with
    `per_tensor` every channel shares one scale (still stored per channel)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if per_tensor:
        q, scale = quantize_tensor(weight)
        return q.contiguous(), scale.reshape(1).expand(weight.shape[0]).contiguous()
    q, scale = quantize_rows(weight)
    return q.contiguous(), scale.squeeze(1).contiguous()


def use_int_mm(device: torch.device, rows: int, inner: int, outer: int) -> bool:
    """Whether `torch._int_mm` should compute a [rows, inner] x [inner, outer] int8 product here."""
    if device.type == "cuda":
        return rows >= _CUDA_MIN_ROWS and inner % _CUDA_MULTIPLE == 0 and outer % _CUDA_MULTIPLE == 0
    return device.type == "cpu"


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor, int_mm: bool | None = None) -> torch.Tensor:
    """a [M, K] int8 times b_t.T, where b_t is [N, K] int8 (a weight as stored): the integer products summed
    per output, as float32 [M, N] (exact through _int_mm; see the module docstring for the fallback).
    `int_mm` forces a path (benchmarks, tests); None lets `use_int_mm` decide."""
    rows, inner = a.shape
    outer = b_t.shape[0]
    if int_mm is None:
        int_mm = use_int_mm(a.device, rows, inner, outer)
    if int_mm:
        return torch._int_mm(a, b_t.t()).float()
    return a.float() @ b_t.float().t()


def w8a8_linear(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                int_mm: bool | None = None, per_tensor: bool = False) -> torch.Tensor:
    """x [..., in] (float) through an int8 weight [out, in] with per-channel scales [out]: per-token dynamic
    int8 activations (one scale for all tokens with `per_tensor`), int8 matmul, then both scales applied.
    Returns float32 [..., out] (no bias)."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    x_q, x_scale = quantize_tensor(rows) if per_tensor else quantize_rows(rows)
    accumulated = int8_matmul(x_q, weight_q, int_mm)
    out = accumulated * x_scale * weight_scale.unsqueeze(0)
    return out.reshape(*shape[:-1], weight_q.shape[0])
