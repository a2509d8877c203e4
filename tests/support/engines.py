"""The rolling-batch engine over a given model, built the way the AutoTP loader builds it (paged cache,
block allocator, shared sampler), for unit and GPU tests that drive the engine without a server."""

from __future__ import annotations

from typing import Any

from handlers.kv_blocks import BlockAllocator, KVBudget
from handlers.model_runner import ModelRunner
from handlers.paged_kv_cache import PagedKVCache, attention_window
from handlers.rolling_batch import RollingBatchEngine

BLOCK_SIZE = 16


def make_engine(model: Any, tokenizer: Any, *, max_batch: int = 4, prefill: int = 64, max_total: int = 256,
                eos: Any = (), kv_tokens: int = 4096, batching: Any = None, device: str = "cpu") -> RollingBatchEngine:
    """An engine over a paged cache of `kv_tokens` positions on `device`."""
    budget = KVBudget(block_size=BLOCK_SIZE, num_blocks=kv_tokens // BLOCK_SIZE, bytes_per_token=1, basis="test")
    window, layer_types = attention_window(model.config)
    cache = PagedKVCache(model.config.num_hidden_layers, num_blocks=budget.num_blocks, block_size=BLOCK_SIZE,
                         max_sequences=max(max_batch, batching.batch_size if batching else 0), max_length=max_total,
                         device=device, sliding_window=window, layer_types=layer_types)
    return RollingBatchEngine(ModelRunner(model, cache, device), tokenizer, allocator=BlockAllocator(budget),
                              max_batch=max_batch, max_prefill_tokens=prefill, max_total_tokens=max_total,
                              eos_token_ids=eos, vocab_size=model.config.vocab_size, batching=batching)


STEP_ORDERS = ("sequential", "overlapped")


def step_order_fixture(request: Any, monkeypatch: Any) -> str:
    """For an autouse fixture parametrized over STEP_ORDERS: every engine of the test either reads each pass
    back before processing it (a CPU runner) or launches the next pass first (a CUDA runner, whose passes are
    asynchronous), so every guarantee is checked in both step orders."""
    from handlers.runner import Runner

    overlapped = request.param == "overlapped"
    monkeypatch.setattr(Runner, "asynchronous", property(lambda self: overlapped))
    return request.param
