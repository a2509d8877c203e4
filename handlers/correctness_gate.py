"""The start-up correctness gate: an engine with its own kernels (FastGen) must reproduce the Hugging Face
model's next-token logits before it serves.

Greedy token equality says little (on random weights the logits are nearly flat, and on real weights one
flipped near-tie changes the whole continuation), so the gate compares logits, relative to what the serving
dtype costs anyway: the engine's mean |logit - HF fp32 logit| over the probe's last positions, divided by
HF fp16/bf16's own mean deviation from HF fp32 on the same positions. 1.0 means "as close as HF in half
precision"; measured on an H200, FastGen as shipped reached 11x at 600 positions and 34x at 2,000 (its rotary
rounding, bridged in handlers.fastgen_model) and 1.1x with the bridges (shared/FACTS.md).

Each probe is prefilled up to its last `TAIL` positions in one pass, then teacher-forced one token per pass,
so both the prefill and the decode paths are checked, at a short and a long position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

logger = logging.getLogger(__name__)

#: the engine may deviate from HF fp32 at most this many times as much as HF in the serving dtype does
TOLERANCE = 2.0
#: probe lengths in tokens: a short one, and one long enough for position-dependent errors to show
PROBE_LENGTHS = (48, 600)
#: positions at the end of each probe whose logits are compared (teacher-forced one per pass)
TAIL = 16
PROBE_TEXT = ("The history of Paris spans more than two thousand years. It began as a settlement of the "
              "Parisii, a Celtic tribe, on an island in the Seine, and grew under Roman rule into the town of "
              "Lutetia. Kings, revolutions and world fairs shaped its streets, bridges, churches and museums. ")


@dataclass(frozen=True)
class ProbeResult:
    positions: int
    engine_error: float  # mean |engine - HF fp32| over the compared logits
    reference_error: float  # mean |HF serving dtype - HF fp32| over the same logits
    argmax_agreement: float  # share of compared positions whose most likely token is HF fp32's

    @property
    def ratio(self) -> float:
        return self.engine_error / max(self.reference_error, 1e-12)


@dataclass
class GateResult:
    probes: list[ProbeResult] = field(default_factory=list)
    tolerance: float = TOLERANCE

    @property
    def passed(self) -> bool:
        return all(probe.ratio <= self.tolerance for probe in self.probes)

    def describe(self) -> str:
        parts = [f"{p.positions} positions: {p.ratio:.2f}x HF's own half-precision deviation "
                 f"(mean |dlogit| {p.engine_error:.4g} vs {p.reference_error:.4g}), argmax agreement "
                 f"{p.argmax_agreement:.0%}" for p in self.probes]
        verdict = "passed" if self.passed else f"FAILED (tolerance {self.tolerance:g}x)"
        return f"correctness gate {verdict}: " + "; ".join(parts)

    def summary(self) -> dict[str, Any]:
        return {"correctness_gate": "passed" if self.passed else "failed",
                "correctness_gate_ratios": {p.positions: round(p.ratio, 3) for p in self.probes}}


def probe_tokens(tokenizer: Any, length: int) -> list[int]:
    ids = tokenizer(PROBE_TEXT * (1 + length // 30), add_special_tokens=False)["input_ids"]
    if len(ids) < length:
        raise ValueError(f"the probe text gives {len(ids)} tokens, fewer than {length}")
    return list(ids[:length])


@dataclass(frozen=True)
class Reference:
    """HF's logits at a probe's last TAIL positions, in fp32 and in the serving dtype (both on the CPU)."""

    tokens: list[int]
    fp32: Any  # [TAIL, vocab]
    half: Any  # [TAIL, vocab]


def hf_references(load_model: Callable[[Any], Any], probes: list[list[int]], dtype: Any, device: Any) -> list[Reference]:
    """HF's reference logits for each probe: the model from `load_model(torch.float32)` on `device`, then the
    same weights cast to `dtype`. Runs before the engine is built, so both fit beside nothing else."""
    import torch

    model = load_model(torch.float32).to(device).eval()
    try:
        fp32 = [_tail_logits(model, tokens, device) for tokens in probes]
        # Rotary inverse frequencies stay fp32, as HF computes them (its forward upcasts them anyway):
        # `.to(dtype)` would round them too and so hide exactly the error the gate is for.
        frequencies = {name: buffer.clone() for name, buffer in model.named_buffers() if name.endswith("inv_freq")}
        model.to(dtype)
        for name, buffer in frequencies.items():
            owner, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner), attribute, buffer)
        half = [_tail_logits(model, tokens, device) for tokens in probes]
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return [Reference(tokens, a, b) for tokens, a, b in zip(probes, fp32, half)]


def _tail_logits(model: Any, tokens: list[int], device: Any) -> Any:
    import torch

    with torch.inference_mode():
        ids = torch.tensor([tokens], device=device)
        logits = model(input_ids=ids, logits_to_keep=TAIL + 1).logits[0].float()
    # positions len-TAIL-1 .. len-2: each predicts a probe token, as the engine's teacher-forced passes do
    return logits[:TAIL].cpu()


def engine_tail_logits(forward: Callable[[list[int]], Any], tokens: list[int]) -> Any:
    """The engine's logits at the same positions: `forward(new_tokens)` continues one sequence and returns
    its last-token logits [vocab]. The prefix goes in one pass, then one probe token per pass."""
    import torch

    split = len(tokens) - TAIL
    rows = [forward(tokens[:split]).float().cpu()]
    for token in tokens[split:-1]:
        rows.append(forward([token]).float().cpu())
    return torch.stack(rows)


def compare(reference: Reference, engine: Any) -> ProbeResult:
    engine_error = (engine - reference.fp32).abs().mean().item()
    reference_error = (reference.half - reference.fp32).abs().mean().item()
    agreement = (engine.argmax(-1) == reference.fp32.argmax(-1)).float().mean().item()
    return ProbeResult(len(reference.tokens), engine_error, reference_error, agreement)


def run_gate(references: list[Reference], forward_for: Callable[[int], Callable[[list[int]], Any]],
             done: Callable[[int], None], tolerance: float = TOLERANCE) -> GateResult:
    """Compare the engine with each reference; `forward_for(i)` continues a fresh sequence for probe i and
    `done(i)` releases it."""
    result = GateResult(tolerance=tolerance)
    for index, reference in enumerate(references):
        try:
            logits = engine_tail_logits(forward_for(index), reference.tokens)
        finally:
            done(index)
        result.probes.append(compare(reference, logits))
    return result
