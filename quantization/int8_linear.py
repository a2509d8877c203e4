"""The W8A8 linear layer and the swap of a model's linear layers for it.

`Int8Linear` holds an int8 weight [out, in] with one float32 scale per output channel and quantizes its
input per token at every call (`quantization.int8.w8a8_linear`). It replaces, in place:
  - `torch.nn.Linear` (and subclasses that only re-implement the same matmul, e.g. Falcon's FalconLinear);
  - transformers' `Conv1D` (GPT-2), whose weight is stored [in, out];
  - DeepSpeed AutoTP's column-parallel `LinearLayer` (and its fused-QKV / sub-parameter subclasses, which
    share its forward) and row-parallel `LinearAllreduce` (deepspeed/module_inject/layers.py, 0.19.8).

Tensor parallelism: AutoTP has already sharded each weight when this runs, and every rank quantizes its
own shard, so the scales are sharded with their weights by construction:
  - column-parallel (weight split along `out`): the shard's rows are whole output channels, so its scales
    are exactly the [out / N] slice of the unsharded layer's scales;
  - row-parallel (weight split along `in`): each rank holds a slice of every output channel and gets its
    own per-channel scales [out] for that slice, and its own per-token activation scales from its slice of
    the input. Each rank's partial product is dequantized with its own scales before AutoTP's all-reduce
    sums the float partial results, so the sum is the layer's output (not bitwise the unsharded int8
    result, but each part is an ordinary W8A8 product with finer scales).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from quantization.int8 import quantize_weight, w8a8_linear

logger = logging.getLogger(__name__)


class Int8Linear(nn.Module):
    """y = dequant(int8(x) @ int8(W).T) + b, with per-token activation and per-channel weight scales.

    `all_reduce` (row-parallel layers) is DeepSpeed's RowParallel collective, applied to the dequantized
    partial output before the bias, as DeepSpeed's LinearAllreduce does."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, all_reduce: Callable[[Any], Any] | None = None,
                 per_tensor: bool = False):
        super().__init__()
        # per_tensor: one scale per weight and one per activation tensor, the "naive W8A8" baseline that
        # `python -m entrypoint quality` compares against; serving always uses per-channel/per-token.
        self.per_tensor = per_tensor
        q, scale = quantize_weight(weight.detach(), per_tensor)
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        # A frozen Parameter (not a buffer) so parameter counts and byte sums (the engine's summary) see it.
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        self._all_reduce = all_reduce

    @property
    def row_parallel(self) -> bool:
        return self._all_reduce is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = w8a8_linear(x, self.weight, self.weight_scale, per_tensor=self.per_tensor).to(x.dtype)
        if self._all_reduce is not None:
            out = self._all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"row_parallel={self.row_parallel}")


@dataclass
class QuantizedLinears:
    """What `replace_linears` did: names replaced, names left as they were (and why), and bytes."""

    replaced: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    int8_bytes: int = 0  # int8 weights + their scales
    fp16_bytes: int = 0  # the same weights at 2 bytes each

    @property
    def ratio(self) -> float:
        return self.int8_bytes / self.fp16_bytes if self.fp16_bytes else 0.0

    def summary(self) -> str:
        text = (f"{len(self.replaced)} linear layers now int8 (W8A8): {self.int8_bytes / 2**20:.1f} MiB of weights and "
                f"scales, {self.ratio:.1%} of their {self.fp16_bytes / 2**20:.1f} MiB in fp16")
        if self.skipped:
            text += f"; left as they were: {', '.join(f'{n} ({why})' for n, why in self.skipped.items())}"
        return text


def as_weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, Callable | None] | str:
    """(weight as [out, in], bias, all-reduce or None) of a linear layer this module knows, or why not."""
    kind = _kind(module)
    if kind is None:
        return f"{type(module).__name__} is not a linear layer type this package knows"
    if kind == "conv1d":
        return module.weight.t(), module.bias, None
    if kind == "column" and getattr(module, "gather_output", False):
        return "column-parallel with gather_output (an output head)"
    if kind == "row":
        from deepspeed.module_inject.layers import RowParallel
        group = module.mp_group
        return module.weight, module.bias, (lambda out: RowParallel.apply(group, out, True)) if group is not None else None
    return module.weight, module.bias, None


def input_dim(module: nn.Module) -> int:
    """The dimension of `module.weight` that runs along the layer's input features."""
    return 0 if _kind(module) == "conv1d" else 1


def _kind(module: nn.Module) -> str | None:
    """linear / conv1d / column / row: how the module computes, judged by its forward, not just its type
    (a subclass with its own forward may compute something else and is left alone)."""
    forward = type(module).forward
    try:
        from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer
    except ImportError:  # DeepSpeed is a dependency, but the math does not need it
        LinearLayer = LinearAllreduce = None
    if LinearLayer is not None and isinstance(module, LinearLayer) and forward is LinearLayer.forward:
        return "column"
    if LinearAllreduce is not None and isinstance(module, LinearAllreduce) and forward is LinearAllreduce.forward:
        return "row"
    if isinstance(module, nn.Linear) and (forward is nn.Linear.forward or _plain_linear_subclass(type(module))):
        return "linear"
    from transformers.pytorch_utils import Conv1D
    if isinstance(module, Conv1D) and forward is Conv1D.forward:
        return "conv1d"
    return None


def _plain_linear_subclass(cls: type) -> bool:
    # Falcon's FalconLinear re-implements nn.Linear's forward as `input @ weight.T (+ bias)` (its own
    # docstring-free copy, kept for a historical bf16 reason); same computation.
    return cls.__name__ == "FalconLinear"


def replace_linears(model: nn.Module, names: list[str], per_tensor: bool = False) -> QuantizedLinears:
    """Swap each named module for an `Int8Linear` built from its (possibly sharded) weight."""
    report = QuantizedLinears()
    for name in names:
        module = model.get_submodule(name)
        found = as_weight_and_bias(module)
        if isinstance(found, str):
            report.skipped[name] = found
            continue
        weight, bias, all_reduce = found
        replacement = Int8Linear(weight, bias, all_reduce, per_tensor)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        report.replaced.append(name)
        report.int8_bytes += replacement.weight.numel() + replacement.weight_scale.numel() * replacement.weight_scale.element_size()
        report.fp16_bytes += replacement.weight.numel() * 2
        del module, weight, bias
    return report


def linear_names(model: nn.Module) -> list[str]:
    """Every linear layer this package can quantize, except the output head (the logits stay in float, as in
    SmoothQuant and LLM.int8(); it is also tied to the input embeddings in many models)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules()
            if name and module is not head and _kind(module) is not None]
