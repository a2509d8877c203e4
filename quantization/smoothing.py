"""SmoothQuant's smoothing step: per-channel factors from activation and weight ranges, folded into the norm.

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        (Xiao et al., 2022, eq. 4)

X_j is input channel j of the linear layers a norm feeds (calibrated abs-max), W_j column j of their
weights (the max over every linear layer of the group, since all of them see the same activation). The
norm's weight (and bias) is divided by s and every weight column multiplied by s, which leaves the float
model's function unchanged (tests/unit/test_smoothing.py checks it per family). The clamps follow the
authors' reference code (github.com/mit-han-lab/smoothquant, smoothquant/smooth.py).

A gated MLP's up projection can carry the factors for the down projection instead of a norm (see
quantization/families.py); that group is left out under tensor parallelism, where the down projection's
input is sharded. Under tensor parallelism the norms are replicated and the fed linear layers are column-parallel (sharded
along their outputs, whole along their inputs), so each rank folds the same s into its norm copy and its
own weight rows; the weight maximum is taken across ranks (`all_reduce_max`) so every rank computes the
same s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from quantization.families import Family, SmoothGroup
from quantization.int8_linear import input_dim

_MIN = 1e-5


@dataclass(frozen=True)
class BoundGroup:
    """A SmoothGroup of one decoder layer, with its modules."""

    key: str  # "<layer index>.<norm path>", the calibration record's key
    norm: nn.Module  # the norm (or, with source_is_linear, the linear layer) the factors are folded into
    linears: tuple[nn.Module, ...]
    linear_names: tuple[str, ...]  # full module names
    source_is_linear: bool = False


def bind_groups(model: nn.Module, family: Family, config: Mapping[str, Any]) -> list[BoundGroup]:
    """Every decoder layer's norm -> linears groups of `model` (a transformers *ForCausalLM)."""
    layers = model.get_submodule(family.layers)
    groups: list[BoundGroup] = []
    for index, layer in enumerate(layers):
        for group in family.groups(config):
            groups.append(_bind(layer, index, group, f"{family.layers}.{index}"))
    return groups


def _bind(layer: nn.Module, index: int, group: SmoothGroup, prefix: str) -> BoundGroup:
    try:
        norm = layer.get_submodule(group.norm)
        linears = tuple(layer.get_submodule(name) for name in group.linears)
    except AttributeError as error:
        raise ValueError(f"decoder layer {prefix} lacks a module the smoothing map names ({error}); the model's "
                         "module names differ from transformers' for this family") from None
    if getattr(norm, "weight", None) is None:
        raise ValueError(f"{prefix}.{group.norm} ({type(norm).__name__}) has no weight to fold the factors into")
    return BoundGroup(f"{index}.{group.norm}", norm, linears, tuple(f"{prefix}.{name}" for name in group.linears),
                      group.source_is_linear)


def weight_absmax(group: BoundGroup) -> torch.Tensor:
    """max |W[:, j]| over every linear layer of the group (and every tensor-parallel rank): float32 [in]."""
    maxima = [linear.weight.detach().abs().amax(dim=1 - input_dim(linear)).float() for linear in group.linears]
    return all_reduce_max(torch.stack(maxima).amax(dim=0))


def smoothing_factors(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    act = act_absmax.float().clamp(min=_MIN)
    weight = w_absmax.float().clamp(min=_MIN)
    return (act.pow(alpha) / weight.pow(1.0 - alpha)).clamp(min=_MIN)


@torch.no_grad()
def fold(group: BoundGroup, factors: torch.Tensor) -> None:
    """Divide the norm's output channels by `factors` and scale the linear layers' input columns by them."""
    source = group.norm
    if group.source_is_linear:  # a linear layer's output channels: its weight's rows along the output dim
        _scale_along(source.weight, 1 - input_dim(source), 1.0 / factors)
    else:
        _scale_along(source.weight, 0, 1.0 / factors)
    if getattr(source, "bias", None) is not None:
        _scale_along(source.bias, 0, 1.0 / factors)
    for linear in group.linears:
        _scale_along(linear.weight, input_dim(linear), factors)


def _scale_along(tensor: torch.Tensor, dim: int, factors: torch.Tensor) -> None:
    """tensor *= factors along `dim`, computed in float32 and stored back in the tensor's dtype."""
    shape = [1] * tensor.dim()
    shape[dim] = -1
    tensor.copy_((tensor.float() * factors.to(tensor.device).view(shape)).to(tensor.dtype))


def smooth(groups: list[BoundGroup], act_absmax: Mapping[str, torch.Tensor], alpha: float) -> None:
    for group in groups:
        fold(group, smoothing_factors(act_absmax[group.key], weight_absmax(group), alpha))


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    return _all_reduce(tensor, "MAX")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    return _all_reduce(tensor, "SUM")


def _all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """Across tensor-parallel ranks (the default process group, which holds exactly the ranks); a no-op alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    device = tensor.device
    # NCCL reduces only GPU tensors; gloo (CPU ranks) takes them where they are.
    work = (tensor.to("cuda", copy=True) if dist.get_backend() == "nccl" else tensor.clone()).contiguous()
    dist.all_reduce(work, op=getattr(dist.ReduceOp, op))
    return work.to(device)
