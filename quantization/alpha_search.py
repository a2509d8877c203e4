"""Choose SmoothQuant's alpha when `smoothquant_alpha` is unset: a small grid search on calibration data.

For every candidate alpha and every smoothed group, the group's linear layers are run on the calibrated
activation rows both ways, exactly and in W8A8 after smoothing with that alpha (per-token int8
activations, per-channel int8 weights, as `quantization.int8` computes them), and the relative squared error
    ||Q(X / s) Q(W s)^T - X W^T||^2 / ||X W^T||^2
is averaged over the groups. The alpha with the smallest mean error wins. This is the layer-wise criterion
of the automatic alpha tuning in Intel Neural Compressor's SmoothQuant and of AWQ's scale search, applied
with one alpha for the whole model (LMI's smoothquant_alpha is one number). The authors' hand-picked values
(0.5 for OPT/BLOOM, 0.8 for LLaMA, 0.85 for Llama-2/3) all lie on the grid, which is kept short because
each point costs a pass over every group's weights.

It needs no extra forward passes and no copy of the model: only each group's weights (already in memory)
and the few hundred activation rows the calibration kept. Under tensor parallelism each rank holds its own
output rows of every weight, so the squared errors are summed across ranks before the ratio is taken.
"""

from __future__ import annotations

import logging

import torch

from quantization.int8 import quantize_weight, w8a8_linear
from quantization.int8_linear import input_dim
from quantization.smoothing import BoundGroup, all_reduce_sum, smoothing_factors, weight_absmax

logger = logging.getLogger(__name__)

CANDIDATES = (0.4, 0.5, 0.6, 0.7, 0.8, 0.85)


@torch.no_grad()
def search_alpha(groups: list[BoundGroup], act_absmax: dict[str, torch.Tensor], samples: dict[str, torch.Tensor],
                 candidates: tuple[float, ...] = CANDIDATES) -> tuple[float, dict[float, float]]:
    """(best alpha, {alpha: mean relative output error}) over the groups."""
    totals = torch.zeros(len(candidates), dtype=torch.float64)
    for group in groups:
        x = samples[group.key].float()
        weight = torch.cat([(linear.weight.t() if input_dim(linear) == 0 else linear.weight).detach().float().cpu()
                            for linear in group.linears])  # [out of every linear, in]
        exact = x @ weight.t()
        w_max = weight_absmax(group).cpu()
        numerators, denominator = [], exact.pow(2).sum().double()
        for alpha in candidates:
            factors = smoothing_factors(act_absmax[group.key], w_max, alpha)
            # the serving arithmetic itself (int8 matmul through _int_mm where it runs)
            approx = w8a8_linear(x / factors, *quantize_weight(weight * factors))
            numerators.append((approx - exact).pow(2).sum().double())
        reduced = all_reduce_sum(torch.stack(numerators + [denominator]))
        totals += reduced[:-1] / reduced[-1].clamp(min=1e-30)
    errors = {alpha: float(total) / max(1, len(groups)) for alpha, total in zip(candidates, totals)}
    best = min(errors, key=errors.get)
    return best, errors
