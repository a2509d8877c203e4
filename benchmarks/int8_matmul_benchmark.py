"""Does torch._int_mm (int8 x int8 -> int32) beat the float32 matmul on this machine? One JSON line per shape.

For each [M, K] x [K, N] shape it times, interleaved round by round (so load from other processes hits
all variants alike) and reports medians in microseconds:
  - fp32:        x @ w.T in float32 (what an unquantized fp32 linear does)
  - int_mm:      torch._int_mm(x_q, w_q.T) on int8 (the W8A8 matmul alone)
  - int_mm_w8a8: quantization.int8.w8a8_linear forced onto _int_mm (per-token quantization + matmul + scales)
  - fp32_w8a8:   the same with the float32 fallback matmul of the integer values
The shapes are the embedded SmolLM2-135M's linear layers (hidden 576, intermediate 1536) and a
7B-shaped 4096 x 4096 layer, at 1 row (a decode step of one sequence) up to 512 rows (prefill).

    python benchmarks/int8_matmul_benchmark.py [--rounds 15] > benchmarks/results/cpu-int8-matmul-DATE.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from quantization import int8

SHAPES = [(m, k, n) for m in (1, 8, 32, 128, 512) for k, n in ((576, 1536), (1536, 576), (4096, 4096))]


def _time(fn, budget: float = 0.05) -> float:
    fn()
    started, calls = time.perf_counter(), 0
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= budget:
            return elapsed / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    header = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(header), flush=True)
    for m, k, n in SHAPES:
        x = torch.randn(m, k)
        w = torch.randn(n, k)
        w_q, w_scale = int8.quantize_weight(w)
        x_q, _ = int8.quantize_rows(x)
        w_qt = w_q.t()
        variants = {
            "fp32": lambda: x @ w.t(),
            "int_mm": lambda: torch._int_mm(x_q, w_qt),
        }
        variants["int_mm_w8a8"] = lambda: int8.w8a8_linear(x, w_q, w_scale, int_mm=True)
        variants["fp32_w8a8"] = lambda: int8.w8a8_linear(x, w_q, w_scale, int_mm=False)
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                samples[name].append(_time(fn))
        medians = {name: round(statistics.median(values), 1) for name, values in samples.items()}
        print(json.dumps({"m": m, "k": k, "n": n, **{f"{name}_us": value for name, value in medians.items()},
                          "fp32_over_int_mm": round(medians["fp32"] / medians["int_mm"], 2),
                          "fp32_over_int_mm_w8a8": round(medians["fp32"] / medians["int_mm_w8a8"], 2)}), flush=True)


if __name__ == "__main__":
    main()
