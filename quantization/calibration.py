"""SmoothQuant calibration: per-channel activation abs-max at every smoothed group's input, over calibration text.

The model runs forward (no KV cache) over token windows of the calibration text, batch by batch under a
tqdm progress bar; a forward pre-hook on the first linear layer of each group records max |input| per
channel (for a norm group, the norm's output). The hooks also keep a few hundred rows of each group's
input, spread over the batches, for the alpha search (`quantization.alpha_search`), which needs real
activations.

Under tensor parallelism every rank runs the same windows in lockstep (the model's all-reduces need it);
the norms are replicated, so every rank records the same ranges.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from quantization.smoothing import BoundGroup

logger = logging.getLogger(__name__)

WINDOWS = 16  # calibration windows (SmoothQuant's authors used 512 x 512 tokens of the Pile; the ranges settle far sooner,
# and on a 2-core CPU each window of the embedded model costs seconds)
WINDOW_TOKENS = 256
BATCH = 4
SAMPLE_TOKENS = 128  # activation rows kept per group for the alpha search


@dataclass
class Calibration:
    act_absmax: dict[str, torch.Tensor]  # group key -> float32 [in]
    samples: dict[str, torch.Tensor] = field(default_factory=dict)  # group key -> [<= SAMPLE_TOKENS, in]
    tokens: int = 0


@torch.no_grad()
def calibrate(model: Any, groups: list[BoundGroup], windows: torch.Tensor, show_progress: bool = True,
              sample_tokens: int = SAMPLE_TOKENS) -> Calibration:
    from tqdm import tqdm

    result = Calibration({})
    # Keep sample rows spread over every batch, not all from the first one.
    batches = -(-windows.shape[0] // BATCH)
    per_call = max(1, -(-sample_tokens // batches))

    def hook_for(group: BoundGroup):
        def hook(_module, inputs):
            hidden = inputs[0]
            rows = hidden.detach().reshape(-1, hidden.shape[-1]).float()
            current = rows.abs().amax(dim=0)
            previous = result.act_absmax.get(group.key)
            result.act_absmax[group.key] = current if previous is None else torch.maximum(previous, current)
            # (some models, e.g. OPT, hand their linear layers tokens already flattened to [tokens, hidden])
            picks = torch.linspace(0, rows.shape[0] - 1, min(per_call, rows.shape[0]), device=rows.device).long()
            taken = rows[picks].cpu()
            kept = result.samples.get(group.key)
            if kept is None or kept.shape[0] < sample_tokens:
                joined = taken if kept is None else torch.cat([kept, taken])
                result.samples[group.key] = joined[:sample_tokens]
        return hook

    # The first linear layer's input: for a norm group that is the norm's output, for a gated MLP's
    # up -> down group the down projection's input.
    handles = [group.linears[0].register_forward_pre_hook(hook_for(group)) for group in groups]
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, windows.shape[0], BATCH), desc="SmoothQuant calibration", unit="batch",
                          disable=not show_progress):
            batch = windows[start:start + BATCH].to(device)
            model(input_ids=batch, use_cache=False)
            result.tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    result.act_absmax = {key: value.cpu() for key, value in result.act_absmax.items()}
    missing = [group.key for group in groups if group.key not in result.act_absmax]
    if missing:
        raise RuntimeError(f"calibration saw no input to the groups {', '.join(missing[:4])}: the model's forward "
                           "does not call them (its module layout differs from the smoothing map)")
    return result
