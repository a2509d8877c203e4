"""The AutoTP engine: a Hugging Face causal LM wrapped by `deepspeed.init_inference` (automatic tensor
parallelism, no kernel injection), driven by our rolling batch. It runs on CPU (DeepSpeed's CPU accelerator)
and on GPU, for any architecture transformers can load."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def load_autotp_engine(properties: Any, plan: Any, model_path: str, progress: Callable[[str], None],
                       description: str = "") -> Any:
    """Load weights, wrap them with DeepSpeed AutoTP and return a `RollingBatchEngine` (on rank 0 when
    tensor-parallel: its runner then drives the other ranks, see `handlers.tensor_parallel`)."""
    from handlers.rolling_batch import RollingBatchEngine

    from handlers.memory_probe import PeakMemory

    started = time.monotonic()
    memory = PeakMemory()
    model = load_autotp_model(properties, plan, model_path, progress)
    memory_summary = memory.stop()
    runner = model.runner
    if model.control_group is not None:
        from handlers.tensor_parallel import TensorParallelRunner
        runner = TensorParallelRunner(runner, model.control_group)
    module = model.module
    load_seconds = time.monotonic() - started
    progress(f"model ready in {load_seconds:.1f} s")
    return RollingBatchEngine(
        runner, model.tokenizer,
        max_batch=properties.max_rolling_batch_size,
        max_prefill_tokens=properties.max_rolling_batch_prefill_tokens,
        max_total_tokens=model.max_total_tokens,
        eos_token_ids=_eos_token_ids(module, model.tokenizer),
        name="autotp",
        summary={
            "model": description or model_path,
            "architecture": type(module).__name__,
            "dtype": plan.dtype,
            "device": str(model.runner.device),
            "tensor_parallel_degree": plan.tensor_parallel_degree,
            "weights_bytes_this_rank": sum(p.numel() * p.element_size() for p in module.parameters()),
            "kv_bytes_per_token": _kv_bytes_per_token(module.config, model.dtype),
            "load_seconds": round(load_seconds, 2),
            **memory_summary,
            "reason": getattr(plan, "reason", ""),
        },
    )


@dataclass
class AutoTPModel:
    module: Any  # the (sharded) Hugging Face model
    tokenizer: Any
    runner: Any  # ModelRunner over this rank's shard
    max_total_tokens: int
    dtype: Any
    control_group: Any = None  # set when tensor-parallel: the gloo group commands travel on


def load_autotp_model(properties: Any, plan: Any, model_path: str, progress: Callable[[str], None]) -> AutoTPModel:
    """This rank's model, tokenizer and runner. Tensor parallel degree 1 loads the whole model with
    `from_pretrained`; a higher degree joins the process group and loads only this rank's shard."""
    import deepspeed  # heavy: imported only when an engine is built
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from handlers.model_runner import ModelRunner
    from quantization.quantizer import quantize_loaded_model

    dtype = getattr(torch, TORCH_DTYPES[plan.dtype])
    degree = plan.tensor_parallel_degree
    progress(f"loading tokenizer from {model_path}")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=properties.trust_remote_code)
    control_group = None
    if degree > 1:
        from handlers.tensor_parallel import init_distributed, load_sharded_model
        rank, world, control_group = init_distributed(plan.device.kind)
        if world != degree:
            raise RuntimeError(f"tensor_parallel_degree={degree} but the launcher started {world} ranks")
        if plan.device.kind == "cpu":
            # N ranks share the machine's cores; more threads than cores would only fight each other.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // degree))
        progress(f"loading this rank's shard ({rank + 1} of {degree}) from {model_path} ({plan.dtype})")
        module = load_sharded_model(model_path, dtype, degree, properties.trust_remote_code, progress)
    else:
        progress(f"loading weights from {model_path} ({plan.dtype})")
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=dtype,
            trust_remote_code=properties.trust_remote_code,
            attn_implementation="sdpa",  # the slot cache passes a boolean 4D mask, which SDPA takes as-is
        ).eval()
        progress("wrapping the model with deepspeed.init_inference (AutoTP, tp_size=1)")
        # AutoTP shards linear layers in place; the HF forward signature is kept.
        module = deepspeed.init_inference(model, tensor_parallel={"tp_size": 1}, dtype=dtype,
                                          replace_with_kernel_inject=False).module
    quantize_loaded_model(module, properties, plan, model_path, tokenizer, progress)  # no-op unless quantize is set
    device = next(module.parameters()).device
    context = getattr(module.config, "max_position_embeddings", None) or properties.max_tokens
    max_total_tokens = min(properties.max_tokens, context)
    runner = ModelRunner(module, max_batch=properties.max_rolling_batch_size, max_length=max_total_tokens,
                         device=device)
    return AutoTPModel(module, tokenizer, runner, max_total_tokens, dtype, control_group)


def _eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
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


def _kv_bytes_per_token(config: Any, dtype: Any) -> int:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * dtype.itemsize
