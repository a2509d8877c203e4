"""Fail fast when a model's weights cannot fit where they would be loaded.

Without this, a model too large for the machine is found out minutes into loading: the kernel's OOM killer
ends the process with no message (exit 137, in a container bounded by its cgroup limit), or CUDA raises
out-of-memory half-way through the shards. The weights' size is known before loading anything: the
parameter count from the safetensors headers (metadata only) times the planned dtype's width. `serve`
compares it with the memory the weights would occupy:
  - GPU: each of the first `tensor_parallel_degree` GPUs holds 1/degree of the weights; compared with each
    one's free memory (`torch.cuda.mem_get_info`);
  - CPU: every rank shares the host's memory; compared with MemAvailable and, inside a container, the
    cgroup's limit minus its usage.
Only the weights are counted (the KV cache, activations and the runtime come on top), so a model this check
passes may still not fit; a model it rejects never could. Quantized plans and checkpoints without
safetensors (pickled .bin) are not checked: their loaded size is not known from the files alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handlers.engine_plan import PlanError, PlanProblem

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
GIB = 2**30


@dataclass(frozen=True)
class Budget:
    """Where the weights would go: bytes free on each device that holds a share, and a description."""

    free_per_device: list[int]
    where: str


def checkpoint_parameters(model_dir: Path) -> int | None:
    """Parameters in the safetensors checkpoint of `model_dir` (headers only), or None if it has none."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="numpy") as checkpoint:
            for name in checkpoint.keys():
                total += math.prod(checkpoint.get_slice(name).get_shape())
    return total


def host_budget() -> Budget:
    """The host memory a process may still take: MemAvailable, bounded by the cgroup limit (containers)."""
    from handlers.host_memory import available_host_memory

    available = available_host_memory()
    if available is None:
        return Budget([], "unknown")
    free, where = available
    return Budget([free], where)


def gpu_budget(degree: int) -> Budget:
    import torch

    free = [torch.cuda.mem_get_info(index)[0] for index in range(degree)]
    return Budget(free, f"{min(free) / GIB:.1f} GiB free on the smallest of {degree} GPU(s) "
                        f"({torch.cuda.get_device_name(0)})")


def check_weights_fit(report: dict[str, Any], budget: Budget | None = None) -> None:
    """Raise PlanError if the planned model's weights exceed `budget` (default: measured for the plan's
    device). `report` is `entrypoint.cli.build_report`'s dict."""
    plan, model = report["plan"], report["model"]
    width = DTYPE_BYTES.get(plan["dtype"])
    if width is None or plan.get("quantize"):
        return
    parameters = checkpoint_parameters(Path(model["path"]))
    if parameters is None:
        return
    degree = int(plan["tensor_parallel_degree"])
    on_gpu = plan["device"]["kind"] == "cuda"
    if budget is None:
        budget = gpu_budget(degree) if on_gpu else host_budget()
    if not budget.free_per_device:
        return
    weights = parameters * width
    share = weights / degree if on_gpu else weights  # CPU ranks share one host's memory
    if share <= min(budget.free_per_device):
        return
    needs = (f"{weights / GIB:.1f} GiB of weights ({parameters / 1e9:.2f} B parameters in {plan['dtype']})"
             + (f", {share / GIB:.1f} GiB on each of {degree} GPUs" if on_gpu and degree > 1 else ""))
    remedies = ["a machine with more memory"]
    if on_gpu:
        remedies.append(f"a higher option.tensor_parallel_degree (now {degree}; this machine has "
                        f"{plan['device']['count']} GPUs)")
    if plan["dtype"] == "fp32":
        remedies.append("option.dtype=bf16 or fp16 (half the size)")
    remedies.append("quantization (option.quantize)")
    raise PlanError([PlanProblem(
        "model", model["path"],
        f"too large for this machine: it needs {needs}, but there are only {budget.where}. "
        f"Use {', or '.join(remedies)}. (Only the weights are counted; the KV cache needs memory too.)")])
