"""Kernel injection against AutoTP per architecture, in the same process on the same weights: the project's own
rolling-batch engine (scheduler, sampler, output processor) over each engine's runner, no HTTP, so the numbers
compare the engines and nothing else. Random weights in the shapes of a real checkpoint of each family.

    python benchmarks/engine_compare.py --families gptj opt bloom gpt_neox gpt2 gpt_neo llama \
        --clients 1 32 --prompt-tokens 128 --new-tokens 64 --out results/gpu-engine-compare.jsonl

For each family: AutoTP first (continuous batching over a paged KV cache, as `handlers.autotp_engine` builds it),
then kernel injection into the same model (dynamic batches: `batch_size` = the most clients, no delay). Each
concurrency level runs `--rounds` times; one JSON line per (family, engine, clients, round): output tokens per
second over the whole run (prefill included), requests all submitted at once (1 client: requests one after the
other).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: real checkpoints' shapes (their config.json values), random weights
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "gptj": ("GPT-J-6B", dict(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400,
                              n_positions=2048)),
    "opt": ("OPT-6.7B", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384,
                             vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=4096)),
    "bloom": ("BLOOM-7B1", dict(hidden_size=4096, n_layer=30, n_head=32, vocab_size=250880)),
    "gpt_neox": ("Pythia-6.9B (GPT-NeoX family)", dict(hidden_size=4096, num_hidden_layers=32,
                                                       num_attention_heads=32, intermediate_size=16384,
                                                       vocab_size=50432, rotary_pct=0.25,
                                                       max_position_embeddings=2048)),
    "gpt2": ("GPT-2 XL", dict(n_embd=1600, n_layer=48, n_head=25, vocab_size=50257, n_positions=1024)),
    "gpt_neo": ("GPT-Neo-2.7B", dict(hidden_size=2560, num_layers=32, num_heads=20, vocab_size=50257,
                                     max_position_embeddings=2048, window_size=256,
                                     attention_types=[[["global", "local"], 16]])),
    "llama": ("Llama-2-7B", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                                 max_position_embeddings=4096)),
}


class IdTokenizer:
    """Token ids as text: the benchmark only counts tokens."""

    eos_token_id = None
    all_special_ids: list[int] = []

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids)


def random_model(family: str, scale: dict[str, Any] | None = None) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **{**SHAPES[family][1], **(scale or {})})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def autotp_engine(model: Any, clients: int, max_total: int) -> Any:
    """The AutoTP loader's runner over `model` (deepspeed.init_inference without kernel injection is a no-op at
    one rank, so the HF model itself) with a paged KV cache for `clients` sequences."""
    from handlers.kv_blocks import BlockAllocator, KVBudget
    from handlers.model_runner import ModelRunner
    from handlers.paged_kv_cache import PagedKVCache, attention_window
    from handlers.rolling_batch import RollingBatchEngine

    block = 16
    budget = KVBudget(block, clients * -(-max_total // block), 1, "benchmark")
    window, layer_types = attention_window(model.config)
    device = next(model.parameters()).device
    cache = PagedKVCache(model.config.num_hidden_layers, num_blocks=budget.num_blocks, block_size=block,
                         max_sequences=clients, max_length=max_total, device=device, sliding_window=window,
                         layer_types=layer_types)
    return RollingBatchEngine(ModelRunner(model, cache, device), IdTokenizer(model.config.vocab_size),
                              allocator=BlockAllocator(budget), max_batch=clients, max_prefill_tokens=4096,
                              max_total_tokens=max_total, eos_token_ids=(), vocab_size=model.config.vocab_size)


def kernel_injection_engine(model: Any, clients: int, max_total: int) -> Any:
    from handlers.kernel_injection_engine import build
    from handlers.kv_blocks import BlockAllocator
    from handlers.rolling_batch import RollingBatchEngine
    from handlers.scheduler import DynamicBatching

    dtype = next(model.parameters()).dtype
    built = build(model, clients, max_total, dtype, progress=lambda line: None)
    return RollingBatchEngine(built.runner, IdTokenizer(model.config.vocab_size),
                              allocator=BlockAllocator(built.budget), max_batch=clients, max_prefill_tokens=4096,
                              max_total_tokens=max_total, eos_token_ids=(), vocab_size=model.config.vocab_size,
                              batching=DynamicBatching(clients, 0.0, max_total), name="kernel_injection")


def timed(engine: Any, clients: int, prompt_tokens: int, new_tokens: int, vocab: int, seed: int) -> dict[str, Any]:
    """Output tok/s for `clients` requests at once (or one after another for 1), greedy, no end-of-sequence."""
    from handlers.engine import GenerationRequest, SamplingParams

    rng = random.Random(seed)
    batches = [[0, 1, 2]] if clients == 1 else [list(range(clients))]
    if clients == 1:
        batches = [[i] for i in range(3)]
    generated, started = 0, time.perf_counter()
    for batch in batches:
        for i in batch:
            prompt = [rng.randrange(vocab) for _ in range(prompt_tokens)]
            engine.add_request(GenerationRequest(f"r{seed}-{clients}-{i}", "", prompt,
                                                 SamplingParams(max_new_tokens=new_tokens, do_sample=False)))
        while engine.has_unfinished():
            for out in engine.step():
                generated += len(out.tokens)
    _sync()
    seconds = time.perf_counter() - started
    return {"output_tokens": generated, "seconds": round(seconds, 3), "output_tok_s": round(generated / seconds, 1)}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "deepspeed"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=["autotp", "kernel_injection"])
    parser.add_argument("--scale", type=json.loads, default=None,
                        help="config overrides for every family (JSON), e.g. a CPU smoke run's tiny shapes")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--table", action="store_true", help="only print the markdown table of --out's results")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    max_total = args.prompt_tokens + args.new_tokens
    common = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device, **versions(),
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    for family in args.families:
        model = random_model(family, args.scale)
        for name in args.engines:  # kernel injection replaces the blocks in place: it runs last
            try:
                engine = (autotp_engine if name == "autotp" else kernel_injection_engine)(
                    model, max(args.clients), max_total)
            except Exception as error:  # record why and go on with the next family
                _write(args.out, {**common, "family": family, "shape": SHAPES[family][0], "engine": name,
                                  "error": f"{type(error).__name__}: {error}"[:2000]})
                continue
            failed = False
            for clients in args.clients:
                for round_ in range(args.rounds):
                    if failed:
                        break
                    try:
                        result = timed(engine, clients, args.prompt_tokens, args.new_tokens,
                                       model.config.vocab_size, seed=round_)
                    except Exception as error:  # this engine's later runs would find its requests still active
                        result, failed = {"error": f"{type(error).__name__}: {error}"[:2000]}, True
                    _write(args.out, {**common, "family": family, "shape": SHAPES[family][0], "engine": name,
                                      "clients": clients, "round": round_ + 1, **result})
            del engine
        del model
        import gc
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def table(path: Path) -> str:
    """RESULTS.md's table from a results file: per family and engine, output tok/s at each concurrency (the
    rounds' values), and kernel injection against AutoTP (the ratio of the rounds' means)."""
    import statistics

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    clients = sorted({r["clients"] for r in rows if "clients" in r})
    speeds: dict[tuple[str, str, int], list[float]] = {}
    errors: dict[tuple[str, str], str] = {}
    shapes: dict[str, str] = {}
    for r in rows:
        shapes[r["family"]] = r["shape"]
        if "error" in r:
            errors[(r["family"], r["engine"])] = r["error"].splitlines()[0][:120]
        elif "output_tok_s" in r:
            speeds.setdefault((r["family"], r["engine"], r["clients"]), []).append(r["output_tok_s"])
    head = "| family (shape) | engine | " + " | ".join(f"{c} client{'s' if c > 1 else ''}" for c in clients) + " |"
    lines = [head, "|" + "---|" * (2 + len(clients))]
    for family in shapes:
        for engine in ("autotp", "kernel_injection"):
            cells = []
            for c in clients:
                values = speeds.get((family, engine, c))
                cells.append(" / ".join(f"{v:,.1f}" for v in values) if values else
                             ("error" if (family, engine) in errors else "-"))
            lines.append(f"| {family} ({shapes[family]}) | {engine} | " + " | ".join(cells) + " |")
        ratios = []
        for c in clients:
            a, k = speeds.get((family, "autotp", c)), speeds.get((family, "kernel_injection", c))
            ratios.append(f"{statistics.mean(k) / statistics.mean(a):.2f}x" if a and k else "-")
        lines.append(f"| {family} | kernel injection / AutoTP | " + " | ".join(ratios) + " |")
    for (family, engine), error in errors.items():
        lines.append(f"\n{family} {engine}: {error}")
    return "\n".join(lines)


def _write(path: Path, row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
