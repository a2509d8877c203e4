"""The int8 arithmetic against float64 references computed here, independently of quantization/int8.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantization import int8
from quantization.int8_linear import Int8Linear, linear_names, replace_linears


def reference_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per row, in float64."""
    x = x.double()
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    return torch.round(x / scale).clamp(-127, 127), scale


def test_quantize_rows_matches_the_float64_reference_and_bounds_the_error():
    torch.manual_seed(0)
    x = torch.randn(64, 96) * torch.logspace(-2, 2, 96)  # channels of very different ranges
    q, scale = int8.quantize_rows(x)
    ref_q, ref_scale = reference_quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (64, 1)
    assert torch.allclose(scale.double(), ref_scale, rtol=1e-6)
    # float32 vs float64 rounding may differ on exact .5 ties only
    assert (q.double() - ref_q).abs().max() <= 1 and (q.double() != ref_q).float().mean() < 1e-3
    assert q.abs().max() == 127  # the row maximum maps to the edge of the range
    error = (int8.dequantize_rows(q, scale).double() - x.double()).abs()
    assert (error <= ref_scale / 2 + 1e-6).all()  # at most half a step per element


def test_zero_rows_do_not_divide_by_zero():
    q, scale = int8.quantize_rows(torch.zeros(3, 8))
    assert torch.equal(q, torch.zeros(3, 8, dtype=torch.int8)) and torch.isfinite(scale).all()


def test_weight_scales_are_per_output_channel_and_per_tensor_shares_one():
    weight = torch.randn(48, 32)
    weight[5] *= 100
    q, scale = int8.quantize_weight(weight)
    assert q.shape == (48, 32) and scale.shape == (48,)
    assert torch.allclose(scale.double(), weight.double().abs().amax(dim=1) / 127, rtol=1e-6)
    _, shared = int8.quantize_weight(weight, per_tensor=True)
    assert shared.shape == (48,) and torch.all(shared == weight.abs().max() / 127)


@pytest.mark.parametrize("int_mm", [True, False])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_int8_matmul_is_the_exact_integer_product(int_mm, rows):
    torch.manual_seed(rows)
    a = torch.randint(-127, 128, (rows, 64), dtype=torch.int8)
    b = torch.randint(-127, 128, (40, 64), dtype=torch.int8)
    exact = a.double() @ b.double().t()
    got = int8.int8_matmul(a, b, int_mm=int_mm).double()
    # _int_mm accumulates in int32 (exact); the float32 path is exact for sums of this size (< 2^24).
    assert torch.equal(got, exact)


def test_w8a8_linear_equals_the_float64_reference_of_the_quantized_operands():
    torch.manual_seed(1)
    x, weight = torch.randn(2, 7, 64), torch.randn(40, 64)
    out = int8.w8a8_linear(x, *int8.quantize_weight(weight))
    xq, xs = reference_quantize_rows(x.reshape(-1, 64))
    wq, ws = reference_quantize_rows(weight)
    expected = ((xq @ wq.t()) * xs * ws.t()).reshape(2, 7, 40)
    assert out.shape == (2, 7, 40)
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
    # and it approximates the float product to within int8 precision
    exact = x.double() @ weight.double().t()
    assert (out.double() - exact).norm() / exact.norm() < 0.02


def test_int8_linear_replaces_linear_layers_but_not_the_output_head():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(16, 32)
            self.down = nn.Linear(32, 16, bias=False)
            self.head = nn.Linear(16, 10)

        def get_output_embeddings(self):
            return self.head

        def forward(self, x):
            return self.head(self.down(torch.relu(self.up(x))))

    torch.manual_seed(2)
    model = Tiny()
    x = torch.randn(4, 16)
    expected = model(x)
    up_weight, up_bias = model.up.weight.detach().clone(), model.up.bias.detach().clone()
    report = replace_linears(model, linear_names(model))
    assert report.replaced == ["up", "down"] and isinstance(model.head, nn.Linear)
    assert isinstance(model.up, Int8Linear) and model.up.weight.dtype == torch.int8
    assert torch.equal(model.up.bias, up_bias)
    xq, xs = reference_quantize_rows(x)
    wq, ws = reference_quantize_rows(up_weight)
    assert torch.allclose(model.up(x).double(), (xq @ wq.t()) * xs * ws.t() + up_bias.double(), atol=1e-5)
    assert torch.allclose(model(x), expected, rtol=0.05, atol=0.02)
    # one byte per weight plus a float32 scale per output channel, against two bytes per weight
    assert report.int8_bytes == 16 * 32 + 32 * 16 + 4 * (32 + 16) and report.fp16_bytes == 2 * (16 * 32 + 32 * 16)
