"""What every engine loader shares: the plan's dtype as torch's, the batch limits, the model's end-of-sequence
ids, and the last step, from a loaded model to a serving `RollingBatchEngine` with its start-up summary."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from handlers.engine_choice import EnginePlan
from handlers.serving_properties import ServingProperties

#: the plan's dtype names -> torch's attribute names
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(plan: EnginePlan) -> Any:
    import torch

    return getattr(torch, TORCH_DTYPES[plan.dtype])


def batch_limits(properties: ServingProperties, plan: EnginePlan, context: int | None) -> tuple[int, int]:
    """(sequences in the batch at once, tokens per sequence): see `batch_rows`; no sequence is longer than
    max_tokens or the model's context."""
    from handlers.scheduler import batch_rows

    return batch_rows(properties, plan), min(properties.max_tokens, context or properties.max_tokens)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every end-of-sequence id the model's generation config, its config and its tokenizer name."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def eos_token_ids_from_files(model_path: str, hf_config: Any, tokenizer: Any) -> set[int]:
    """The same ids for an engine that never builds the HF model: its generation_config.json read directly."""
    from transformers import GenerationConfig

    generation_config = None
    try:
        generation_config = GenerationConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        pass  # no generation_config.json: the config's and the tokenizer's eos ids remain
    return eos_token_ids(SimpleNamespace(config=hf_config, generation_config=generation_config), tokenizer)


@dataclass
class LoadedModel:
    """What a loader hands `serving_engine`: a runner over a sized KV cache and what the summary reports."""

    runner: Any  # a handlers.runner.Runner
    tokenizer: Any
    budget: Any  # handlers.kv_blocks.KVBudget: the KV cache the rolling batch admits by
    max_sequences: int
    max_total_tokens: int
    eos_token_ids: set[int]
    vocab_size: int | None
    architecture: str  # the model class's name
    device: str
    tensor_parallel_degree: int
    weights_bytes: int | None = None  # this rank's, where the engine can count them
    details: dict[str, Any] = field(default_factory=dict)  # the engine's own summary lines
    #: rows that advance together through this many positions (kernel injection; see handlers.scheduler)
    aligned_tokens: int | None = None


def serving_engine(name: str, properties: ServingProperties, plan: EnginePlan, model: LoadedModel,
                   started: float, described_as: str) -> Any:
    """The rolling batch engine over `model`, its summary saying what was loaded, how, and why this engine.
    `started`: time.monotonic() when loading began; `described_as`: the model as the summary names it."""
    from handlers.kv_blocks import BlockAllocator
    from handlers.rolling_batch import RollingBatchEngine
    from handlers.scheduler import DynamicBatching

    summary: dict[str, Any] = {
        "model": described_as,
        "architecture": model.architecture,
        "dtype": plan.dtype,
        "device": model.device,
        "tensor_parallel_degree": model.tensor_parallel_degree,
    }
    if model.weights_bytes is not None:
        summary["weights_bytes_this_rank"] = model.weights_bytes
    summary["kv_bytes_per_token"] = model.budget.bytes_per_token
    summary["load_seconds"] = round(time.monotonic() - started, 2)
    summary.update(model.details)
    summary["reason"] = plan.reason
    batching = DynamicBatching.for_plan(properties, plan, model.aligned_tokens)
    return RollingBatchEngine(
        model.runner, model.tokenizer,
        allocator=BlockAllocator(model.budget),
        max_batch=model.max_sequences,
        max_prefill_tokens=properties.max_rolling_batch_prefill_tokens,
        max_total_tokens=model.max_total_tokens,
        eos_token_ids=model.eos_token_ids,
        vocab_size=model.vocab_size,
        batching=batching,
        name=name,
        summary=summary,
    )
