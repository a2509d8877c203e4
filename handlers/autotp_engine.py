"""The AutoTP engine: a Hugging Face causal LM wrapped by `deepspeed.init_inference` (automatic tensor
parallelism, no kernel injection), driven by our rolling batch. It runs on CPU (DeepSpeed's CPU accelerator)
and on GPU, for any architecture transformers can load."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from handlers.engine_choice import EnginePlan
from handlers.serving_properties import ServingProperties

logger = logging.getLogger(__name__)

#: token positions per KV block (vLLM's default for its paged attention)
KV_BLOCK_SIZE = 16


def load_autotp_engine(properties: ServingProperties, plan: EnginePlan, model_path: str,
                       progress: Callable[[str], None], description: str = "") -> Any:
    """Load weights, wrap them with DeepSpeed AutoTP and return a `RollingBatchEngine` (on rank 0 when
    tensor-parallel: its runner then drives the other ranks, see `handlers.tensor_parallel`)."""
    from handlers.engine_build import LoadedModel, eos_token_ids, serving_engine
    from handlers.memory_probe import PeakMemory

    started = time.monotonic()
    memory = PeakMemory()
    model = load_autotp_model(properties, plan, model_path, progress)
    memory_summary = memory.stop()
    runner = model.runner
    if model.groups is not None:
        from handlers.tensor_parallel import TensorParallelRunner
        runner = TensorParallelRunner(runner, model.groups)
    module = model.module
    loaded = LoadedModel(runner, model.tokenizer, model.budget, model.max_sequences, model.max_total_tokens,
                         eos_token_ids(module, model.tokenizer), getattr(module.config, "vocab_size", None),
                         architecture=type(module).__name__, device=str(model.runner.device),
                         tensor_parallel_degree=plan.tensor_parallel_degree, weights_bytes=model.weights_bytes,
                         details=memory_summary)
    return serving_engine("autotp", properties, plan, loaded, started, description or model_path)


@dataclass
class AutoTPModel:
    module: Any  # the (sharded) Hugging Face model
    tokenizer: Any
    runner: Any  # ModelRunner over this rank's shard
    max_total_tokens: int
    dtype: Any
    budget: Any  # handlers.kv_blocks.KVBudget: the KV cache's size, the same on every rank
    max_sequences: int  # requests in the batch at once (sequence slots of the block table)
    groups: Any = None  # tensor-parallel only: handlers.tensor_parallel.ProcessGroups (rank, control groups)

    @property
    def weights_bytes(self) -> int:
        """This rank's weights (its shard under tensor parallelism)."""
        return sum(p.numel() * p.element_size() for p in self.module.parameters())


def load_autotp_model(properties: ServingProperties, plan: EnginePlan, model_path: str,
                      progress: Callable[[str], None]) -> AutoTPModel:
    """This rank's model, tokenizer and runner. Tensor parallel degree 1 loads the whole model with
    `from_pretrained`; a higher degree joins the process group and loads only this rank's shard."""
    import deepspeed  # heavy: imported only when an engine is built
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from handlers.engine_build import batch_limits, torch_dtype
    from quantization.quantizer import quantize_loaded_model

    dtype = torch_dtype(plan)
    degree = plan.tensor_parallel_degree
    if properties.checkpoint is not None:
        from pathlib import Path

        from handlers.checkpoint_files import checkpoint_view
        model_path = str(checkpoint_view(Path(model_path), properties.checkpoint))
        progress(f"checkpoint={properties.checkpoint}: loading its weights ({model_path} links them)")
    progress(f"loading tokenizer from {model_path}")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=properties.trust_remote_code)
    groups = None
    if degree > 1:
        from handlers.tensor_parallel import init_distributed, load_sharded_model
        groups = init_distributed(plan.device.kind, startup_timeout=properties.model_loading_timeout)
        rank, world = groups.rank, groups.world
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
    max_sequences, max_total_tokens = batch_limits(properties, plan,
                                                   getattr(module.config, "max_position_embeddings", None))
    runner, budget = _runner_within_budget(module, properties, device, max_sequences, max_total_tokens, groups)
    progress(f"KV cache: {budget.tokens} tokens in {budget.num_blocks} blocks of {budget.block_size} "
             f"({budget.bytes / 2**30:.2f} GiB; {budget.basis})")
    return AutoTPModel(module, tokenizer, runner, max_total_tokens, dtype, budget, max_sequences, groups)


def _runner_within_budget(module: Any, properties: ServingProperties, device: Any, max_sequences: int,
                          max_total_tokens: int, groups: Any) -> tuple[Any, Any]:
    """Measure what one token's K/V takes on this rank and what the largest step needs, size the KV cache
    from the memory budget (`handlers.kv_blocks`), and return a runner over a cache of that size."""
    import torch

    from handlers.kv_blocks import KVBudget, available_kv_bytes, size_kv_budget
    from handlers.model_runner import ModelRunner
    from handlers.paged_kv_cache import PagedKVCache, attention_window

    window, layer_types = attention_window(module.config)

    def cache_of(num_blocks: int) -> PagedKVCache:
        return PagedKVCache(module.config.num_hidden_layers, num_blocks=num_blocks, block_size=KV_BLOCK_SIZE,
                            max_sequences=max_sequences, max_length=max_total_tokens, device=device,
                            sliding_window=window, layer_types=layer_types)

    # A cache with no blocks of its own: every position maps to the scratch block, so the probe's writes
    # and gathers have their real shapes at almost no memory cost.
    probe_runner = ModelRunner(module, cache_of(0), device)
    largest_prefill = min(properties.max_rolling_batch_prefill_tokens, max_total_tokens)
    on_gpu = device.type == "cuda"

    def probe() -> None:
        probe_runner.prefill([0], [[0] * (largest_prefill if on_gpu else 1)], [0])
        rows = max_sequences if on_gpu else 1
        probe_runner.decode(list(range(rows)), [0] * rows, [max_total_tokens - 1 if on_gpu else 1] * rows)

    available, basis = available_kv_bytes(device, gpu_memory_utilization=properties.gpu_memory_utilization,
                                          cpu_kv_cache_bytes=properties.cpu_kv_cache_bytes, probe=probe)
    # K and V of one position in every layer of this rank (heads are per rank under tensor parallelism)
    per_token = sum((layer.keys[0].numel() + layer.values[0].numel()) * layer.keys.element_size()
                    for layer in probe_runner.cache.layers if layer.is_initialized)
    budget = size_kv_budget(available_bytes=available, bytes_per_token=per_token, block_size=KV_BLOCK_SIZE,
                            basis=basis)
    del probe_runner
    if groups is not None:
        # Every rank must hold the same blocks (rank 0 allocates for all): take the smallest budget. On the
        # start-up group: a rank may finish loading long after another.
        import torch.distributed as dist
        blocks = torch.tensor([budget.num_blocks], dtype=torch.long)
        dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=groups.startup)
        budget = KVBudget(budget.block_size, int(blocks.item()), budget.bytes_per_token, budget.basis)
    if on_gpu:
        torch.cuda.empty_cache()
    return ModelRunner(module, cache_of(budget.num_blocks), device), budget
