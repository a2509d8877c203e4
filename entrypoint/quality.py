"""`python -m entrypoint quality`: the int8 paths' quality on held-out text as one JSON object on stdout
(the measurement is `quantization.evaluate`; this is its command line, which also finds the embedded model
and describes the machine)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    import quantization.evaluate as evaluation
    from quantization.evaluate import VARIANTS

    parser = argparse.ArgumentParser(prog="python -m entrypoint quality", description=evaluation.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="a Hugging Face model directory (default: the embedded model)")
    parser.add_argument("--windows", type=int, default=16, help="held-out windows (default 16)")
    parser.add_argument("--window-tokens", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the model runs (default cpu); cuda: the first visible GPU")
    args = parser.parse_args(argv)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; allowed: {', '.join(VARIANTS)}")
    # stdout carries the JSON object alone: libraries' log lines (DeepSpeed logs to stdout, binding the stream
    # when it is first imported, which happens inside this block) go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        from handlers.engine_plan import cpu_device, detect_device

        machine = cpu_device() if args.device == "cpu" else detect_device()
        if machine.kind != args.device:
            parser.error(f"--device {args.device}: no CUDA GPU is visible to this process ({machine.name})")
        model_dir = args.model_dir
        if model_dir is None:
            from entrypoint.embedded_model import ensure_embedded_model
            from quantization.calibration_cache import default_cache_dir
            model_dir = ensure_embedded_model(default_cache_dir())
        command = "python -m entrypoint quality " + " ".join(argv if argv is not None else sys.argv[1:])
        report = {"command": command, "model": str(model_dir), **evaluation.environment(machine.name),
                  **evaluation.evaluate(model_dir, args.windows, args.window_tokens, variants, args.device)}
    print(json.dumps(report, indent=2))
    return 0
