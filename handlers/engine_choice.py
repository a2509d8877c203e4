"""What the planner decides: the engine, its ranks, dtype and batching (`EnginePlan`), on which device, or
why no engine can serve (`PlanError`). Data only, so that the engines' loaders and the registry can name
these types without importing the planner (which reads the registry)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal

from handlers.engine_policy import CUDA


@dataclass(frozen=True)
class Device:
    kind: Literal["cpu", "cuda"]
    count: int  # visible GPUs for cuda; 1 (the host) for cpu
    name: str

    def __str__(self) -> str:
        if self.kind == CUDA:
            return f"{self.count} x {self.name}"
        return f"CPU ({self.name})"


@dataclass(frozen=True)
class PlanProblem:
    key: str  # the property (or model fact) at fault
    value: Any
    message: str

    def describe(self, source: str | None = None) -> str:
        where = f" (from {source})" if source else ""
        return f"{self.key}={_show(self.value)}{where}: {self.message}"


class PlanError(ValueError):
    """The configuration is valid on its own but cannot serve this model on this device.

    `describe(source_of)` names where each offending property came from; `str()` does without."""

    def __init__(self, problems: list[PlanProblem]):
        self.problems = problems
        super().__init__(self.describe())

    @property
    def key(self) -> str:
        return self.problems[0].key

    def describe(self, source_of: Callable[[str], str | None] | None = None) -> str:
        count = len(self.problems)
        lines = [f"cannot serve this model with this configuration ({count} problem{'s' if count != 1 else ''}):"]
        lines += [f"  - {p.describe(source_of(p.key) if source_of else None)}" for p in self.problems]
        return "\n".join(lines)


@dataclass(frozen=True)
class EnginePlan:
    engine: str  # "fastgen", "kernel_injection" or "autotp"
    reason: str
    ruled_out: list[tuple[str, str]]  # (engine, why not), every engine not chosen
    tensor_parallel_degree: int  # ranks to launch
    dtype: str  # "fp32", "fp16" or "bf16"
    rolling_batch: bool  # whether requests join a running batch (continuous batching)
    architecture: str  # e.g. LlamaForCausalLM (the model_type when config.json names none)
    model_type: str
    device: Device
    quantize: str | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "reason": self.reason,
            "ruled_out": [{"engine": engine, "why": why} for engine, why in self.ruled_out],
            "tensor_parallel_degree": self.tensor_parallel_degree,
            "dtype": self.dtype,
            "rolling_batch": self.rolling_batch,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "device": asdict(self.device),
            "quantize": self.quantize,
            "notes": list(self.notes),
        }


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(getattr(value, "value", value))
