"""The engine plan: which engine serves the model, on how many ranks, in which dtype, with what batching.

`plan_engine` is pure: validated properties + the model's HF config dict + the device in, an `EnginePlan`
(or a `PlanError` listing every problem) out. It imports no torch and reads no weights, so `plan` can
print it in a fraction of a second and `serve` can refuse a bad combination before loading anything.
The per-architecture knowledge lives in `handlers.engine_policy`, what each engine can do in
`handlers.engine_registry`; this module only applies them, and names no engine.
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
import platform
from typing import Any, Callable, Collection, Mapping

from handlers import engine_registry
from handlers.engine_choice import Device, EnginePlan, PlanError, PlanProblem
from handlers.engine_policy import (
    CPU,
    CUDA,
    QUANTIZATION,
    TENSOR_PARALLEL_REFUSED,
    ArchitecturePolicy,
    QuantizationSupport,
    policy_for,
)
from handlers.engine_registry import EngineEntry
from handlers.model_shape import ModelShape
from handlers.serving_properties import DType, RollingBatch, ServingProperties
from quantization.families import family_for

# The plan's types, where the planner's callers have always found them.
__all__ = ["Device", "EnginePlan", "ModelShape", "PlanError", "PlanProblem", "cpu_device", "detect_device",
           "module_importable", "plan_engine"]

# Device nodes the NVIDIA driver creates (/dev/dxg: WSL). Without any, CUDA cannot work, and checking them
# costs microseconds where `import torch` costs seconds.
_GPU_DEVICE_NODES = ("/dev/nvidia[0-9]*", "/dev/dxg")


# ---- what is installed --------------------------------------------------------------------------------
def module_importable(name: str) -> bool:
    """Whether `name` could be imported, without importing it (find_spec reads the path only: `plan` stays
    fast and imports no torch). `plan_engine` takes another checker in tests that fake a GPU machine."""
    return importlib.util.find_spec(name) is not None


# ---- the device -----------------------------------------------------------------------------------------
def cpu_device() -> Device:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return Device(CPU, 1, f"{_cpu_model()}, {cores} cores")


def detect_device() -> Device:
    """The GPUs this process may use (torch honours CUDA_VISIBLE_DEVICES), or the CPU.

    torch is imported only when a GPU can exist at all: CUDA_VISIBLE_DEVICES hiding every GPU, or no NVIDIA
    device node, answers "cpu" without paying for `import torch` (seconds), which keeps `plan` fast on
    CPU machines."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return cpu_device()
    if not any(glob.glob(pattern) for pattern in _GPU_DEVICE_NODES):
        return cpu_device()
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return cpu_device()
    return Device(CUDA, torch.cuda.device_count(), torch.cuda.get_device_name(0))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown CPU"


def plan_engine(properties: ServingProperties, model_config: Mapping[str, Any], device: Device,
                available: Collection[str] | None = None,
                quantizers: Collection[str] | None = None,
                failed: Mapping[str, str] | None = None,
                importable: Callable[[str], bool] | None = None) -> EnginePlan:
    """`available`: the engines this build can start (`handlers.engine_registry.built()`) and `quantizers` the
    quantization methods it can apply (`entrypoint.engine_factory.QUANTIZERS`); None plans with the whole
    policy table, as if everything were built. `failed`: engines that were tried for this model and could not
    serve it, with why (the engine factory plans again without them). `importable`: whether a Python module is
    installed (default `module_importable`), for the packages an engine needs before it loads weights."""
    importable = importable if importable is not None else module_importable
    shape = ModelShape.from_config(model_config)
    arch = policy_for(shape.model_type)
    quant = QUANTIZATION[properties.quantize.value] if properties.quantize is not None else None
    problems: list[PlanProblem] = []
    notes: list[str] = []

    dtype = _resolve_dtype(properties, shape, device, quant, problems, notes)
    degree = _resolve_degree(properties.tensor_parallel_degree, shape, device, problems, notes)
    if problems:  # engine choice depends on dtype and degree; report these first
        raise PlanError(problems)

    def blocker(entry: EngineEntry) -> str | None:
        reason = _blocker(entry, arch, model_config, properties, quant, dtype, device)
        if reason is None:
            reason = _unready(entry, properties, degree, device, importable)
        if failed and entry.name in failed:
            reason = f"tried first and could not serve this model: {failed[entry.name]}"
        if reason is None and available is not None and entry.name not in available:
            reason = "not built into this container yet (only " + ", ".join(sorted(available)) + " is)"
        return reason

    blockers = {name: blocker(entry) for name, entry in engine_registry.engines().items()}
    _check_quantize(properties, quant, arch, model_config, device, problems)
    if quant is not None and quantizers is not None and quant.method not in quantizers:
        problems.append(PlanProblem("quantize", properties.quantize,
                                    "not built into this container yet (the quantization package has no "
                                    f"{quant.method} yet); unset quantize to serve the model unquantized"))
    _check_cuda_graph(properties, device, blockers, problems)
    if problems:
        raise PlanError(problems)

    insisted = _insisted(properties, device, blockers)
    engine, rolling, ruled_out = _choose(properties.rolling_batch, device, blockers, shape, notes, arch, insisted)
    notes.extend(_chosen_notes(engine_registry.entry(engine), arch, shape, properties, quant))
    return EnginePlan(
        engine=engine,
        reason=_reason(engine, arch, device, rolling, properties.rolling_batch, insisted == engine),
        ruled_out=ruled_out,
        tensor_parallel_degree=degree,
        dtype=dtype,
        rolling_batch=rolling,
        architecture=shape.architecture or arch.model_type,
        model_type=shape.model_type or arch.model_type,
        device=device,
        quantize=quant.method if quant is not None else None,
        notes=notes,
    )


# ---- the steps of plan_engine -------------------------------------------------------------------------
def _resolve_dtype(properties: ServingProperties, shape: ModelShape, device: Device,
                   quant: QuantizationSupport | None, problems: list[PlanProblem], notes: list[str]) -> str:
    requested = properties.dtype
    if requested is DType.AUTO:
        if device.kind == CPU:
            notes.append("dtype=auto resolves to fp32 on CPU")
            return "fp32"
        if quant is not None and quant.dtype is not None:
            notes.append(f"dtype=auto resolves to {quant.dtype}: quantize={quant.method} needs {quant.dtype} activations")
            return quant.dtype
        if shape.checkpoint_dtype in ("fp16", "bf16"):
            notes.append(f"dtype=auto resolves to {shape.checkpoint_dtype}, the checkpoint's dtype")
            return shape.checkpoint_dtype
        notes.append(f"dtype=auto resolves to fp16 on GPU (the checkpoint's dtype is "
                     f"{shape.checkpoint_dtype or 'not recorded in config.json'})")
        return "fp16"
    if requested is DType.FP16 and device.kind == CPU:
        # Refused rather than warned: most CPUs have no fp16 GEMM kernels, so PyTorch's CPU fp16 matmuls are
        # many times slower than fp32 and a server configured this way would look hung.
        problems.append(PlanProblem("dtype", requested, "fp16 on CPU is refused: PyTorch's CPU fp16 matmuls are "
                                    "very slow; use dtype=fp32 (or auto), or bf16 on a CPU with AVX512-BF16 or AMX"))
    elif requested is DType.BF16 and device.kind == CPU:
        notes.append("dtype=bf16 on CPU is fast only on CPUs with AVX512-BF16 or AMX; elsewhere fp32 is faster")
    return requested.value


def _resolve_degree(requested: int | str, shape: ModelShape, device: Device,
                    problems: list[PlanProblem], notes: list[str]) -> int:
    if requested == "max":
        # On a CPU-only machine "max" means one process: AutoTP ranks on one host share its cores and memory
        # bandwidth, so more CPU ranks are an explicit choice (an integer), never the default.
        degree = device.count if device.kind == CUDA else 1
        shown = f"max (= {degree} visible GPU{'s' if degree != 1 else ''})" if device.kind == CUDA else "max"
        notes.append(f"tensor_parallel_degree=max resolves to {degree}"
                     + ("" if device.kind == CUDA else " on a CPU-only machine (one process; set an integer for "
                                                      "several CPU ranks)"))
    else:
        degree = int(requested)
        shown = str(degree)

    if device.kind == CUDA and degree > device.count:
        problems.append(PlanProblem("tensor_parallel_degree", requested,
                                    f"needs {degree} GPUs (one per rank), but only {device.count} "
                                    f"{'is' if device.count == 1 else 'are'} visible ({device.name})"))
    if shape.heads is None:
        notes.append("config.json names no attention head count, so tensor_parallel_degree was not checked "
                     "against it")
    elif shape.heads % degree or shape.kv_heads % degree:
        valid = [d for d in range(1, math.gcd(shape.heads, shape.kv_heads) + 1)
                 if shape.heads % d == 0 and shape.kv_heads % d == 0]
        problems.append(PlanProblem("tensor_parallel_degree", requested,
                                    f"{shown} does not divide the model's {shape.heads} attention heads and "
                                    f"{shape.kv_heads} key/value heads evenly (every rank must hold whole heads); "
                                    f"valid degrees: {', '.join(map(str, valid))}"))
    if degree > 1:
        why = TENSOR_PARALLEL_REFUSED.get(shape.model_type or "") or _unshardable_checkpoint(shape)
        if why is not None:
            problems.append(PlanProblem("tensor_parallel_degree", requested,
                                        f"{shown}: {shape.architecture or shape.model_type} cannot be sharded across "
                                        f"ranks: {why}; use tensor_parallel_degree=1"))
    return degree


def _unshardable_checkpoint(shape: ModelShape) -> str | None:
    """Why each rank cannot read its slices of this architecture's checkpoint, or None. transformers converts
    some checkpoints on load with transforms that merge or split tensors (stacking MoE experts, splitting a
    fused projection); a rank reading only its slices cannot apply those (handlers/sharded_checkpoint.py)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    for name in (shape.architecture, shape.model_type):
        transforms = get_checkpoint_conversion_mapping(name) if name else None
        if transforms is None:
            continue
        merged = [t for t in transforms if not isinstance(t, WeightRenaming)]
        if merged:
            return (f"transformers converts its checkpoint on load by merging or splitting tensors "
                    f"({type(merged[0]).__name__} for {', '.join(merged[0].source_patterns)}), which a rank reading "
                    "only its own slices of each tensor cannot do")
        return None
    return None


def _blocker(spec: EngineEntry, arch: ArchitecturePolicy, model_config: Mapping[str, Any],
             properties: ServingProperties, quant: QuantizationSupport | None, dtype: str,
             device: Device) -> str | None:
    """Why `spec` cannot serve this model and configuration on this device, or None if it can."""
    if device.kind not in spec.devices:
        return "runs on GPU only, and no GPU is visible"
    verdict = arch.verdict(spec.name, spec.policy)
    if not verdict.supported:
        return f"{arch.model_type}: {verdict.reason}"
    config = model_config.get("text_config") if isinstance(model_config.get("text_config"), Mapping) else model_config
    for condition in arch.conditions:
        if condition.engine == spec.name and config.get(condition.key, condition.default) != condition.expected:
            return f"{condition.reason} (config.json: {condition.key}={config.get(condition.key)!r})"
    if dtype not in spec.dtypes:
        return f"dtype {dtype} is not supported: {spec.dtype_reason}"
    if quant is not None and not spec.policy.quantization_verdict(quant.method).supported:
        return f"quantize={quant.method}: {spec.policy.quantization_verdict(quant.method).reason}"
    if properties.checkpoint is not None and not spec.loads_ds_checkpoint:
        return (f"checkpoint={properties.checkpoint}: it loads Hugging Face checkpoints (or its own format), not "
                "init_inference checkpoint descriptions")
    if properties.enable_cuda_graph and not spec.cuda_graph:
        return "enable_cuda_graph=true: it captures no CUDA graphs"
    return None


def _unready(entry: EngineEntry, properties: ServingProperties, degree: int, device: Device,
             importable: Callable[[str], bool]) -> str | None:
    """Why `entry`, which the policy allows, cannot start here: turned off, one rank only, or what it needs
    on this machine is missing. None if it can."""
    if entry.switch is not None and getattr(properties, entry.switch) is False:
        return f"{entry.switch}=false: {entry.title} turned off by configuration"
    if entry.single_rank is not None and degree > 1:
        return f"tensor_parallel_degree={degree}: {entry.single_rank}"
    if entry.readiness is not None:
        return entry.readiness(device.kind, importable)
    return None


def _chosen_notes(entry: EngineEntry, arch: ArchitecturePolicy, shape: ModelShape, properties: ServingProperties,
                  quant: QuantizationSupport | None) -> list[str]:
    """What the plan says about the engine it chose."""
    notes = []
    if not arch.known:
        notes.append(f"model_type {shape.model_type or '(none in config.json)'} is not in the engine policy table "
                     "(handlers/engine_policy.py); AutoTP serves it because it handles any Hugging Face model")
    if quant is not None:
        verdict = entry.policy.quantization_verdict(quant.method)
        notes.append(f"quantize={quant.method} on {entry.name}: {verdict.reason}")
    notes.extend(entry.policy.caveats)
    if entry.plan_notes is not None:
        notes.extend(entry.plan_notes(properties, shape))
    if shape.context is not None and properties.max_tokens > shape.context:
        notes.append(f"max_tokens={properties.max_tokens} is capped by the model's context of {shape.context} tokens")
    return notes


def _check_quantize(properties: ServingProperties, quant: QuantizationSupport | None, arch: ArchitecturePolicy,
                    model_config: Mapping[str, Any], device: Device, problems: list[PlanProblem]) -> None:
    if quant is None:
        return
    data = properties.smoothquant_calibration_data
    if data is not None and not os.path.isfile(os.path.expanduser(data)):
        problems.append(PlanProblem("smoothquant_calibration_data", data,
                                    f"no such file (relative paths start at {os.getcwd()}); give a UTF-8 text file, "
                                    "or unset it to calibrate on Python's pydoc_data topics"))
    if device.kind not in quant.devices:
        problems.append(PlanProblem("quantize", properties.quantize,
                                    f"needs a GPU and none is visible: {quant.device_reason}"))
    elif quant.per_architecture and not arch.smoothquant.supported:
        problems.append(PlanProblem("quantize", properties.quantize,
                                    f"not available for model_type {arch.model_type}: {arch.smoothquant.reason}"))
    elif quant.per_architecture:
        # Some configurations of a mapped family put the norm where no factor can be folded into it.
        family = family_for(arch.model_type)
        config = model_config.get("text_config") if isinstance(model_config.get("text_config"), Mapping) else model_config
        refusal = family.refuse(config) if family is not None else None
        if refusal:
            problems.append(PlanProblem("quantize", properties.quantize, f"{refusal}; use quantize=dynamic_int8"))


def _check_cuda_graph(properties: ServingProperties, device: Device, blockers: Mapping[str, str | None],
                      problems: list[PlanProblem]) -> None:
    if not properties.enable_cuda_graph:
        return
    capable = [name for name, spec in engine_registry.engines().items() if spec.cuda_graph]
    if not capable:
        problems.append(PlanProblem("enable_cuda_graph", True,
                                    "no engine of this container captures CUDA graphs (DeepSpeed's capture replays "
                                    "one input shape, and kernel injection's attention mask grows every step); set "
                                    "enable_cuda_graph=false"))
    elif device.kind != CUDA:
        problems.append(PlanProblem("enable_cuda_graph", True, "CUDA graphs need a GPU; no GPU is visible"))
    elif all(blockers[name] is not None for name in capable):
        why = "; ".join(f"{name}: {blockers[name]}" for name in capable)
        problems.append(PlanProblem("enable_cuda_graph", True,
                                    f"CUDA graphs exist only in {', '.join(capable)}, which cannot serve this model "
                                    f"({why}); set enable_cuda_graph=false"))


def _insisted(properties: ServingProperties, device: Device, blockers: Mapping[str, str | None]) -> str | None:
    """The engine a property set to true insists on (`EngineEntry.switch` of an engine that may be left to the
    plan), or None; a plan error names why it cannot serve when it cannot."""
    for name, entry in engine_registry.engines().items():
        if entry.switch is None or ServingProperties.model_fields[entry.switch].default is not None:
            continue  # a switch that defaults to on only turns its engine off
        if getattr(properties, entry.switch) is True:
            if blockers[name] is not None:
                raise PlanError([PlanProblem(entry.switch, True, f"{entry.title} cannot serve this model here: "
                                             f"{blockers[name]}; unset {entry.switch} to let the plan choose")])
            return name
    return None


def _choose(mode: RollingBatch, device: Device, blockers: Mapping[str, str | None], shape: ModelShape,
            notes: list[str], arch: ArchitecturePolicy | None = None,
            insisted: str | None = None) -> tuple[str, bool, list[tuple[str, str]]]:
    """Pick the engine. Returns (engine, continuous batching on, ruled out).

    rolling_batch semantics: `auto` wants continuous batching and takes the best engine that has it, falling
    back to static batches only when the configuration leaves no such engine (e.g. enable_cuda_graph) or the
    architecture's measured-fastest engine batches dynamically (`ArchitecturePolicy.prefer`); `deepspeed`
    insists on it; `disable` takes the best engine outright and batches statically. An engine a property
    insists on (`insisted`) is taken under auto and disable."""
    engines = engine_registry.engines()
    ranking = engine_registry.preference(device.kind)
    prefer = [name for name in (arch.prefer if arch is not None else ()) if name in ranking]
    ranking = tuple(prefer) + tuple(name for name in ranking if name not in prefer)
    feasible = [name for name in ranking if blockers[name] is None]
    if not feasible:
        why = "; ".join(f"{name}: {reason}" for name, reason in blockers.items())
        raise PlanError([PlanProblem("model_type", shape.model_type, f"no engine can serve this configuration ({why})")])

    with_batching = [name for name in feasible if engines[name].continuous_batching]
    if insisted is not None and mode is RollingBatch.DEEPSPEED and not engines[insisted].continuous_batching:
        raise PlanError([PlanProblem("rolling_batch", mode,
                                     f"rolling_batch=deepspeed needs continuous batching, and the insisted-on "
                                     f"{insisted} has none: {engines[insisted].batching_reason}. Set "
                                     "rolling_batch=auto or disable")])
    if insisted is not None:
        chosen, rolling = insisted, engines[insisted].continuous_batching and mode is not RollingBatch.DISABLE
    elif mode is RollingBatch.AUTO and prefer and feasible[0] in prefer and not engines[feasible[0]].continuous_batching:
        chosen, rolling = feasible[0], False
        notes.append(f"rolling_batch=auto: {chosen} measured fastest for {arch.model_type} and batches dynamically "
                     f"({engines[chosen].batching_reason}); batch_size and max_batch_delay set its batches")
    elif mode is RollingBatch.DISABLE:
        chosen, rolling = feasible[0], False
        notes.append("rolling_batch=disable: dynamic batching as DJL Serving did it: requests that arrive within "
                     "max_batch_delay of the first form one batch of at most batch_size, which runs to completion "
                     "before the next one forms (each request still finishes and streams on its own)")
    elif with_batching:
        chosen, rolling = with_batching[0], True
    elif mode is RollingBatch.AUTO:
        chosen, rolling = feasible[0], False
        notes.append(f"rolling_batch=auto: continuous batching is off because only {chosen} can serve this "
                     f"configuration, and {engines[chosen].batching_reason}")
    else:
        capable = [name for name, spec in engines.items() if spec.continuous_batching]
        why = "; ".join(f"{name}: {blockers[name]}" for name in capable)
        raise PlanError([PlanProblem("rolling_batch", mode,
                                     f"continuous batching needs {' or '.join(capable)}, and neither can serve this "
                                     f"configuration ({why}); {feasible[0]} can, but "
                                     f"{engines[feasible[0]].batching_reason}. Set rolling_batch=auto or disable")])

    ruled_out: list[tuple[str, str]] = []
    for name in engines:
        if name == chosen:
            continue
        if blockers[name] is not None:
            ruled_out.append((name, blockers[name]))
        elif rolling and not engines[name].continuous_batching:
            ruled_out.append((name, f"no continuous batching: {engines[name].batching_reason} "
                                    "(set rolling_batch=disable to use it)"))
        elif name in prefer and chosen not in prefer:
            ruled_out.append((name, "set rolling_batch=auto or disable to use it"))
        elif chosen in prefer:
            ruled_out.append((name, f"{chosen} measured faster for {arch.model_type}: "
                                    f"{arch.verdict(chosen, engines[chosen].policy).reason}"))
        else:
            ruled_out.append((name, f"ranks below {chosen} on {_DEVICE_WORDS[device.kind]}: "
                                    f"{engines[name].policy.preference_reason}"))
    return chosen, rolling, ruled_out


def _reason(engine: str, arch: ArchitecturePolicy, device: Device, rolling: bool, mode: RollingBatch,
            insisted: bool = False) -> str:
    spec = engine_registry.entry(engine)
    ranking = engine_registry.preference(device.kind)
    where = _DEVICE_WORDS[device.kind]
    if insisted:
        lead = f"{spec.switch}=true insists on it"
    elif len(ranking) == 1:
        lead = f"the only engine that runs on {where}"
    elif arch.prefer and engine == arch.prefer[0]:
        lead = f"the engine measured fastest for {arch.model_type} on {where}"
    elif engine == ranking[0]:
        lead = f"the preferred engine on {where}: {spec.policy.preference_reason}"
    else:
        lead = f"the best engine on {where} that can serve this configuration (see ruled out)"
    batching = ("continuous batching on: " + spec.batching_reason) if rolling else \
        f"dynamic batches (rolling_batch={mode.value}: batch_size, max_batch_delay)"
    return f"{spec.summary}; {lead}; {arch.model_type}: {arch.verdict(engine, spec.policy).reason}; {batching}"


_DEVICE_WORDS = {CPU: "CPU", CUDA: "GPU"}
