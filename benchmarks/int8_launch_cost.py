"""Where the host's time goes when FastGen's W8A8 layer is called, piece by piece, on the GPU: each line is the
host's time per call of one piece, called 300 times in a row without waiting for the device (after one call
to compile and warm up), so that at one sequence, where FastGen is bound by the host's launching, the cost of
each launch can be compared with a torch operation's.

    python benchmarks/int8_launch_cost.py --out results/gpu-int8-launch-cost.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from int8_linear_benchmark import host_us  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import triton

    from quantization import int8, int8_triton

    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    wq, ws = int8.quantize_weight(torch.randn(4096, 4096, device="cuda"))
    q, scale = int8_triton.quantize_rows(x)
    out = torch.empty(1, 4096, device="cuda", dtype=torch.float16)
    fp16 = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    config = int8_triton.block_config(1)
    launcher = int8_triton._INT8_MATMUL
    matmul_args = (q, wq, out, scale, ws, scale, 1, 4096, 4096, q.stride(0), q.stride(1), wq.stride(0), wq.stride(1),
                   out.stride(0), out.stride(1))
    constexprs = {"HAS_BIAS": False, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                  "BLOCK_K": config.block_k, "GROUP_M": 8}
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    grid = (triton.cdiv(1, config.block_m) * triton.cdiv(4096, config.block_n),)
    launcher(grid, matmul_args, constexprs, options)
    compiled = next(iter(launcher.compiled.values()))
    stream = triton.runtime.driver.active.get_current_stream(0)
    pieces = {
        "torch.add (a torch op, for scale)": lambda: torch.add(x, 1.0),
        "torch.matmul fp16 [1,4096]x[4096,4096]": lambda: torch.matmul(x, fp16.t()),
        "torch.empty x2 (quantize_rows' outputs)": lambda: (torch.empty(1, 4096, dtype=torch.int8, device="cuda"),
                                                             torch.empty(1, device="cuda")),
        "driver.active.get_current_stream": lambda: triton.runtime.driver.active.get_current_stream(0),
        "the launcher's key": lambda: (grid, *int8_triton._specialization(matmul_args), *constexprs.values(),
                                       *options.values()),
        "compiled.run (Triton's C launcher alone)": lambda: compiled.run(
            grid[0], 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *matmul_args,
            *constexprs.values()),
        "matmul via _Launcher (cached)": lambda: launcher(grid, matmul_args, constexprs, options),
        "matmul via kernel[grid] (Triton's JIT path)": lambda: int8_triton._int8_matmul_kernel[grid](
            *matmul_args, **constexprs, **options),
        "int8_triton.quantize_rows": lambda: int8_triton.quantize_rows(x),
        "int8_triton.int8_matmul_scaled": lambda: int8_triton.int8_matmul_scaled(q, scale, wq, ws, torch.float16,
                                                                                 out=out),
        "int8_triton.w8a8_linear (1 row: fused)": lambda: int8_triton.w8a8_linear(x, wq, ws, out=out),
    }
    header = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": triton.__version__, "command": " ".join(sys.argv),
              "cached_kernels": len(launcher.compiled)}
    lines = [header] + [{"piece": name, "host_us": host_us(call, calls=300)} for name, call in pieces.items()]
    lines[0]["cached_kernels_after"] = {"matmul": len(launcher.compiled),
                                        "quantize": len(int8_triton._QUANTIZE_ROWS.compiled),
                                        "fused": len(int8_triton._W8A8_FUSED.compiled)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as handle:
        for line in lines:
            print(json.dumps(line), flush=True)
            handle.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
