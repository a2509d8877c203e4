"""The engines this container knows, one entry each: what the engine can do, its column of the policy, how
to load it (rank 0, and the other ranks under tensor parallelism) and which exception means "this engine
cannot serve this model, try the next". The planner, the engine factory and the rank launcher ask this
registry; none of them names an engine.

Adding an engine is one loader module, one entry here (`register` does the same from a test) and its
verdicts in `handlers.engine_policy`. Registration order is preference order: on each device kind the
planner takes the first engine nothing rules out.

Loaders are named by module path and imported on first use: the planner reads this registry without torch,
and the loaders' modules import the planner's types, which would otherwise make an import cycle.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from handlers import fastgen_readiness
from handlers.engine_choice import EnginePlan
from handlers.engine_policy import (
    AUTOTP,
    AUTOTP_POLICY,
    CPU,
    CUDA,
    FASTGEN,
    FASTGEN_POLICY,
    KERNEL_INJECTION,
    KERNEL_INJECTION_POLICY,
    EnginePolicy,
)
from handlers.model_shape import ModelShape
from handlers.serving_properties import ServingProperties

Progress = Callable[[str], None]


class EngineLoader(Protocol):
    """Loads the planned engine on rank 0 and returns it ready to serve (a `RollingBatchEngine`)."""

    def __call__(self, properties: ServingProperties, plan: EnginePlan, model_path: str, progress: Progress,
                 description: str = "") -> Any: ...


class RankShard(Protocol):
    """What a rank > 0 holds: its runner (which replays rank 0's forward passes) and its process groups."""

    runner: Any
    groups: Any

    @property
    def weights_bytes(self) -> int: ...


class RankLoader(Protocol):
    def __call__(self, properties: ServingProperties, plan: EnginePlan, model_path: str,
                 progress: Progress) -> RankShard: ...


@dataclass(frozen=True)
class Ref:
    """A module attribute, "package.module:name", imported when first used. Calling it calls the attribute."""

    path: str

    def resolve(self) -> Any:
        module, _, name = self.path.partition(":")
        return getattr(importlib.import_module(module), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)


@dataclass(frozen=True)
class EngineEntry:
    name: str  # as plans, properties and logs name it
    title: str  # as sentences name it
    summary: str
    devices: frozenset[str]
    dtypes: frozenset[str]  # resolved dtypes (fp32/fp16/bf16) it can run
    dtype_reason: str
    continuous_batching: bool  # whether requests can join a running batch
    batching_reason: str
    policy: EnginePolicy  # preference reason, default verdicts, quantization modes, caveats
    loads_ds_checkpoint: bool = False  # option.checkpoint (an init_inference checkpoint description)
    cuda_graph: bool = False  # option.enable_cuda_graph
    single_rank: str | None = None  # why it runs at tensor_parallel_degree 1 only; None: any degree
    loader: EngineLoader | None = None  # None: the policy knows it, this container does not build it
    rank_loader: RankLoader | None = None  # ranks > 0 under tensor parallelism
    # An engine with a refusal falls back: any error while it loads re-plans without it. The refusal itself
    # (it checked and cannot serve this model) is logged in one line, anything else with its traceback.
    refusal: type[BaseException] | Ref | None = None
    switch: str | None = None  # a ServingProperties field: false turns the engine off; true (where it may be None,
    # "as the plan decides") insists on it, and a plan that cannot use it is an error naming why
    readiness: Callable[[str, Callable[[str], bool]], str | None] | None = None  # (device kind, importable)
    plan_notes: Callable[[ServingProperties, ModelShape], list[str]] | None = None

    @property
    def falls_back(self) -> bool:
        return self.refusal is not None

    def refused(self, error: BaseException) -> bool:
        """Whether `error` is this engine's own refusal rather than something going wrong."""
        kind = self.refusal.resolve() if isinstance(self.refusal, Ref) else self.refusal
        return kind is not None and isinstance(error, kind)


_BUILT_IN = (
    EngineEntry(
        name=FASTGEN,
        title="FastGen",
        summary="DeepSpeed-FastGen (deepspeed.inference.v2): ragged batching with a paged KV cache and fused CUDA "
                "kernels",
        devices=frozenset({CUDA}),
        dtypes=frozenset({"fp16", "bf16"}),
        dtype_reason="its model implementations raise 'Only fp16 and bf16 are supported' for any other dtype",
        continuous_batching=True,
        batching_reason="continuous batching is built in (requests join and leave the ragged batch every step)",
        policy=FASTGEN_POLICY,
        single_rank="this build drives FastGen on one GPU only (its ranks are not wired to the container's rank "
                    "launcher yet)",
        loader=Ref("handlers.fastgen_engine:load_fastgen_engine"),
        refusal=Ref("handlers.fastgen_model:FastGenUnsupported"),
        switch="fastgen",
        readiness=fastgen_readiness.unavailable,
        plan_notes=fastgen_readiness.plan_notes,
    ),
    EngineEntry(
        name=KERNEL_INJECTION,
        title="kernel injection",
        summary="deepspeed.init_inference(replace_with_kernel_inject=True): the model's layers replaced by "
                "DeepSpeed's fused CUDA kernels",
        devices=frozenset({CUDA}),
        dtypes=frozenset({"fp16", "bf16", "fp32"}),
        dtype_reason="",
        continuous_batching=False,
        batching_reason="the injected kernels keep one batch's K/V in DeepSpeed's workspace, every row advancing one "
                        "position per step, so requests cannot join a running batch; a dynamic batch runs to "
                        "completion before the next one starts",
        policy=KERNEL_INJECTION_POLICY,
        single_rank="this build drives the injected kernels on one GPU only (its ranks are not wired to the "
                    "container's rank launcher yet)",
        loader=Ref("handlers.kernel_injection_engine:load_kernel_injection_engine"),
        refusal=Ref("handlers.kernel_injection_model:KernelInjectionUnsupported"),
        switch="kernel_injection",
    ),
    EngineEntry(
        name=AUTOTP,
        title="AutoTP",
        summary="deepspeed.init_inference(tensor_parallel=...) AutoTP: the Hugging Face model's own layers, linear "
                "layers sharded across ranks",
        devices=frozenset({CPU, CUDA}),
        dtypes=frozenset({"fp16", "bf16", "fp32"}),
        dtype_reason="",
        continuous_batching=True,
        batching_reason="our rolling batch (handlers.rolling_batch) runs continuous batching on top of the HF layers",
        policy=AUTOTP_POLICY,
        loads_ds_checkpoint=True,
        loader=Ref("handlers.autotp_engine:load_autotp_engine"),
        rank_loader=Ref("handlers.autotp_engine:load_autotp_model"),
    ),
)

_entries: dict[str, EngineEntry] = {entry.name: entry for entry in _BUILT_IN}


def engines() -> Mapping[str, EngineEntry]:
    """Every registered engine, best first."""
    return dict(_entries)


def entry(name: str) -> EngineEntry:
    try:
        return _entries[name]
    except KeyError:
        raise KeyError(f"no engine {name!r} is registered (registered: {', '.join(_entries)})") from None


def preference(device_kind: str) -> tuple[str, ...]:
    """The engines that run on `device_kind`, best first."""
    return tuple(name for name, known in _entries.items() if device_kind in known.devices)


def built() -> frozenset[str]:
    """The engines this container can start (those with a loader)."""
    return frozenset(name for name, known in _entries.items() if known.loader is not None)


def register(new: EngineEntry, before: str | None = None) -> EngineEntry | None:
    """Add `new` before the engine named `before` (at the end when None), or, when an engine of its name is
    registered, put it in that one's place. Returns the entry it replaced, if any."""
    global _entries
    replaced = _entries.get(new.name)
    if replaced is not None:
        _entries = {name: new if name == new.name else known for name, known in _entries.items()}
        return replaced
    if before is not None and before not in _entries:
        raise KeyError(f"no engine {before!r} is registered to insert {new.name!r} before")
    names = list(_entries)
    names.insert(names.index(before) if before is not None else len(names), new.name)
    _entries = {name: new if name == new.name else _entries[name] for name in names}
    return None


def unregister(name: str) -> EngineEntry:
    global _entries
    removed = entry(name)
    _entries = {other: known for other, known in _entries.items() if other != name}
    return removed
