"""DeepSpeed's CUDA ops without `--use_fast_math`, for an A/B of its numerics (benchmarks only).

DeepSpeed 0.19.8 adds `--use_fast_math` to every CUDA op's nvcc arguments in one place,
`CUDAOpBuilder.nvcc_args` (deepspeed/ops/op_builder/builder.py); none of the v2 builders (InferenceCore,
RaggedOps, RaggedUtils, InferenceCutlass) overrides it. `apply()` makes that method leave the flag out. Every
process that builds or loads the ops must apply it, with its own TORCH_EXTENSIONS_DIR: torch's JIT loader
rebuilds an op whose flags differ from its build directory's, so a process without it would rebuild them with
fast math.

    import ds_no_fast_math; ds_no_fast_math.apply()
    from deepspeed.ops.op_builder import RaggedOpsBuilder; RaggedOpsBuilder().load()
"""

from __future__ import annotations

FLAG = "--use_fast_math"


def apply() -> None:
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder

    original = CUDAOpBuilder.nvcc_args
    if getattr(original, "without_fast_math", False):
        return

    def nvcc_args(self):  # type: ignore[no-untyped-def]
        return [arg for arg in original(self) if arg != FLAG]

    nvcc_args.without_fast_math = True  # type: ignore[attr-defined]
    CUDAOpBuilder.nvcc_args = nvcc_args  # type: ignore[method-assign]
