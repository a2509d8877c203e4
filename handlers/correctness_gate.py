"""The start-up correctness gate: an engine with its own kernels (FastGen) must reproduce the Hugging Face
model's next-token logits before it serves.

Greedy token equality says little (on random weights the logits are nearly flat, and on real weights one
flipped near-tie changes the whole continuation), so the gate compares logits, relative to what the serving
dtype costs anyway: the engine's mean |logit - HF fp32 logit| over the probe's last positions, divided by
HF fp16/bf16's own mean deviation from HF fp32 on the same positions. 1.0 means "as close as HF in half
precision".

What the probes must be able to see (each was missed by an earlier probe; shared/FACTS.md, 2026-12-04):
- Position errors (DeepSpeed's fp16-rounded rotary frequencies: 11x at 600 positions). A repeated text
  hides them: its attention pattern is periodic, so a token attended at the wrong position still sees
  similar content. The probes are random token ids from the whole vocabulary (seeded, so a start-up is
  reproducible).
- Steps that need more attention atoms than DeepSpeed has room for (garbage logits for the sequences
  placed last in the step). The probes go through the scheduler's own chunking (`split_prefill_budget`) at
  the server's prefill budget, each alone and then all together in one batch that fills every sequence
  slot the server has: the other slots hold short filler sequences that decode in the same steps, ahead of
  the probes, as running requests do. The first step of that batch is as wide as a serving step gets.

Each probe is prefilled up to its last `TAIL` positions, then teacher-forced one token per step, so both
the prefill and the decode paths are checked.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from handlers.scheduler import split_prefill_budget

logger = logging.getLogger(__name__)

#: the engine may deviate from HF fp32 at most this many times as much as HF in the serving dtype does
TOLERANCE = 2.0
#: probe lengths in tokens (each capped by the context): a short one, and long ones for position errors
PROBE_LENGTHS = (48, 600, 2000)
#: positions at the end of each probe whose logits are compared (teacher-forced one per step)
TAIL = 16
#: tokens of each filler sequence's prompt (fillers only occupy sequence slots; their logits are not compared)
FILLER_PROMPT = 2
#: seed of the probes' and fillers' random token ids
SEED = 20261204

#: `forward(sequences, tokens)`: one ragged step (each sequence continues with its new tokens) returning each
#: sequence's last-token logits [len(sequences), vocab]
Forward = Callable[[list[int], list[list[int]]], Any]


def probe_lengths(max_total_tokens: int) -> list[int]:
    """PROBE_LENGTHS capped by what one sequence may hold (each probe needs more than TAIL tokens)."""
    return sorted({min(n, max_total_tokens) for n in PROBE_LENGTHS if min(n, max_total_tokens) > TAIL})


def probe_tokens(vocab_size: int, length: int, seed: int = SEED) -> list[int]:
    """Random token ids from the whole vocabulary: no period for a position error to hide in."""
    rng = random.Random(seed * 100_003 + length)
    return [rng.randrange(vocab_size) for _ in range(length)]


def teacher_forced_tails(forward: Forward, release: Callable[[int], None], probes: list[list[int]], *,
                         max_sequences: int, max_prefill_tokens: int, vocab_size: int,
                         fillers: bool = False) -> list[Any]:
    """The engine's logits [TAIL, vocab] at each probe's last TAIL positions, the probes run as the rolling
    batch runs requests: sequences 0..len(probes)-1, each step the running sequences' next tokens first, then
    prefill chunks within `max_prefill_tokens` (first come, first served). With `fillers`, the remaining
    sequence slots up to `max_sequences` hold short sequences that were admitted first and decode one token
    in every step. Every sequence is released at the end."""
    import torch

    if len(probes) > max_sequences:
        raise ValueError(f"{len(probes)} probes in one batch, but the engine runs {max_sequences} sequences")
    rng = random.Random(SEED)
    filler_ids = list(range(len(probes), max_sequences)) if fillers else []
    splits = [len(tokens) - TAIL for tokens in probes]
    prefilled = [0] * len(probes)
    forced = [0] * len(probes)  # tail tokens fed so far, once the prefix is in
    rows: list[list[Any]] = [[] for _ in probes]
    try:
        pending = {uid: FILLER_PROMPT for uid in filler_ids}  # filler prompts, prefilled before the probes
        while pending:
            chunks = split_prefill_budget(list(pending.values()), max_prefill_tokens)
            uids = list(pending)[:len(chunks)]
            forward(uids, [[rng.randrange(vocab_size) for _ in range(n)] for n in chunks])
            for uid, n in zip(uids, chunks):
                pending[uid] -= n
                if pending[uid] == 0:
                    del pending[uid]
        while any(len(r) < TAIL for r in rows):
            decoding = [i for i, r in enumerate(rows) if r and len(r) < TAIL]  # prefix in, tail being forced
            prefilling = [i for i in range(len(probes)) if prefilled[i] < splits[i]]
            chunks = split_prefill_budget([splits[i] - prefilled[i] for i in prefilling], max_prefill_tokens)
            prefilling = prefilling[:len(chunks)]
            sequences = filler_ids + decoding + prefilling
            tokens = ([[rng.randrange(vocab_size)] for _ in filler_ids]
                      + [[probes[i][splits[i] + forced[i]]] for i in decoding]
                      + [probes[i][prefilled[i]:prefilled[i] + n] for i, n in zip(prefilling, chunks)])
            logits = forward(sequences, tokens)
            base = len(filler_ids)
            for row, i in enumerate(decoding):
                forced[i] += 1
                rows[i].append(logits[base + row].float().cpu())
            base += len(decoding)
            for row, (i, n) in enumerate(zip(prefilling, chunks)):
                prefilled[i] += n
                if prefilled[i] == splits[i]:  # the prefix's last position predicts the first tail token
                    rows[i].append(logits[base + row].float().cpu())
    finally:
        for uid in list(range(len(probes))) + filler_ids:
            release(uid)
    return [torch.stack(r) for r in rows]


@dataclass(frozen=True)
class ProbeResult:
    positions: int
    batch: int  # sequences in the steps that computed it (1: alone)
    engine_error: float  # mean |engine - HF fp32| over the compared logits
    reference_error: float  # mean |HF serving dtype - HF fp32| over the same logits
    argmax_agreement: float  # share of compared positions whose most likely token is HF fp32's

    @property
    def ratio(self) -> float:
        return self.engine_error / max(self.reference_error, 1e-12)

    @property
    def where(self) -> str:
        return "alone" if self.batch == 1 else f"in a batch of {self.batch}"

    @property
    def key(self) -> str:
        return str(self.positions) if self.batch == 1 else f"{self.positions}@batch{self.batch}"


@dataclass
class GateResult:
    probes: list[ProbeResult] = field(default_factory=list)
    tolerance: float = TOLERANCE

    @property
    def passed(self) -> bool:
        return all(probe.ratio <= self.tolerance for probe in self.probes)

    def describe(self) -> str:
        parts = [f"{p.positions} positions {p.where}: {p.ratio:.2f}x HF's own half-precision deviation "
                 f"(mean |dlogit| {p.engine_error:.4g} vs {p.reference_error:.4g}), argmax agreement "
                 f"{p.argmax_agreement:.0%}" for p in self.probes]
        verdict = "passed" if self.passed else f"FAILED (tolerance {self.tolerance:g}x)"
        return f"correctness gate {verdict}: " + "; ".join(parts)

    def summary(self) -> dict[str, Any]:
        return {"correctness_gate": "passed" if self.passed else "failed",
                "correctness_gate_ratios": {p.key: round(p.ratio, 3) for p in self.probes}}


@dataclass(frozen=True)
class Reference:
    """HF's logits at a probe's last TAIL positions, in fp32 and in the serving dtype (both on the CPU)."""

    tokens: list[int]
    fp32: Any  # [TAIL, vocab]
    half: Any  # [TAIL, vocab]


def hf_references(load_model: Callable[[Any], Any], probes: list[list[int]], dtype: Any, device: Any,
                  prepare_half: Callable[[Any], Any] | None = None) -> list[Reference]:
    """HF's reference logits for each probe: the model from `load_model(torch.float32)` on `device`, then the
    same weights cast to `dtype` and, with `prepare_half`, changed by it as the engine changes them (int8:
    the gate then asks "as close as HF with the same quantization"). Runs before the engine is built, so both
    fit beside nothing else."""
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
        if prepare_half is not None:
            prepare_half(model)
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


def compare(reference: Reference, engine: Any, batch: int) -> ProbeResult:
    engine_error = (engine - reference.fp32).abs().mean().item()
    reference_error = (reference.half - reference.fp32).abs().mean().item()
    agreement = (engine.argmax(-1) == reference.fp32.argmax(-1)).float().mean().item()
    return ProbeResult(len(reference.tokens), batch, engine_error, reference_error, agreement)


def run_gate(references: list[Reference], forward: Forward, release: Callable[[int], None], *, max_sequences: int,
             max_prefill_tokens: int, vocab_size: int, tolerance: float = TOLERANCE) -> GateResult:
    """Compare the engine with each reference: each probe alone, then all probes together in a batch that
    fills the engine's `max_sequences` slots (in groups, when there are more probes than slots)."""
    result = GateResult(tolerance=tolerance)
    schedule = dict(max_sequences=max_sequences, max_prefill_tokens=max_prefill_tokens, vocab_size=vocab_size)
    for reference in references:
        logits, = teacher_forced_tails(forward, release, [reference.tokens], **schedule)
        result.probes.append(compare(reference, logits, 1))
    if max_sequences > 1:
        for first in range(0, len(references), max_sequences):
            group = references[first:first + max_sequences]
            tails = teacher_forced_tails(forward, release, [r.tokens for r in group], fillers=True, **schedule)
            result.probes += [compare(r, logits, max_sequences) for r, logits in zip(group, tails)]
    return result


def checkpoint_references(model_path: str, trust_remote_code: bool, dtype: Any, device: Any, probes: list[list[int]],
                          auto_model: Any, prepare_half: Callable[[Any], Any] | None = None) -> Any:
    """HF references on the GPU when fp32 weights fit in free memory, else on the CPU (slow, but the gate is
    what keeps wrong text from being served), else None with a warning (the gate is skipped)."""
    import torch

    def loader(target: Any) -> Callable[[Any], Any]:
        # straight onto the target device: a 7B model's fp32 weights (27 GB) need not fit in host memory too
        return lambda load_dtype: auto_model.from_pretrained(model_path, dtype=load_dtype, device_map={"": str(target)},
                                                             trust_remote_code=trust_remote_code)

    fp32_bytes = _parameter_count(model_path, trust_remote_code) * 4
    free = torch.cuda.mem_get_info(device)[0]
    if fp32_bytes < 0.8 * free:
        return hf_references(loader(device), probes, dtype, device, prepare_half)
    if fp32_bytes < 0.7 * _host_available_bytes():
        logger.info("correctness gate: fp32 weights (%.1f GiB) do not fit in free GPU memory; the reference runs "
                    "on the CPU", fp32_bytes / 2**30)
        return hf_references(loader("cpu"), probes, dtype, torch.device("cpu"), prepare_half)
    logger.warning("correctness gate skipped: the model's fp32 weights (%.1f GiB) fit neither in free GPU memory "
                   "nor in host memory", fp32_bytes / 2**30)
    return None


def _host_available_bytes() -> int:
    from handlers.host_memory import available_host_memory

    available = available_host_memory()
    return available[0] if available is not None else 0  # unknown: do not count on host memory


def _parameter_count(model_path: str, trust_remote_code: bool) -> int:
    """Parameters of the model, from a meta-device instance (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())
