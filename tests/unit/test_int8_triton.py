"""The Triton W8A8 kernels (quantization/int8_triton.py) against float64 references computed here: compiled on
a GPU where there is one, else run by Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET
before anything imports Triton)."""

from __future__ import annotations

import os

import pytest
import torch

assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets it"
pytest.importorskip("triton", reason="Triton comes with the test extra on Linux x86-64 and with CUDA torch")

from quantization import int8_triton as kernels_module  # noqa: E402
from tests.support.int8_reference import reference_rows, reference_w8a8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernels():
    return kernels_module


@pytest.mark.parametrize("rows,cols", [(1, 64), (5, 100), (3, 17), (33, 257)])
def test_rows_are_quantized_with_their_own_scales(kernels, rows, cols):
    torch.manual_seed(rows * 1000 + cols)
    x = torch.randn(rows, cols) * torch.logspace(-1, 1, rows).unsqueeze(1)
    q, scale = kernels.quantize_rows(x.half().to(DEVICE))
    q, scale = q.cpu(), scale.cpu()
    ref_q, ref_scale = reference_rows(x.half().float())
    assert q.dtype == torch.int8 and q.shape == (rows, cols) and scale.shape == (rows,)
    assert torch.allclose(scale.double(), ref_scale.squeeze(1), rtol=1e-6)
    assert torch.equal(q.double(), ref_q)  # the same float32 arithmetic gives the same integers
    assert (q.abs().amax(dim=1) == 127).all()


def test_ties_round_to_even_and_zero_rows_stay_finite(kernels):
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49], [0.0] * 8])  # scale 1 exactly
    q, scale = kernels.quantize_rows(x.to(DEVICE))
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 3] and q[1].tolist() == [0] * 8
    assert torch.isfinite(scale).all()


def two_kernels(kernels, x, weight, scales, bias=None, out=None):
    q, scale = kernels.quantize_rows(x)
    return kernels.int8_matmul_scaled(q, scale, weight, scales, x.dtype, bias=bias, out=out)


def fused(kernels, x, weight, scales, bias=None, out=None):
    return kernels.w8a8_fused(x, weight, scales, bias=bias, out=out)


PATHS = {"fused": fused, "two kernels": two_kernels}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows,inner,outer", [(1, 64, 48), (7, 100, 33), (16, 96, 40), (17, 256, 64), (70, 96, 130)])
def test_the_scaled_int8_matmul_matches_the_float64_w8a8(kernels, path, rows, inner, outer):
    """Row counts on both sides of cuBLASLt's 16-row limit (and of one block of rows), widths that are not
    multiples of 8, inputs longer than one block along K."""
    torch.manual_seed(rows + inner + outer)
    x = torch.randn(rows, inner)
    weight = torch.randn(outer, inner) * 0.05
    bias = torch.randn(outer)
    wq, ws = reference_rows(weight)
    got = PATHS[path](kernels, x.to(DEVICE), wq.to(DEVICE, torch.int8), ws.squeeze(1).float().to(DEVICE),
                      bias=bias.to(DEVICE)).cpu()
    expected = reference_w8a8(x, weight) + bias.double()
    assert got.dtype == torch.float32 and got.shape == (rows, outer)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)
    # and W8A8 is close to the float product: the quantization error, not a wrong product
    exact = x.double() @ weight.double().t() + bias.double()
    assert (got.double() - exact).abs().max() < 0.05 * exact.abs().max()


@pytest.mark.parametrize("rows", [9, 17])  # the fused kernel, then the two
def test_half_inputs_give_half_outputs_into_a_given_buffer(kernels, rows):
    torch.manual_seed(3)
    x = torch.randn(rows, 64).half()
    weight = torch.randn(24, 64)
    wq, ws = reference_rows(weight)
    out = torch.empty(rows, 24, dtype=torch.half, device=DEVICE)
    got = kernels.w8a8_linear(x.to(DEVICE), wq.to(DEVICE, torch.int8), ws.squeeze(1).float().to(DEVICE), out=out)
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.half
    got = got.cpu()
    expected = reference_w8a8(x.float(), weight)
    assert torch.allclose(got.double(), expected, rtol=2e-3, atol=2e-3)  # fp16 rounding of the result


def test_the_fused_kernel_and_the_two_kernels_give_the_same_bits(kernels):
    torch.manual_seed(4)
    x = torch.randn(20, 300, device=DEVICE).half()
    wq, ws = reference_rows(torch.randn(50, 300))
    wq, ws = wq.to(DEVICE, torch.int8), ws.squeeze(1).float().to(DEVICE)
    assert torch.equal(fused(kernels, x, wq, ws), two_kernels(kernels, x, wq, ws))


def test_shapes_that_do_not_fit_are_refused_by_name(kernels):
    with pytest.raises(ValueError, match="2-D"):
        kernels.quantize_rows(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="2-D"):
        kernels.w8a8_linear(torch.zeros(2, 3, 4), torch.zeros(4, 4, dtype=torch.int8), torch.ones(4))
    with pytest.raises(ValueError, match="input has 3 features, the weight 4"):
        kernels.w8a8_fused(torch.zeros(2, 3), torch.zeros(5, 4, dtype=torch.int8), torch.ones(5))
    with pytest.raises(ValueError, match="input has 8 features, the weight 9"):
        kernels.int8_matmul_scaled(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), torch.zeros(4, 9, dtype=torch.int8),
                                   torch.ones(4), torch.float32)


class _Compiled:
    """Stands in for Triton's CompiledKernel: records what its launcher is handed."""

    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.launches = []

    def run(self, *launch):
        self.launches.append(launch)


class _JitKernel:
    """Stands in for a `triton.jit` function: `kernel[grid](...)` compiles (once) and returns the compiled kernel."""

    def __init__(self):
        self.calls, self.compiled = [], _Compiled()

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs)) or self.compiled


class _CudaTensor:
    is_cuda = True
    device = torch.device("cuda", 0)


def test_the_launcher_hands_repeated_launches_straight_to_the_compiled_kernel(kernels, monkeypatch):
    monkeypatch.setattr(kernels, "_INTERPRET", False)
    monkeypatch.setattr(kernels._Launcher, "stream", staticmethod(lambda tensor: 7))
    kernel = _JitKernel()
    launch = kernels._Launcher(kernel)
    x = _CudaTensor()
    launch((4,), (x, 16, 32), {"BLOCK": 64}, {"num_warps": 4})
    launch((4,), (x, 16, 32), {"BLOCK": 64}, {"num_warps": 4})
    assert len(kernel.calls) == 1  # compiled and launched by Triton once
    assert kernel.compiled.launches == [(4, 1, 1, 7, "function", "metadata", None, None, None, x, 16, 32, 64)]
    launch((4,), (x, 17, 32), {"BLOCK": 64}, {"num_warps": 4})  # another integer: Triton decides again
    launch((4,), (x, 16, 32), {"BLOCK": 128}, {"num_warps": 4})  # another constexpr
    assert len(kernel.calls) == 3 and len(kernel.compiled.launches) == 1


def test_the_launcher_leaves_launches_to_triton_while_a_launch_hook_listens(kernels, monkeypatch):
    import triton

    monkeypatch.setattr(kernels, "_INTERPRET", False)
    monkeypatch.setattr(kernels._Launcher, "stream", staticmethod(lambda tensor: 7))
    kernel = _JitKernel()
    launch = kernels._Launcher(kernel)
    x = _CudaTensor()
    launch((1,), (x,), {}, {})
    assert not kernels._launch_hooks_registered()  # Triton's hook chains exist, empty
    hook = lambda metadata: None  # noqa: E731
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert kernels._launch_hooks_registered()
        launch((1,), (x,), {}, {})
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert len(kernel.calls) == 2 and kernel.compiled.launches == []
    launch((1,), (x,), {}, {})
    assert len(kernel.compiled.launches) == 1
