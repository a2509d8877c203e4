"""Baselines for the FastGen sweep, in the same GPU run: DeepSpeed-FastGen driven by a bare Python `put()`
loop (no server, no sampler: greedy argmax on the device, DeepSpeed's own build_hf_engine without the
project's bridges) and Hugging Face `generate`, on the same model and request shape, at several batch sizes.

The same bare loop also runs over the engine the server builds (`fastgen-project-build`:
handlers.fastgen_model.build_fastgen_engine with the server's limits at `--server-batch` sequences, its
attention-atom room and its bridges) and over that build without its fp32-rotary bridge
(`fastgen-project-build-hf-rotary-off`, DeepSpeed's own rotary kernel): the server's gap to DeepSpeed's
bare loop then splits into what the build costs (state-manager sizes, bridges) and what the serving
costs (scheduler, sampler, output processing, HTTP). `fastgen-project-build-int8` is the server's build with
`quantize=dynamic_int8` (W8A8 linear layers, handlers/fastgen_int8.py); the project builds' rows also give
the bytes of the weights DeepSpeed holds (`weights_bytes`, its flattened parameters).

    python benchmarks/fastgen_loop.py --model-dir /tmp/llama7b-random --batches 1 8 32 64 128 \
        --prompt-tokens 128 --max-tokens 128 --out results/fastgen-baselines.jsonl

One JSON line per (engine, batch): output tok/s over the whole run (prefill included), as the sweep reports
it. The bare loop is what FACTS.md measured at 186 / 3,649 tok/s (1 / 32 sequences, 128/128, H200).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path


def bare_loop(model_dir: str, batch: int, prompt_tokens: int, max_tokens: int, engine=None) -> tuple[float, object]:
    from deepspeed.inference.v2 import RaggedInferenceEngineConfig, build_hf_engine

    if engine is None:
        config = RaggedInferenceEngineConfig(state_manager={
            "max_tracked_sequences": 256, "max_ragged_sequence_count": 256, "max_ragged_batch_size": 8192,
            "memory_config": {"mode": "allocate", "size": 1024}})
        engine = build_hf_engine(model_dir, config)
    return _timed_loop(engine, batch, prompt_tokens, max_tokens)


def project_build(model_dir: str, server_batch: int, rotary_bridge: bool = True, int8: bool = False) -> object:
    """The engine `python -m entrypoint serve` builds for this model (handlers/fastgen_engine.py `_build`):
    the same limits (`server_batch` sequences, the default prefill budget, the model's context, the default
    gpu_memory_utilization), atom room and bridges; `rotary_bridge=False` leaves DeepSpeed's own rotary."""
    import torch
    from transformers import AutoConfig

    from handlers.fastgen_engine import engine_limits
    from handlers.fastgen_model import Bridges, build_fastgen_engine, preflight
    from handlers.serving_properties import ServingProperties

    hf_config = AutoConfig.from_pretrained(model_dir)
    limits = engine_limits(ServingProperties(), server_batch, hf_config.max_position_embeddings,
                           torch.cuda.mem_get_info()[1], hf_config.vocab_size)
    bridges = preflight(hf_config, limits.max_context)
    if not rotary_bridge:
        bridges = Bridges(norm_eps=bridges.norm_eps, inv_freqs=None)
    engine, _, _ = build_fastgen_engine(model_dir, hf_config, limits, dtype=torch.float16, bridges=bridges,
                                        int8_linear=int8)
    return engine


def _timed_loop(engine: object, batch: int, prompt_tokens: int, max_tokens: int) -> tuple[float, object]:
    """Prefill every sequence (in as few puts as the engine's ragged batch holds), then decode them together,
    each token the argmax read back before the next put."""
    import torch

    uids = list(range(batch))
    prompts = [torch.randint(0, 32000, (prompt_tokens,)) for _ in uids]
    per_put = max(1, engine._config.state_manager.max_ragged_batch_size // prompt_tokens)
    torch.cuda.synchronize()
    started = time.perf_counter()
    logits = torch.cat([engine.put(uids[i:i + per_put], prompts[i:i + per_put], do_checks=False)
                        for i in range(0, batch, per_put)])
    for _ in range(max_tokens - 1):
        next_tokens = logits.argmax(dim=-1).cpu()
        logits = engine.put(uids, [t.view(1) for t in next_tokens], do_checks=False)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    for uid in uids:
        engine.flush(uid)
    return batch * max_tokens / elapsed, engine


def hf_generate(model_dir: str, batch: int, prompt_tokens: int, max_tokens: int, model=None) -> tuple[float, object]:
    import torch
    from transformers import AutoModelForCausalLM

    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16).cuda().eval()
    ids = torch.randint(0, 32000, (batch, prompt_tokens), device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                       do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return batch * max_tokens / (time.perf_counter() - started), model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--engines", nargs="+", default=["fastgen-bare-loop", "hf-generate"],
                        choices=["fastgen-bare-loop", "fastgen-project-build", "fastgen-project-build-hf-rotary-off",
                                 "fastgen-project-build-int8", "hf-generate"])
    parser.add_argument("--server-batch", type=int, default=64,
                        help="the project builds: max_rolling_batch_size of the server they stand for")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.engines:
        run = bare_loop if name == "fastgen-bare-loop" else hf_generate
        state = None
        extra = {}
        if name.startswith("fastgen-project-build"):
            run = bare_loop
            state = project_build(args.model_dir, args.server_batch, rotary_bridge=not name.endswith("rotary-off"),
                                  int8=name.endswith("int8"))
            weights = state.model().flattened_params
            extra["weights_bytes"] = weights.numel() * weights.element_size()
        _, state = run(args.model_dir, 1, 16, 4, state)  # warm-up: kernels, allocator
        for batch in args.batches:
            tok_s, state = run(args.model_dir, batch, args.prompt_tokens, args.max_tokens, state)
            row = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "engine": name, "batch": batch,
                   "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "output_tok_s": round(tok_s, 1),
                   **extra}
            print(json.dumps(row), flush=True)
            with out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        del state
        import torch
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
