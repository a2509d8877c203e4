"""Quality of the int8 paths: perplexity on held-out text, printed as one JSON object.

    python -m entrypoint quality [--model-dir DIR] [--windows 16] [--window-tokens 256] [--device cuda]
                                                                                          (entrypoint/quality.py)

Four variants of the same model (default: the embedded SmolLM2-135M-Instruct, converted if needed), each
loaded fresh in float32 on the CPU (or moved to `--device`, where the int8 layers take the GPU's paths) and
quantized through the serving code (`quantization.quantizer`):
  - fp32:          unquantized;
  - naive_w8a8:    int8 weights and activations with one scale per tensor (weights) and per call
                   (activations), no smoothing: SmoothQuant's "W8A8 naive" baseline (Xiao et al., 2022);
  - dynamic_int8:  per-channel int8 weights, per-token dynamic int8 activations, no smoothing;
  - smoothquant:   calibrated (the default calibration half of pydoc_data topics; never cached here),
                   alpha searched, factors folded into the norms, then as dynamic_int8.
Perplexity is exp(mean next-token loss) over windows of the evaluation half of the standard library's
`pydoc_data.topics` (disjoint from the calibration half; quantization/corpus.py). The JSON also carries the
quantized weight bytes against their fp16 size, the chosen alpha, the quality targets (smoothquant
within 3% of fp32 and better than naive W8A8; int8 weights <= 55% of fp16) and the versions and machine.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = ("fp32", "naive_w8a8", "dynamic_int8", "smoothquant")
SMOOTHQUANT_MAX_INCREASE = 0.03
WEIGHT_BYTES_TARGET = 0.55


def perplexity(model: Any, windows: Any, batch: int = 4) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch):
            ids = windows[start:start + batch]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum")
            total += float(loss)
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def evaluate(model_dir: Path, windows: int, window_tokens: int, variants: tuple[str, ...] = VARIANTS,
             device: str = "cpu") -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantization.corpus import pydoc_topics, token_windows
    from quantization.quantizer import quantize_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    held_out = token_windows(tokenizer, pydoc_topics("evaluation"), windows, window_tokens).to(device)
    results: dict[str, Any] = {}
    for variant in variants:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        started = time.monotonic()
        entry: dict[str, Any] = {}
        if variant != "fp32":
            method = "smoothquant" if variant == "smoothquant" else "dynamic_int8"
            result = quantize_model(model, method, tokenizer=tokenizer, model_path=str(model_dir),
                                    per_tensor=variant == "naive_w8a8", show_progress=False)
            entry.update(linear_layers=result.linears, int8_weight_bytes=result.int8_bytes,
                         fp16_weight_bytes=result.fp16_bytes, weight_bytes_vs_fp16=round(result.ratio, 4))
            if result.alpha is not None:
                entry.update(alpha=result.alpha, alpha_source=result.alpha_source,
                             alpha_errors={str(a): e for a, e in result.alpha_errors.items()},
                             calibration=result.calibration)
        entry["quantize_seconds"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        entry["perplexity"] = round(perplexity(model, held_out), 4)
        entry["eval_seconds"] = round(time.monotonic() - started, 1)
        results[variant] = entry
        print(f"{variant}: {entry}", file=sys.stderr, flush=True)
        del model
    return {"device": device, "held_out": {"text": "pydoc_data.topics (evaluation half)",
                                           "windows": int(held_out.shape[0]), "window_tokens": int(held_out.shape[1])},
            "variants": results, "targets": _targets(results)}


def _targets(results: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    if "fp32" in results and "smoothquant" in results:
        increase = results["smoothquant"]["perplexity"] / results["fp32"]["perplexity"] - 1
        targets["smoothquant_increase_vs_fp32"] = round(increase, 4)
        targets["smoothquant_within_3_percent"] = increase <= SMOOTHQUANT_MAX_INCREASE
    if "naive_w8a8" in results and "smoothquant" in results:
        targets["smoothquant_better_than_naive_w8a8"] = (results["smoothquant"]["perplexity"]
                                                         < results["naive_w8a8"]["perplexity"])
    ratios = [entry["weight_bytes_vs_fp16"] for entry in results.values() if "weight_bytes_vs_fp16" in entry]
    if ratios:
        targets["weight_bytes_vs_fp16_max"] = max(ratios)
        targets["weights_at_most_55_percent"] = max(ratios) <= WEIGHT_BYTES_TARGET
    return targets


def environment(machine: str) -> dict[str, Any]:
    """Date, versions and `machine` (the caller's description of it) for the report."""
    import deepspeed
    import torch
    import transformers

    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
            "machine": f"{platform.machine()}, {machine}, {torch.get_num_threads()} threads"}
