"""W8A8 on the GPU in Triton: per-token int8 quantization of the activations and the int8 matmul with both
scales applied in its epilogue, in one kernel launch for few rows and two for many.

The eager PyTorch path (`quantization.int8.w8a8_linear`) takes ~10 kernel launches a layer (abs-max,
divide, round, clamp, cast, `torch._int_mm`, and three for the scales) and cuBLASLt's int8 GEMM refuses 16
rows or fewer, the decode case; measured on an H200 (shared/FACTS.md), the launches alone eat the int8
gain, and at one sequence FastGen's step is bound by the host's launching. Here:

  - `quantize_rows`: one program per row reads the row once (fp16/bf16), takes its abs-max, and writes the
    int8 row and its float32 scale (scale = max|x| / 127, q = round-half-even(x / scale), clamped to
    +-127: the same rule as `quantization.int8.quantize_rows`, so the two paths give the same integers).
  - `int8_matmul_scaled`: int8 x int8 -> int32 on the tensor cores (`tl.dot`, exact), then
    out[m, n] = acc[m, n] * x_scale[m] * w_scale[n] (+ bias[n]) in float32, stored in the output dtype.
    Any number of rows: a program covers BLOCK_M rows and masks the rest.
  - `w8a8_linear` for at most `FUSED_MAX_ROWS` rows (decoding few sequences): one kernel that does both,
    each program reading its rows of the input twice (their abs-max, then the tiles it quantizes as it
    multiplies). Every program of a row block re-reads those rows, which costs little when they are a few KB
    (served from L2) and too much for many rows, which take the two kernels.

Block shapes come from `block_config`, a small table by row count (decode: 16-row programs, narrow in N
so that a 4,096-wide layer still spreads over the GPU's multiprocessors; prefill: square-ish tiles).
`benchmarks/int8_linear_benchmark.py` measures them on the GPU against fp16 cuBLAS.

Triton is PyTorch's own compiler and comes with every CUDA build of torch; nothing here is imported
without it. Under `TRITON_INTERPRET=1` the same kernels run on the CPU (slowly), which is how the CPU
tests check them.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

QMAX = 127.0
_MIN_SCALE = 1e-8
#: Triton's interpreter (CPU): kernels run as Python; nothing is compiled to keep
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class _Launcher:
    """Launches a Triton kernel, compiled once per specialization, without Triton's per-call Python work.

    `kernel[grid](...)` binds and specializes every argument, checks the kernel's globals and builds launch
    metadata on each call (Triton 3.6 builds it whenever its launch hooks exist, and they always exist, empty),
    and a W8A8 layer made of such launches cost the H200's host 70-130 us a call against 13-24 us for
    DeepSpeed's fp16 layer (RESULTS.md section 7), where FastGen at one sequence is bound by the host's
    launching. Here the first call with a given specialization goes through Triton and keeps the compiled
    kernel it returns; later calls hand the same arguments straight to its launcher. The key is a superset of
    what Triton specializes on (every integer argument's value, each tensor's dtype and 16-byte alignment, the
    constexprs and options), so a cached kernel only ever sees arguments Triton would have compiled it for.
    Under the interpreter (CPU), off CUDA, or while a launch hook is registered (a profiler), every call goes
    through Triton."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled: dict = {}

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, options: dict) -> None:
        key = (grid, *_specialization(args), *constexprs.values(), *options.values())
        compiled = self.compiled.get(key)
        if compiled is None or _launch_hooks_registered():
            compiled = self.kernel[grid](*args, **constexprs, **options)
            if args[0].is_cuda and not _INTERPRET:
                self.compiled[key] = compiled
            return
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                     self.stream(args[0]), compiled.function, compiled.packed_metadata, None, None, None, *args,
                     *constexprs.values())

    @staticmethod
    def stream(tensor: torch.Tensor) -> int:
        """The current CUDA stream of `tensor`'s device, as Triton launches on it."""
        return triton.runtime.driver.active.get_current_stream(tensor.device.index)


def _launch_hooks_registered() -> bool:
    """Whether anything listens to Triton's launches (a profiler): Triton >= 3.4 keeps hook chains that are
    empty by default, older versions None."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None:
        return True  # a Triton without knobs: always its own launch path
    hooks = (getattr(runtime, "launch_enter_hook", None), getattr(runtime, "launch_exit_hook", None))
    return any(hook is not None and bool(getattr(hook, "calls", True)) for hook in hooks)


def _specialization(args: tuple) -> tuple:
    return tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args)


class BlockConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


#: the most rows the single fused kernel takes (above, the quantization runs once, in its own kernel): every
#: program of the fused kernel reads its rows of the input twice, which for 16 rows of a 11,008-wide input is
#: already as many bytes (from L2) as the layer's int8 weights; benchmarks/int8_linear_benchmark.py times both
FUSED_MAX_ROWS = 16


#: the fused kernel's tiles (it takes at most FUSED_MAX_ROWS rows): wide in N, so that fewer programs re-read the
#: input; of 24 tried on the H200 the fastest at one row for Llama-2-7B's two widest layers (QKV, gate/up:
#: RESULTS.md section 7, "int8 on the H200")
FUSED_CONFIG = BlockConfig(16, 128, 256, 8, 3)


def block_config(rows: int) -> BlockConfig:
    """The matmul's tiles for `rows` rows (tl.dot needs 16 or more in every dimension), from the block sweep of
    `benchmarks/int8_linear_benchmark.py --configs` on an H200 over Llama-2-7B's four layers (RESULTS.md section
    7). The best differed per layer: at 1-16 rows a 256-deep tile everywhere, 64 wide at four of the eight
    (layer, rows) points, 32 at three, 128 at one; at 64 rows 32- or 64-row blocks; at 512 rows
    64 x 64 (attention output, down projection), 64 x 128 (QKV) and 128 x 128 (gate/up), so 64 x 64 is taken
    there and 128 x 128 above 1,024 rows (prefill chunks, where the widest layer dominates)."""
    if rows <= 16:
        return BlockConfig(16, 64, 256, 4, 4)
    if rows <= 32:
        return BlockConfig(32, 64, 128, 8, 3)
    if rows <= 64:
        return BlockConfig(64, 64, 128, 8, 3)
    if rows <= 1024:
        return BlockConfig(64, 64, 128, 4, 3)
    return BlockConfig(128, 128, 128, 8, 3)


@triton.jit
def _round_half_even(x):
    # x - round-half-even(x) as floor arithmetic (libdevice's rint is not in the interpreter): the nearest
    # integer, and of two equally near the even one, as torch.round does
    floor = tl.floor(x)
    diff = x - floor
    nearest = tl.where(diff > 0.5, floor + 1.0, floor)
    tie = diff == 0.5
    odd_floor = (floor - 2.0 * tl.floor(floor * 0.5)) != 0.0
    return tl.where(tie, tl.where(odd_floor, floor + 1.0, floor), nearest)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, cols, x_row_stride, q_row_stride,
                          BLOCK: tl.constexpr, QMAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    row = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < cols
    x = tl.load(x_ptr + row * x_row_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), MIN_SCALE) / QMAX
    q = tl.minimum(tl.maximum(_round_half_even(x / scale), -QMAX), QMAX)
    tl.store(q_ptr + row * q_row_stride + offsets, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)


_QUANTIZE_ROWS = _Launcher(_quantize_rows_kernel)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [rows, cols] and float32 scales [rows] of a 2-D floating-point `x`, each row with its own scale."""
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D [rows, cols] input, got shape {tuple(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=torch.int8, device=x.device)
    scale = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(cols)
        warps = 4 if block <= 4096 else 8 if block <= 16384 else 16
        _QUANTIZE_ROWS((rows,), (x, q, scale, cols, x.stride(0), q.stride(0)),
                       {"BLOCK": block, "QMAX": QMAX, "MIN_SCALE": _MIN_SCALE}, {"num_warps": warps})
    return q, scale


@triton.jit
def _int8_matmul_kernel(a_ptr, b_ptr, out_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K,
                        stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # programs in groups of GROUP_M row blocks, so that neighbouring programs share weight tiles in L2
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * blocks_n
    group = pid // in_group
    first_m = group * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + cols[None, :] * stride_bn + ks[:, None] * stride_bk  # [BLOCK_K, BLOCK_N] of W [N, K]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k_start in range(0, K, BLOCK_K):
        k_left = K - k_start
        a = tl.load(a_ptrs, mask=(rows[:, None] < M) & (ks[None, :] < k_left), other=0)
        b = tl.load(b_ptrs, mask=(cols[None, :] < N) & (ks[:, None] < k_left), other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    a_scale = tl.load(a_scale_ptr + rows, mask=rows < M, other=0.0)
    b_scale = tl.load(b_scale_ptr + cols, mask=cols < N, other=0.0)
    out = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


_INT8_MATMUL = _Launcher(_int8_matmul_kernel)


def _product_shape(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None,
                   dtype: torch.dtype) -> tuple[int, int, int, torch.Tensor]:
    """(rows, in, out features, the output tensor) of x [rows, in] times weight [out, in].T, checked."""
    rows, inner = x.shape
    if weight.shape[1] != inner:
        raise ValueError(f"input has {inner} features, the weight {weight.shape[1]}")
    outer = weight.shape[0]
    return rows, inner, outer, out if out is not None else torch.empty((rows, outer), dtype=dtype, device=x.device)


def int8_matmul_scaled(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       out_dtype: torch.dtype, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                       config: BlockConfig | None = None) -> torch.Tensor:
    """(a [M, K] int8 @ weight [N, K] int8 .T) * a_scale [M, 1] * weight_scale [1, N] (+ bias [N]) in
    `out_dtype`, into `out` ([M, N], row-major) when given."""
    rows, inner, outer, out = _product_shape(a, weight, out, out_dtype)
    if rows == 0:
        return out
    config = config or block_config(rows)
    grid = (triton.cdiv(rows, config.block_m) * triton.cdiv(outer, config.block_n),)
    _INT8_MATMUL(grid, (a, weight, out, a_scale, weight_scale, bias if bias is not None else a_scale, rows, outer,
                        inner, a.stride(0), a.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
                        out.stride(1)),
                 {"HAS_BIAS": bias is not None, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                  "BLOCK_K": config.block_k, "GROUP_M": 8},
                 {"num_warps": config.num_warps, "num_stages": config.num_stages})
    return out


@triton.jit
def _w8a8_fused_kernel(x_ptr, b_ptr, out_ptr, b_scale_ptr, bias_ptr, M, N, K,
                       stride_xm, stride_xk, stride_bn, stride_bk, stride_om, stride_on,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       QMAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk
    absmax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):  # each row's abs-max over the whole input
        x = tl.load(x_ptrs + k_start * stride_xk, mask=(rows[:, None] < M) & (ks[None, :] < K - k_start), other=0.0)
        absmax = tl.maximum(absmax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    scale = tl.maximum(absmax, MIN_SCALE) / QMAX
    b_ptrs = b_ptr + cols[None, :] * stride_bn + ks[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k_start in range(0, K, BLOCK_K):
        k_left = K - k_start
        x = tl.load(x_ptrs + k_start * stride_xk, mask=(rows[:, None] < M) & (ks[None, :] < k_left), other=0.0)
        q = tl.minimum(tl.maximum(_round_half_even(x.to(tl.float32) / scale[:, None]), -QMAX), QMAX).to(tl.int8)
        b = tl.load(b_ptrs + k_start * stride_bk, mask=(cols[None, :] < N) & (ks[:, None] < k_left), other=0)
        acc += tl.dot(q, b, out_dtype=tl.int32)
    b_scale = tl.load(b_scale_ptr + cols, mask=cols < N, other=0.0)
    out = acc.to(tl.float32) * scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


_W8A8_FUSED = _Launcher(_w8a8_fused_kernel)


def w8a8_fused(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None, config: BlockConfig | None = None) -> torch.Tensor:
    """`w8a8_linear` in the single fused kernel, whatever the number of rows (see the module docstring)."""
    rows, inner, outer, out = _product_shape(x, weight, out, x.dtype)
    if rows == 0:
        return out
    config = config or FUSED_CONFIG
    grid = (triton.cdiv(outer, config.block_n), triton.cdiv(rows, config.block_m))
    _W8A8_FUSED(grid, (x, weight, out, weight_scale, bias if bias is not None else weight_scale, rows, outer, inner,
                       x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1)),
                {"HAS_BIAS": bias is not None, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                 "BLOCK_K": config.block_k, "QMAX": QMAX, "MIN_SCALE": _MIN_SCALE},
                {"num_warps": config.num_warps, "num_stages": config.num_stages})
    return out


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, in] (fp16/bf16/fp32) through an int8 weight [out, in] with per-channel scales: per-token int8
    activations, int8 matmul, scales (and bias) applied in the same kernel; output in x's dtype. One kernel
    launch up to FUSED_MAX_ROWS rows, two above."""
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D [rows, in] input, got shape {tuple(x.shape)}")
    if x.shape[0] <= FUSED_MAX_ROWS:
        return w8a8_fused(x, weight, weight_scale, bias=bias, out=out)
    q, scale = quantize_rows(x)
    return int8_matmul_scaled(q, scale, weight, weight_scale, x.dtype, bias=bias, out=out)
