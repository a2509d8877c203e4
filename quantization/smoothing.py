"""SmoothQuant's smoothing step: per-channel factors from activation and weight ranges, folded into the norm.

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        (Xiao et al., 2022, eq. 4)

X_j is input channel j of the linear layers a norm feeds (calibrated abs-max), W_j column j of their
weights (the max over every linear layer of the group, since all of them see the same activation). The
norm's weight (and bias) is divided by s and every weight column multiplied by s, which leaves the float
model's function unchanged (tests/unit/test_smoothing.py checks it per family). The clamps follow the
authors' reference code (github.com/mit-han-lab/smoothquant, smoothquant/smooth.py).

Under tensor parallelism the norms are replicated and the fed linear layers are column-parallel (sharded
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
    norm: nn.Module
    linears: tuple[nn.Module, ...]
    linear_names: tuple[str, ...]  # full module names


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
    return BoundGroup(f"{index}.{group.norm}", norm, linears, tuple(f"{prefix}.{name}" for name in group.linears))


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
    norm = group.norm
    norm.weight.copy_((norm.weight.float() / factors.to(norm.weight.device)).to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.float() / factors.to(norm.bias.device)).to(norm.bias.dtype))
    for linear in group.linears:
        dim = input_dim(linear)
        shape = [1, 1]
        shape[dim] = -1
        weight = linear.weight
        weight.copy_((weight.float() * factors.to(weight.device).view(shape)).to(weight.dtype))


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
