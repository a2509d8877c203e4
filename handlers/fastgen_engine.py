"""The FastGen engine: DeepSpeed-FastGen's ragged engine (fused CUDA kernels, blocked KV cache) under our
rolling batch, which decodes and prefills in one ragged pass per step (Dynamic SplitFuse), samples with the
shared sampler on the GPU and admits requests by free KV blocks.

Start-up: the correctness gate's HF references (fp32, then the serving dtype) are computed first, while the
GPU is empty; then DeepSpeed builds the model and a KV cache of what `gpu_memory_utilization` leaves; then
the gate compares. With `quantize`, the linear layers are W8A8 (handlers.fastgen_int8), smoothquant's
smoothed weights load in place of the checkpoint's, and the gate's half-precision reference gets the same
smoothing and W8A8 layers (AutoTP's), so it checks "as close as our int8 on HF". Anything that makes FastGen
unable to serve the model correctly raises `FastGenUnsupported`, and the engine factory falls back to the next
engine the plan allows.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from handlers.engine_choice import EnginePlan
from handlers.fastgen_model import EngineLimits, FastGenUnsupported
from handlers.serving_properties import ServingProperties

logger = logging.getLogger(__name__)

#: the plan's dtypes FastGen's models run (their activation_dtype raises for anything else)
HALF_DTYPES = ("fp16", "bf16")
#: memory kept free beyond (1 - gpu_memory_utilization) of the device, per sequence of the batch and vocabulary
#: entry: the step's logits in fp32 and the sampler's working copies (scores, probabilities, sort indices)
SAMPLER_BYTES_PER_LOGIT = 32
#: and a fixed margin for the CUDA context's growth, cuBLAS workspaces and allocator fragmentation
RESERVE_MARGIN_BYTES = 512 * 2**20


def reserve_bytes(total_bytes: int, gpu_memory_utilization: float, max_sequences: int, vocab_size: int) -> int:
    """What DeepSpeed's KV allocation (memory_config mode "reserve") must leave free: the share of the device
    the server may not use, plus what one step allocates beyond DeepSpeed's own preallocated buffers."""
    return (int(total_bytes * (1.0 - gpu_memory_utilization)) + max_sequences * vocab_size * SAMPLER_BYTES_PER_LOGIT
            + RESERVE_MARGIN_BYTES)


def engine_limits(properties: ServingProperties, max_sequences: int, max_total_tokens: int, total_bytes: int,
                  vocab_size: int) -> EngineLimits:
    """The sizes the server builds DeepSpeed's state manager with, on a device of `total_bytes`."""
    return EngineLimits(max_sequences=max_sequences, max_prefill_tokens=properties.max_rolling_batch_prefill_tokens,
                        max_context=max_total_tokens,
                        reserve_bytes=reserve_bytes(total_bytes, properties.gpu_memory_utilization, max_sequences,
                                                    vocab_size))


def load_fastgen_engine(properties: ServingProperties, plan: EnginePlan, model_path: str,
                        progress: Callable[[str], None], description: str = "") -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from handlers.correctness_gate import checkpoint_references, probe_lengths, probe_tokens
    from handlers.engine_build import LoadedModel, batch_limits, eos_token_ids_from_files, serving_engine, torch_dtype
    from handlers.fastgen_model import preflight

    _require_servable(plan)
    started = time.monotonic()
    dtype = torch_dtype(plan)
    device = torch.device("cuda", torch.cuda.current_device())
    hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=properties.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=properties.trust_remote_code)
    max_sequences, max_total_tokens = batch_limits(properties, plan,
                                                   getattr(hf_config, "max_position_embeddings", None))
    preflight(hf_config, max_total_tokens)  # refusals that need no weights come before the gate's references

    references = None
    if properties.correctness_gate:
        progress("correctness gate: HF reference logits in fp32 and " + plan.dtype)
        prepare = None
        if plan.quantize is not None:
            from handlers.fastgen_int8 import reference_quantizer
            prepare = reference_quantizer(plan.quantize, properties, tokenizer, model_path)
        references = checkpoint_references(model_path, properties.trust_remote_code, dtype, device,
                                 [probe_tokens(hf_config.vocab_size, n) for n in probe_lengths(max_total_tokens)],
                                 AutoModelForCausalLM, prepare)

    built = _build(model_path, hf_config, properties, plan, dtype, device, max_sequences, max_total_tokens, progress,
                   tokenizer)
    gate_summary: dict[str, Any] = {"correctness_gate": "off (correctness_gate=false)"}
    if references is not None:
        progress("correctness gate: FastGen's teacher-forced logits, each probe alone and all in one full batch")
        try:
            gate_summary = _run_gate(references, built.runner, built.limits, hf_config.vocab_size)
        except FastGenUnsupported:
            built.runner.shutdown()
            del built  # the next engine needs this memory
            gc.collect()
            torch.cuda.empty_cache()
            raise

    loaded = LoadedModel(built.runner, tokenizer, built.budget, max_sequences, max_total_tokens,
                         eos_token_ids_from_files(model_path, hf_config, tokenizer), hf_config.vocab_size,
                         architecture=built.architecture, device=str(device), tensor_parallel_degree=1,
                         weights_bytes=built.weights_bytes, details={**built.details, **gate_summary})
    return serving_engine("fastgen", properties, plan, loaded, started, description or model_path)


@dataclass
class _Built:
    """DeepSpeed's engine under our runner, with the KV cache it allocated."""

    runner: Any  # handlers.fastgen_runner.FastGenRunner (it holds DeepSpeed's engine)
    limits: EngineLimits
    budget: Any  # handlers.kv_blocks.KVBudget
    architecture: str
    details: dict[str, Any]  # its summary lines
    weights_bytes: int | None = None  # DeepSpeed's flattened parameters (int8 weights and their scales included)


def _build(model_path: str, hf_config: Any, properties: ServingProperties, plan: EnginePlan, dtype: Any,
           device: Any, max_sequences: int, max_total_tokens: int, progress: Callable[[str], None],
           tokenizer: Any) -> _Built:
    """Build DeepSpeed-FastGen with a KV cache of what gpu_memory_utilization leaves, sized for the batch."""
    import torch

    from handlers.fastgen_model import build_fastgen_engine
    from handlers.fastgen_runner import FastGenRunner

    total = torch.cuda.mem_get_info(device)[1]
    limits = engine_limits(properties, max_sequences, max_total_tokens, total, hf_config.vocab_size)
    progress(f"building DeepSpeed-FastGen for {hf_config.model_type} ({plan.dtype}; DeepSpeed's ops JIT-build "
             "on first use unless the image has them)")
    substitutes, quantization = _quantization(model_path, properties, plan, tokenizer, dtype, device, progress)
    # FastGen reads the dtype from the config it loads (torch_dtype / dtype); the plan's dtype wins.
    engine, bridges, atoms = build_fastgen_engine(model_path, hf_config, limits, dtype=dtype,
                                                  int8_linear=plan.quantize is not None, substitutes=substitutes)
    budget = _kv_budget(engine, dtype, properties.gpu_memory_utilization, total, limits.reserve_bytes)
    progress(f"KV cache: {budget.tokens} tokens in {budget.num_blocks} blocks of {budget.block_size} "
             f"({budget.bytes / 2**30:.2f} GiB)")
    details = {
        "fastgen_bridges": bridges.describe(),
        "attention_atoms": f"{atoms.atoms} of {atoms.q_block} query tokens: the most a step of {max_sequences} "
                           f"sequences with a {limits.max_prefill_tokens}-token prefill budget needs",
        **quantization,
    }
    weights = getattr(engine.model(), "flattened_params", None)
    return _Built(FastGenRunner(engine, device, atoms), limits, budget, type(engine.model()).__name__, details,
                  weights.numel() * weights.element_size() if weights is not None else None)


def _quantization(model_path: str, properties: ServingProperties, plan: EnginePlan, tokenizer: Any, dtype: Any,
                  device: Any, progress: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """(smoothed weights to load instead of the checkpoint's, or None; the summary's quantization lines)."""
    if plan.quantize is None:
        return None, {}
    from quantization.quantizer import SMOOTHQUANT

    lines = {"quantization": f"quantize={plan.quantize}: W8A8 linear layers in FastGen (int8 weights per output "
                             "channel, int8 activations per token; Triton kernels); embeddings and the output head "
                             "stay in " + plan.dtype}
    if plan.quantize != SMOOTHQUANT:
        return None, lines
    from handlers.fastgen_int8 import smoothed_weights

    weights, result = smoothed_weights(model_path, properties, tokenizer, dtype, device, progress)
    lines["smoothquant"] = (f"alpha={result.alpha:g} ({result.alpha_source}); {result.calibration}; "
                            f"{len(weights)} tensors smoothed")
    return weights, lines


def _require_servable(plan: EnginePlan) -> None:
    """What FastGen needs before anything loads: its kernels, one GPU, a half dtype."""
    from handlers.fastgen_readiness import fastgen_ops_unavailable
    from handlers.fastgen_model import KERNELS_MODULE

    if importlib.util.find_spec(KERNELS_MODULE) is None:
        raise FastGenUnsupported("the deepspeed-kernels package is not installed (FastGen's blocked flash attention "
                                 "lives in it): pip install 'lmi-deepspeed[gpu]' or deepspeed-kernels")
    ops = fastgen_ops_unavailable()
    if ops is not None:
        raise FastGenUnsupported(ops)
    if plan.tensor_parallel_degree != 1:
        raise FastGenUnsupported("FastGen is wired for tensor_parallel_degree=1 only in this build")
    if plan.dtype not in HALF_DTYPES:
        raise FastGenUnsupported(f"FastGen runs fp16 or bf16, not {plan.dtype}")
    if plan.quantize is not None and importlib.util.find_spec("triton") is None:
        raise FastGenUnsupported(f"quantize={plan.quantize} on FastGen runs Triton kernels, and Triton is not "
                                 "installed (it comes with CUDA builds of torch)")


def _kv_budget(engine: Any, dtype: Any, gpu_memory_utilization: float, total_bytes: int, reserved: int) -> Any:
    """The KV cache DeepSpeed allocated (every block is free before the first request), in the budget terms
    the rolling batch admits by."""
    from handlers.kv_blocks import KVBudget

    kv_config = engine.model().kv_cache_config()[0]
    layers, heads, head_size = kv_config.cache_shape[0], kv_config.cache_shape[1], kv_config.cache_shape[2]
    bytes_per_token = layers * 2 * heads * head_size * dtype.itemsize  # K and V
    return KVBudget(kv_config.block_size, int(engine.free_blocks[0]), bytes_per_token,
                    f"gpu_memory_utilization={gpu_memory_utilization} of {total_bytes / 2**30:.1f} GiB; "
                    f"{reserved / 2**30:.2f} GiB kept free (DeepSpeed memory_config reserve)")


def _run_gate(references: Any, runner: Any, limits: EngineLimits, vocab_size: int) -> dict[str, Any]:
    """The correctness gate on the built engine, before any request (every sequence slot is free): its
    summary, or FastGenUnsupported saying what deviated."""
    from handlers.correctness_gate import run_gate

    result = run_gate(references, runner.ragged_forward, runner.release, max_sequences=limits.max_sequences,
                      max_prefill_tokens=limits.max_prefill_tokens, vocab_size=vocab_size)
    logger.info("%s", result.describe())
    if not result.passed:
        raise FastGenUnsupported(result.describe())
    return {**result.summary(), "correctness_gate_detail": result.describe()}
