"""Which inference engine can serve which model architecture, and why — kept as data, not as code.

`handlers.engine_plan` reads these tables to pick an engine; `plan` prints the reasons verbatim, so every
verdict says what it rests on: the installed DeepSpeed's source (0.19.8: `deepspeed/inference/v2/
engine_factory.py`, `module_inject/replace_policy.py`) or a measurement from shared/FACTS.md (H200,
transformers 5.17, 2026-11-22). A row that was not measured says so. To change the policy, change a row
here; the planner has no per-architecture branches.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from quantization.families import family_for, supported_model_types

FASTGEN = "fastgen"
KERNEL_INJECTION = "kernel_injection"
AUTOTP = "autotp"

CPU = "cpu"
CUDA = "cuda"


@dataclass(frozen=True)
class Verdict:
    supported: bool
    reason: str


def works(reason: str) -> Verdict:
    return Verdict(True, reason)


def fails(reason: str) -> Verdict:
    return Verdict(False, reason)


@dataclass(frozen=True)
class ConfigCondition:
    """An engine serves an architecture only when the model config has `key` == `expected`."""

    engine: str
    key: str
    expected: Any
    default: Any  # the value HF assumes when config.json leaves the key out
    reason: str


@dataclass(frozen=True)
class EnginePolicy:
    """One engine's column of the policy: what holds for it whatever the row."""

    preference_reason: str  # why it ranks where it does; quoted when a lower-ranked engine loses to a higher one
    unknown: Verdict  # a model_type not in the table
    quantization: Mapping[str, Verdict]  # quantize method -> whether this engine applies it, and why
    unlisted: Verdict | None = None  # a row that names no verdict for this engine (None: as `unknown`)
    caveats: tuple[str, ...] = ()  # shown as plan notes when this engine is chosen

    def quantization_verdict(self, method: str) -> Verdict:
        return self.quantization.get(method) or fails(f"this engine has no {method} path")


@dataclass(frozen=True)
class ArchitecturePolicy:
    model_type: str
    engines: Mapping[str, Verdict]  # engine name -> verdict, for the engines measured or read for this row
    smoothquant: Verdict
    conditions: tuple[ConfigCondition, ...] = ()
    known: bool = True  # False for the fallback policy of a model_type not in the table
    #: engines measured faster for this architecture than the registry's order says, fastest first (the planner
    #: ranks them first; their verdicts' reasons hold the measurements)
    prefer: tuple[str, ...] = ()

    def verdict(self, engine: str, column: EnginePolicy) -> Verdict:
        """This row's verdict for `engine`, or its column's default when the row names none."""
        named = self.engines.get(engine)
        if named is not None:
            return named
        return column.unlisted or column.unknown if self.known else column.unknown


# ---- reasons shared by several rows ------------------------------------------------------------------
def _fastgen_impl(directory: str) -> Verdict:
    return works(f"DeepSpeed 0.19.8 has an inference-v2 implementation (model_implementations/{directory}, "
                 "selected by engine_factory.build_hf_engine)")


_FASTGEN_NONE = fails("DeepSpeed 0.19.8 has no inference-v2 implementation for it "
                      "(engine_factory.build_hf_engine raises 'Unsupported model type')")
_KI_NO_POLICY = fails("DeepSpeed 0.19.8 has no kernel-injection policy for it (module_inject/replace_policy.py)")
# transformers 5's own forwards break on the injected blocks (FACTS 2026-11-22: a cache object reaches GPT-2's
# mask, tuples pass between OPT's and Llama's layers, GPT-NeoX's policy reads attributes the new classes lack, and
# DeepSpeed refuses BLOOM above transformers 4.43.4); the project drives the blocks itself instead.
_KI_DRIVEN = ("the project drives DeepSpeed 0.19.8's injected blocks itself (handlers/kernel_injection_model.py: "
              "embeddings, the blocks with a [rows, tokens] mask, final norm, LM head), since transformers 5's own "
              "forward no longer can")
_KI_H200 = "H200, 2026-12-05, RESULTS.md section 12"


def _ki(logits: str, speed: str | None = None) -> Verdict:
    """Kernel injection served by the project's driver: `logits` its deviation from HF fp32 relative to HF fp16's
    (tiny random config, init 0.1, left-padded batch of 300/17/2-token prompts + 12 steps), `speed` its output
    tok/s against AutoTP's in the same process (real checkpoint's shape, random weights, 128 prompt / 64 new)."""
    measured = f"logits {logits} HF fp16's own deviation from HF fp32 on its CUDA kernels"
    if speed:
        measured += f"; {speed}"
    return works(f"{_KI_DRIVEN}; {measured} ({_KI_H200})")


def _ki_wrong(ratio: str) -> Verdict:
    return fails(f"{_KI_DRIVEN}, but its logits deviate {ratio} as much as HF fp16's from HF fp32 (argmax agreement "
                 f"19%) on the CUDA kernels ({_KI_H200}); cause not found yet")
_AUTOTP_ANY = works("AutoTP shards the linear layers of any Hugging Face model and runs its own forward "
                    "(measured only on llama; not measured for this architecture)")
_AUTOTP_LLAMA = works("AutoTP runs the HF model's own forward (measured on CPU, transformers 5.23: tp 1 identical "
                      "to HF, tp 2 logits within 5e-7)")

# SmoothQuant folds its factors into the norm before each smoothed linear layer; the norm -> linear pairs
# per family are data in quantization/families.py (no torch import), and the verdicts follow from it.
def _smoothquant_verdict(model_type: str) -> Verdict:
    family = family_for(model_type)
    if family is None:
        return fails("no norm -> linear map for SmoothQuant's smoothing (quantization/families.py maps "
                     + ", ".join(supported_model_types()) + "); use quantize=dynamic_int8")
    return works(f"the {family.name} family's norm -> linear pairs are mapped (quantization/families.py)")


def _row(model_type: str, verdicts: Mapping[str, Verdict],
         conditions: tuple[ConfigCondition, ...] = (), prefer: tuple[str, ...] = ()) -> ArchitecturePolicy:
    return ArchitecturePolicy(model_type, MappingProxyType(dict(verdicts)), _smoothquant_verdict(model_type),
                              conditions, prefer=prefer)


_ROWS: tuple[ArchitecturePolicy, ...] = (
    # ---- FastGen architectures (the model_types engine_factory.build_hf_engine accepts) ------------------
    _row("llama", {
        FASTGEN: works("DeepSpeed 0.19.8 has an inference-v2 implementation (model_implementations/llama_v2); "
                       "FastGen's throughput was measured on a 7B llama"),
        KERNEL_INJECTION: _ki_wrong("42x"),
        AUTOTP: _AUTOTP_LLAMA}),
    _row("mistral", {FASTGEN: _fastgen_impl("mistral"), KERNEL_INJECTION: _KI_NO_POLICY}),
    _row("mixtral", {FASTGEN: _fastgen_impl("mixtral"), KERNEL_INJECTION: _KI_NO_POLICY}),
    _row("opt", {FASTGEN: _fastgen_impl("opt"),
                 KERNEL_INJECTION: _ki("1.14x", "2.14x / 2.10x AutoTP's output tok/s at 1 / 32 clients (OPT-6.7B); "
                                       "against FastGen not measured")},
         conditions=(ConfigCondition(FASTGEN, "do_layer_norm_before", True, True,
                                     "FastGen refuses OPT with do_layer_norm_before=false (OPT-350m)"),)),
    _row("falcon", {FASTGEN: _fastgen_impl("falcon"), KERNEL_INJECTION: _KI_NO_POLICY}),
    _row("phi", {FASTGEN: _fastgen_impl("phi"), KERNEL_INJECTION: _KI_NO_POLICY}),
    _row("phi3", {FASTGEN: _fastgen_impl("phi3"), KERNEL_INJECTION: _KI_NO_POLICY}),
    _row("qwen", {FASTGEN: _fastgen_impl("qwen"), KERNEL_INJECTION: _KI_NO_POLICY}),
    _row("qwen2", {FASTGEN: _fastgen_impl("qwen_v2"), KERNEL_INJECTION: _KI_NO_POLICY}),
    _row("qwen2_moe", {FASTGEN: _fastgen_impl("qwen_v2_moe"), KERNEL_INJECTION: _KI_NO_POLICY}),
    _row("exaone4", {FASTGEN: _fastgen_impl("exaone4"), KERNEL_INJECTION: _KI_NO_POLICY}),
    _row("exaone4_5", {FASTGEN: _fastgen_impl("exaone4_5"), KERNEL_INJECTION: _KI_NO_POLICY}),
    # ---- kernel-injection architectures (policies in module_inject/replace_policy.py) -------------------
    _row("gptj", {FASTGEN: _FASTGEN_NONE,
                  KERNEL_INJECTION: _ki("0.95x", "3.33x / 5.47x AutoTP's output tok/s at 1 / 32 clients (GPT-J-6B)")},
         prefer=(KERNEL_INJECTION,)),
    _row("gpt_neo", {FASTGEN: _FASTGEN_NONE, KERNEL_INJECTION: _ki_wrong("48x")}),
    _row("gpt2", {FASTGEN: _FASTGEN_NONE,
                  KERNEL_INJECTION: _ki("1.05x", "2.35x / 2.00x AutoTP's output tok/s at 1 / 32 clients (GPT-2 XL)")},
         prefer=(KERNEL_INJECTION,)),
    _row("gpt_neox", {FASTGEN: _FASTGEN_NONE,
                      KERNEL_INJECTION: _ki("0.96x", "1.94x / 2.12x AutoTP's output tok/s at 1 / 32 clients "
                                            "(Pythia-6.9B)")},
         prefer=(KERNEL_INJECTION,)),
    _row("bloom", {
        FASTGEN: _FASTGEN_NONE,
        KERNEL_INJECTION: _ki("0.43x", "2,147-2,259 output tok/s at 32 clients, 70-72 at 1 (BLOOM-7B1; AutoTP "
                              "cannot run it)"),
        AUTOTP: fails("transformers 5 has no SDPA attention for BLOOM (from_pretrained(attn_implementation='sdpa') "
                      "raises, measured with 5.24), and the AutoTP engine's paged KV cache passes a boolean 4D "
                      "attention mask that only SDPA takes")}),
)

ARCHITECTURES: Mapping[str, ArchitecturePolicy] = MappingProxyType({row.model_type: row for row in _ROWS})

# Architectures AutoTP cannot run at tensor_parallel_degree > 1, and why. Measured on CPU with tiny random
# configs, DeepSpeed 0.19.8 and transformers 5.24 (tests/integration/test_tp_loading.py keeps checking that
# they still fail sharded; Phi-3, GPT-NeoX, Falcon, Qwen2 and Mistral match degree 1 there).
TENSOR_PARALLEL_REFUSED: Mapping[str, str] = MappingProxyType({
    "gpt2": "DeepSpeed 0.19.8's AutoTP refuses GPT-2 by name (module_inject/auto_tp.py AutoTP.supported: "
            "'AutoTP not supported for model. Please use kernel injection since container policy for model exists')",
    "bloom": "DeepSpeed 0.19.8 shards BLOOM's ALiBi biases by patching transformer.build_alibi_tensor, which "
             "transformers 5 no longer has, so each rank adds the biases of all heads to its share of them "
             "(measured: the forward fails with a shape mismatch); BLOOM also has no SDPA attention in transformers",
})

def policy_for(model_type: str | None) -> ArchitecturePolicy:
    """The row for `model_type` (case-insensitive), or, for an unknown one, a row that names no verdict: each
    engine's column then says (`EnginePolicy.unknown`; AutoTP serves it)."""
    key = (model_type or "").strip().lower()
    row = ARCHITECTURES.get(key)
    if row is not None:
        return row
    return ArchitecturePolicy(key or "unknown", MappingProxyType({}), _smoothquant_verdict(key), (), known=False)


# ---- quantization ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizationSupport:
    method: str
    devices: frozenset[str]
    device_reason: str
    per_architecture: bool  # whether ArchitecturePolicy.smoothquant must also allow it
    dtype: str | None = None  # the activation dtype it forces when dtype=auto


_INT8_ENGINES = "quantize runs on fastgen and autotp"
_W8A8_IN_FASTGEN = ("DeepSpeed-FastGen 0.19.8 has no int8 path (its only quantization_mode is wf6af16, FP6 weights); "
                    "ours registers a W8A8 linear layer with its linear registry (handlers/fastgen_int8.py: int8 "
                    "weights per output channel, int8 activations per token, the scales applied inside a Triton "
                    "int8 matmul, ~50% of the fp16 weight bytes), checked at start-up by the correctness gate "
                    "against HF with the same quantization; on an H200 its kernels matched a float64 W8A8 product "
                    "and a FastGen engine with it passed the gate against HF int8 (tests/gpu/test_gpu_int8.py), "
                    "its int8 matmul took 0.57-0.73x the fp16 layer's device time at one row, but each layer "
                    "call cost the host 70-130 us against fp16's 13-24 us (RESULTS.md section 7); serving speed "
                    "against fp16 FastGen is not measured yet")
_NO_INT8_IN_KERNEL_INJECTION = fails("public DeepSpeed 0.19.8 refuses init_inference(dtype=torch.int8) and has no "
                                     "smoothing step (LMI's int8 keys existed only in AWS's DeepSpeed build), and "
                                     "our int8 layers cannot go inside its fused kernels; " + _INT8_ENGINES)
_W8A8_ON_AUTOTP = ("our quantization package's Int8Linear replaces the HF linear layers (each rank quantizes its own "
                   "shard): int8 weights per channel, activations per token at run time, int8 x int8 -> int32 "
                   "through torch._int_mm; weights take ~50% of their fp16 bytes (measured on CPU: a whole W8A8 call "
                   "2.5-3.8x faster than the fp32 matmul at 32-512 rows, but 0.2-0.7x at one row, i.e. decoding one "
                   "sequence; on GPU _int_mm is 1.0-1.5x the fp16 matmul before 20-200 us of eager activation "
                   "quantization, so expect memory savings more than speed)")

QUANTIZATION: Mapping[str, QuantizationSupport] = MappingProxyType({
    "smoothquant": QuantizationSupport(
        method="smoothquant",
        devices=frozenset({CPU, CUDA}),
        device_reason="",
        per_architecture=True,
        dtype="fp16",
    ),
    "dynamic_int8": QuantizationSupport(
        method="dynamic_int8",
        devices=frozenset({CPU, CUDA}),
        device_reason="",
        per_architecture=False,
    ),
})


# ---- each engine's column (handlers.engine_registry gives it to the engine's entry) ---------------------
FASTGEN_POLICY = EnginePolicy(
    preference_reason="FastGen is the fastest engine measured on GPU: this server on FastGen streamed 150 / 2,588 / "
                      "3,436 output tok/s at 1 / 32 / 64 clients (7B-shaped Llama, fp16, one H200, 128 prompt / 128 "
                      "new tokens; RESULTS.md section 10), where its AutoTP engine measured 19 / 413 at 1 / 32 clients "
                      "(RESULTS.md section 2); DeepSpeed's bare put() loop, without this server, reached 186 at batch "
                      "1 and 8,063 at batch 256 (shared/FACTS.md, 2026-11-22)",
    unknown=fails("not in the FastGen architecture list (DeepSpeed 0.19.8 inference v2 implements "
                  + ", ".join(row.model_type for row in _ROWS if row.engines[FASTGEN].supported) + ")"),
    quantization=MappingProxyType({
        "smoothquant": works("smoothing factors folded into the norms after calibration on the HF model, the "
                             "smoothed weights loaded into FastGen in place of the checkpoint's; " + _W8A8_IN_FASTGEN),
        "dynamic_int8": works(_W8A8_IN_FASTGEN + "; no smoothing"),
    }),
    caveats=(
        "DeepSpeed 0.19.8's FastGen rounds rotary frequencies to fp16 (logits 11x HF fp16's deviation at 600 "
        "positions, 34x at 2,000, measured); this build feeds it HF's fp32 frequencies through its trained-rotary "
        "kernel (1.1x at every length in the same measurement) and the model's own norm eps",
    ),
)

KERNEL_INJECTION_POLICY = EnginePolicy(
    preference_reason="kernel injection runs DeepSpeed's fused CUDA blocks but batches dynamically (one batch at a "
                      "time, its rows advancing together)",
    unknown=fails("the project's kernel-injection driver is wired for gpt2, gptj, gpt_neo, gpt_neox, opt, bloom and "
                  "llama (handlers/kernel_injection_model.py)"),
    quantization=MappingProxyType({"smoothquant": _NO_INT8_IN_KERNEL_INJECTION,
                                   "dynamic_int8": _NO_INT8_IN_KERNEL_INJECTION}),
    caveats=("kernel injection batches dynamically: requests that arrive within max_batch_delay form one batch "
             "(max_rolling_batch_size under rolling_batch=auto, batch_size under disable) whose rows run until the "
             "last finishes; prompt log-probabilities are refused",),
)

# A model_type not in the table: AutoTP needs nothing architecture-specific, so it is served rather than refused.
AUTOTP_POLICY = EnginePolicy(
    preference_reason="AutoTP runs the HF layers themselves: it works for any architecture and on CPU, but is the "
                      "slowest on GPU (HF paths spend ~65-90 ms of host time per step: shared/FACTS.md, H200, "
                      "2026-11-22)",
    unknown=works("AutoTP shards the linear layers of any Hugging Face model and runs its own forward "
                  "(this architecture is not in the policy table and was not measured)"),
    unlisted=_AUTOTP_ANY,
    quantization=MappingProxyType({
        "smoothquant": works("smoothing factors folded into the norms (and gated MLPs' up projections) after "
                             "calibration, then " + _W8A8_ON_AUTOTP),
        "dynamic_int8": works(_W8A8_ON_AUTOTP + "; no smoothing"),
    }),
)
