"""FastGen's linear layers on the GPU, fp16 against W8A8: DeepSpeed's `BlasFPLinear` (cuBLAS fp16 + its
activation kernel) and ours (`handlers.fastgen_int8`: two Triton kernels + the same activation kernel), and
the eager W8A8 path the AutoTP engine runs (`quantization.int8.w8a8_linear`), at Llama-2-7B's four layer
shapes and 1-2,048 rows. One JSON line per (layer, rows):

  - device_us:  median time on the GPU per call (CUDA events over a loop of calls, `triton.testing.do_bench`);
  - host_us:    the host's time to issue one call (a loop of calls without waiting, divided): at one
                sequence FastGen is bound by the host's launching (shared/FACTS.md), so a layer that adds
                launches can lose there whatever its kernels gain;
  - max_rel_err: the layer's max |output - fp16 output| / max |fp16 output| on the same weights;
  - `two_kernels` (rows up to FUSED_MAX_ROWS, where the layer runs the fused kernel): the same product through
    the separate quantization and matmul kernels, to place FUSED_MAX_ROWS;
  - with `--configs`, each Triton block configuration tried at small row counts for the fused kernel and for
    the matmul alone, so that `quantization.int8_triton.block_config` can be set from measurement.

    python benchmarks/int8_linear_benchmark.py --out benchmarks/results/gpu-int8-linear-DATE.jsonl [--configs]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: Llama-2-7B's linear layers as FastGen fuses them: (name, in, out after activation, activation)
LAYERS = (("qkv", 4096, 12288, "IDENTITY"), ("attn_out", 4096, 4096, "IDENTITY"),
          ("mlp_1", 4096, 11008, "SiGLU"), ("mlp_2", 11008, 4096, "IDENTITY"))
ROWS = (1, 8, 16, 17, 32, 64, 128, 512, 2048)


def host_us(call, calls: int = 200) -> float:
    """The host's time per call of `call`, called `calls` times in a row without waiting for the device (after
    one call to compile and warm up), in µs."""
    call()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        call()
    elapsed = time.perf_counter() - started
    torch.cuda.synchronize()
    return round(elapsed / calls * 1e6, 2)


def _layer(name: str, activation, in_channels: int, out_channels: int, max_tokens: int):
    from deepspeed.inference.v2.modules.configs import DSLinearConfig
    from deepspeed.inference.v2.modules.interfaces import DSLinearRegistry
    from deepspeed.inference.v2.modules.module_registry import ConfigBundle

    config = DSLinearConfig(max_tokens=max_tokens, in_channels=in_channels, out_channels=out_channels,
                            activation=activation, input_dtype=torch.float16, output_dtype=torch.float16)
    return DSLinearRegistry.instantiate_config(ConfigBundle(name=name, config=config))


def layer_rows(args: argparse.Namespace) -> list[dict]:
    import triton.testing
    from deepspeed.inference.v2.inference_utils import ActivationType, is_gated

    from handlers.fastgen_int8 import w8a8_linear_class
    from quantization import int8, int8_triton

    w8a8_linear_class()
    rows_out = []
    for layer_name, in_channels, out_channels, activation_name in LAYERS:
        activation = ActivationType[activation_name]
        width = out_channels * (2 if is_gated(activation) else 1)
        weight = (torch.randn(width, in_channels, device="cuda") * 0.02).half()
        modules = {name: _layer(name, activation, in_channels, out_channels, max(args.rows))
                   for name in ("blas_fp_linear", "lmi_w8a8_int8_linear")}
        params = {name: module.transform_param(weight.clone()) for name, module in modules.items()}
        wq, ws = int8.quantize_weight(weight.float())
        for rows in args.rows:
            x = torch.randn(rows, in_channels, device="cuda", dtype=torch.float16)
            calls = {name: (lambda m=module, p=params[name]: m(x, p)) for name, module in modules.items()}
            calls["eager_w8a8"] = lambda: int8.w8a8_linear(x, wq, ws)
            if rows <= int8_triton.FUSED_MAX_ROWS:
                calls["two_kernels"] = lambda: int8_triton.int8_matmul_scaled(*int8_triton.quantize_rows(x), wq, ws,
                                                                              torch.float16)
            reference = calls["blas_fp_linear"]().float().clone()
            line = {"layer": layer_name, "in": in_channels, "out": width, "rows": rows}
            for name, call in calls.items():
                output = call().float()
                if name in ("eager_w8a8", "two_kernels") and is_gated(activation):
                    error = None  # the eager path has no activation: its product is not the layer's output
                else:
                    error = round(((output - reference).abs().max() / reference.abs().max()).item(), 5)
                line[name] = {"device_us": round(triton.testing.do_bench(call, warmup=25, rep=100) * 1000, 1),
                              "host_us": round(host_us(call), 1), "max_rel_err": error}
            line["w8a8_over_fp16_device"] = round(line["lmi_w8a8_int8_linear"]["device_us"]
                                                  / line["blas_fp_linear"]["device_us"], 3)
            rows_out.append(line)
            print(json.dumps(line), flush=True)
    return rows_out


def config_rows(args: argparse.Namespace) -> list[dict]:
    """The Triton matmul alone under several block configurations at small row counts."""
    import triton.testing

    from quantization import int8, int8_triton

    small = [int8_triton.BlockConfig(16, n, k, w, s) for n in (32, 64, 128) for k in (128, 256)
             for w in (4, 8) for s in (3, 4)]
    large = [int8_triton.BlockConfig(m, n, k, w, s) for m in (32, 64, 128) for n in (64, 128) for k in (64, 128)
             for w in (4, 8) for s in (3,)]
    found = []
    for layer_name, in_channels, out_channels, activation_name in LAYERS:
        width = out_channels * (2 if activation_name == "SiGLU" else 1)
        wq, ws = int8.quantize_weight(torch.randn(width, in_channels, device="cuda"))
        for rows in (1, 16, 64, 512):
            candidates = small if rows <= 16 else large
            q, scale = int8_triton.quantize_rows(torch.randn(rows, in_channels, device="cuda", dtype=torch.float16))
            fp16 = torch.randn(width, in_channels, device="cuda", dtype=torch.float16)
            x = torch.randn(rows, in_channels, device="cuda", dtype=torch.float16)
            baseline = triton.testing.do_bench(lambda: x @ fp16.t(), warmup=25, rep=100) * 1000
            kernels = {"matmul_alone": lambda c: int8_triton.int8_matmul_scaled(q, scale, wq, ws, torch.float16,
                                                                                config=c)}
            if rows <= int8_triton.FUSED_MAX_ROWS:
                kernels["fused"] = lambda c: int8_triton.w8a8_fused(x, wq, ws, config=c)
            for kernel, call in kernels.items():
                timings = {}
                for config in candidates:
                    try:
                        timings[config] = triton.testing.do_bench(lambda c=config: call(c), warmup=10, rep=50) * 1000
                    except Exception as error:  # a configuration that needs more shared memory than there is
                        print(f"# {layer_name} rows={rows} {kernel} {config}: {type(error).__name__}", file=sys.stderr)
                best = min(timings, key=timings.get)
                default = int8_triton.FUSED_CONFIG if kernel == "fused" else int8_triton.block_config(rows)
                line = {"layer": layer_name, "rows": rows, "kernel": kernel, "fp16_matmul_us": round(baseline, 1),
                        "default": list(default), "default_us": round(timings.get(default, float("nan")), 1),
                        "best": list(best), "best_us": round(timings[best], 1),
                        "timings_us": {",".join(map(str, c)): round(t, 1) for c, t in timings.items()}}
                found.append(line)
                print(json.dumps(line), flush=True)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--configs", action="store_true", help="also sweep the Triton matmul's block configurations")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import deepspeed
    import triton

    header = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "deepspeed": deepspeed.__version__, "command": " ".join(sys.argv)}
    print(json.dumps(header), flush=True)
    lines = [header] + layer_rows(args) + (config_rows(args) if args.configs else [])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as out:
        for line in lines:
            out.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
