"""Scales under AutoTP sharding: DeepSpeed's column-parallel LinearLayer and row-parallel LinearAllreduce
(built here around the shards AutoTP would give each rank) become Int8Linear layers whose per-channel
weight scales and per-token activation scales have the shard's shapes, and whose outputs combine across
ranks (concatenated, or summed by the all-reduce) into the unsharded layer's output."""

from __future__ import annotations

import pytest
import torch
from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer
from torch import nn

from quantization import int8
from quantization.int8_linear import Int8Linear, replace_linears

DEGREE = 3
IN, OUT, TOKENS = 96, 48, 5


def shard_layer(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A DeepSpeed TP layer holding one rank's shard (mp_group None: the shard is given, not cut here)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return cls(linear, mp_group=None)


def quantized(module: nn.Module) -> Int8Linear:
    holder = nn.Module()
    holder.layer = module
    assert replace_linears(holder, ["layer"]).replaced == ["layer"]
    return holder.layer


@pytest.fixture
def full():
    torch.manual_seed(0)
    return torch.randn(OUT, IN), torch.randn(OUT), torch.randn(2, TOKENS, IN)


def test_column_parallel_shards_carry_their_slice_of_the_per_channel_scales(full):
    weight, bias, x = full
    reference = Int8Linear(weight, bias)
    outputs = []
    for rank, (w, b) in enumerate(zip(weight.chunk(DEGREE, dim=0), bias.chunk(DEGREE))):
        layer = quantized(shard_layer(LinearLayer, w, b))
        assert not layer.row_parallel
        assert layer.weight.shape == (OUT // DEGREE, IN) and layer.weight_scale.shape == (OUT // DEGREE,)
        rows = slice(rank * OUT // DEGREE, (rank + 1) * OUT // DEGREE)
        assert torch.equal(layer.weight_scale, reference.weight_scale[rows])
        outputs.append(layer(x))
    # every rank sees the whole input, so the per-token scales and the result are those of the full layer
    assert torch.equal(torch.cat(outputs, dim=-1), reference(x))


def test_row_parallel_shards_have_own_scales_and_sum_to_the_layer_output(full):
    weight, bias, x = full
    weights, inputs = weight.chunk(DEGREE, dim=1), x.chunk(DEGREE, dim=-1)
    partials = []
    for w, part in zip(weights[1:], inputs[1:]):
        layer = quantized(shard_layer(LinearAllreduce, w, None))
        assert layer.weight.shape == (OUT, IN // DEGREE) and layer.weight_scale.shape == (OUT,)
        _, token_scales = int8.quantize_rows(part.reshape(-1, IN // DEGREE))
        assert token_scales.shape == (2 * TOKENS, 1)  # per token, from this rank's slice of the input
        partials.append(layer(part))

    # rank 0, with an all-reduce that adds the other ranks' partial outputs, then the replicated bias once
    rank0 = quantized(shard_layer(LinearAllreduce, weights[0], bias))
    seen = []
    rank0._all_reduce = lambda out: seen.append(out.clone()) or out + sum(partials)
    assert rank0.row_parallel
    out = rank0(inputs[0])
    # the all-reduce got rank 0's dequantized partial product, before the bias
    assert len(seen) == 1 and torch.equal(seen[0], int8.w8a8_linear(inputs[0], rank0.weight, rank0.weight_scale))
    exact = x @ weight.t() + bias
    assert torch.allclose(out, seen[0] + sum(partials) + bias)
    assert (out - exact).norm() / exact.norm() < 0.02  # an ordinary W8A8 error, shard by shard
