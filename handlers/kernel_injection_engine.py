"""The kernel-injection engine: a Hugging Face checkpoint with DeepSpeed's fused CUDA blocks injected
(`handlers.kernel_injection_model`), run one dynamic batch at a time (`handlers.kernel_injection_runner`) by the
shared rolling-batch engine: scheduler, sampler and output processor are the other engines' own.

Start-up: the correctness gate's HF references (fp32, then the serving dtype) first, while the GPU holds nothing
else; then the weights, the injection, a full-batch warm-up that sizes DeepSpeed's K/V workspace
(batch_size rows x max_tokens positions), and the gate (random token ids, each probe alone and all in one full
batch, left-padded as requests are). Any refusal (`KernelInjectionUnsupported`) falls back to the next engine.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from handlers.engine_choice import EnginePlan
from handlers.kernel_injection_model import KernelInjectionUnsupported, architecture_for
from handlers.serving_properties import ServingProperties

logger = logging.getLogger(__name__)

#: the block allocator's block size (kernel injection's K/V is not paged; the allocator only counts rows x tokens)
BLOCK_SIZE = 16


def load_kernel_injection_engine(properties: ServingProperties, plan: EnginePlan, model_path: str,
                                 progress: Callable[[str], None], description: str = "") -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from handlers.correctness_gate import checkpoint_references, probe_lengths, probe_tokens
    from handlers.engine_build import (
        LoadedModel,
        batch_limits,
        eos_token_ids_from_files,
        serving_engine,
        torch_dtype,
    )

    started = time.monotonic()
    dtype = torch_dtype(plan)
    device = torch.device("cuda", torch.cuda.current_device())
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=properties.trust_remote_code)
    architecture_for(config)  # a refusal that needs no weights
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=properties.trust_remote_code)
    rows, max_total_tokens = batch_limits(properties, plan, getattr(config, "max_position_embeddings", None))
    references = None
    if properties.correctness_gate:
        progress("correctness gate: HF reference logits in fp32 and " + plan.dtype)
        references = checkpoint_references(model_path, properties.trust_remote_code, dtype, device,
                                           [probe_tokens(config.vocab_size, n) for n in probe_lengths(max_total_tokens)],
                                           AutoModelForCausalLM)
    progress(f"loading weights from {model_path} ({plan.dtype}) and injecting DeepSpeed's kernels")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map={"": str(device)},
                                                 trust_remote_code=properties.trust_remote_code).eval()
    built = build(model, rows, max_total_tokens, dtype, progress)
    gate_summary: dict[str, Any] = {"correctness_gate": "off (correctness_gate=false)"}
    if references is not None:
        progress("correctness gate: the injected kernels' teacher-forced logits, each probe alone and all in one "
                 "full batch")
        try:
            gate_summary = run_gate(references, built.runner, config.vocab_size)
        except KernelInjectionUnsupported:
            del built, model  # the next engine needs this memory
            gc.collect()
            torch.cuda.empty_cache()
            raise
    loaded = LoadedModel(built.runner, tokenizer, built.budget, rows, max_total_tokens,
                         eos_token_ids_from_files(model_path, config, tokenizer), config.vocab_size,
                         architecture=type(model).__name__, device=str(device), tensor_parallel_degree=1,
                         weights_bytes=built.weights_bytes, details={**built.details, **gate_summary},
                         aligned_tokens=max_total_tokens)
    return serving_engine("kernel_injection", properties, plan, loaded, started, description or model_path)


@dataclass
class Built:
    runner: Any  # handlers.kernel_injection_runner.KernelInjectionRunner
    budget: Any  # handlers.kv_blocks.KVBudget
    weights_bytes: int
    details: dict[str, Any]


def build(model: Any, rows: int, max_total_tokens: int, dtype: Any, progress: Callable[[str], None]) -> Built:
    """Inject DeepSpeed's kernels into `model` (on the GPU, in `dtype`) and size the workspace for `rows` rows of
    `max_total_tokens` tokens with a full-batch warm-up. Also what the engine benchmark builds from a model made in
    memory."""
    from handlers.kernel_injection_model import inject
    from handlers.kernel_injection_runner import KernelInjectionRunner
    from handlers.kv_blocks import KVBudget

    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    positions = max_total_tokens + 1  # a one-token prompt is padded to two (see the runner)
    driver = inject(model, dtype, max_tokens=positions)
    runner = KernelInjectionRunner(driver, rows, positions)
    progress(f"sizing DeepSpeed's K/V workspace: {rows} rows x {positions} positions (batch_size x max_tokens)")
    try:
        runner.warm_up()
    except RuntimeError as error:
        if "Workspace can't be allocated" in str(error) or "not enough memory" in str(error):
            raise KernelInjectionUnsupported(
                f"DeepSpeed's K/V workspace for batch_size={rows} x max_tokens={max_total_tokens} does not fit in "
                f"free GPU memory ({error}); lower batch_size or max_tokens") from error
        raise
    config = model.config
    layers = len(driver.layers)
    bytes_per_token = 2 * layers * config.hidden_size * torch_element_size(dtype)
    budget = KVBudget(BLOCK_SIZE, rows * -(-positions // BLOCK_SIZE), bytes_per_token,
                      f"DeepSpeed's workspace: batch_size={rows} rows x {positions} positions")
    details = {"kernel_injection": f"{layers} {type(driver.layers[0]).__name__} blocks; workspace {rows} rows x "
                                   f"{positions} positions"}
    return Built(runner, budget, weights_bytes, details)


def torch_element_size(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


# ---- the correctness gate -----------------------------------------------------------------------------------------
def run_gate(references: list[Any], runner: Any, vocab_size: int) -> dict[str, Any]:
    """The gate on the built engine before any request: each probe alone, then all probes in one batch that
    fills every row (short random fillers in the other rows). Raises KernelInjectionUnsupported on failure."""
    from handlers.correctness_gate import GateResult, compare

    result = GateResult()
    for reference in references:
        logits, = teacher_forced_tails(runner, [reference.tokens], vocab_size)
        result.probes.append(compare(reference, logits, 1))
    if runner.max_rows > 1:
        for first in range(0, len(references), runner.max_rows):
            group = references[first:first + runner.max_rows]
            tails = teacher_forced_tails(runner, [r.tokens for r in group], vocab_size, fill=True)
            result.probes += [compare(r, logits, runner.max_rows) for r, logits in zip(group, tails)]
    logger.info("%s", result.describe())
    if not result.passed:
        raise KernelInjectionUnsupported(result.describe())
    return {**result.summary(), "correctness_gate_detail": result.describe()}


def teacher_forced_tails(runner: Any, probes: list[list[int]], vocab_size: int, fill: bool = False) -> list[Any]:
    """The runner's logits [TAIL, vocab] at each probe's last TAIL positions, the probes run as a dynamic batch
    runs: every prefix in one left-padded prompt pass, then one teacher-forced token per step. With `fill`, the
    batch's other rows hold short random prompts, so the probes sit among padding as requests do."""
    import random

    import torch

    from handlers.correctness_gate import SEED, TAIL
    from handlers.runner import StepBatch

    rng = random.Random(SEED)
    fillers = runner.max_rows - len(probes) if fill else 0
    prompts = [tokens[:-TAIL] for tokens in probes] + [[rng.randrange(vocab_size) for _ in range(3)]
                                                      for _ in range(fillers)]
    sequences = list(range(len(prompts)))
    logits = runner.forward(StepBatch(sequences, prompts, [0] * len(prompts), 0, 0))
    rows = [[logits[i].float().cpu()] for i in range(len(probes))]
    for step in range(TAIL - 1):
        tokens = [[tokens[-TAIL + step]] for tokens in probes] + [[rng.randrange(vocab_size)] for _ in range(fillers)]
        logits = runner.forward(StepBatch(sequences, tokens, [0] * len(tokens), len(tokens), 0))
        for i in range(len(probes)):
            rows[i].append(logits[i].float().cpu())
    return [torch.stack(r) for r in rows]
