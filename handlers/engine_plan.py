"""The engine plan: which engine serves the model, on how many ranks, in which dtype, with what batching.

`plan_engine` is pure: validated properties + the model's HF config dict + the device in, an `EnginePlan`
(or a `PlanError` listing every problem) out. It imports no torch and reads no weights, so `plan` can
print it in a fraction of a second and `serve` can refuse a bad combination before loading anything.
The per-architecture knowledge lives in `handlers.engine_policy`; this module only applies it.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import math
import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Literal, Mapping

from handlers.serving_properties import DType, RollingBatch, ServingProperties
from quantization.families import family_for
from handlers.engine_policy import (
    CPU,
    CUDA,
    ENGINES,
    FASTGEN,
    PREFERENCE,
    PREFERENCE_REASONS,
    QUANTIZATION,
    TENSOR_PARALLEL_REFUSED,
    ArchitecturePolicy,
    EngineSpec,
    QuantizationSupport,
    policy_for,
)

# Where HF configs keep each number, in probe order (the same names DeepSpeed's AutoTP probes, so the
# divisibility check here agrees with how AutoTP will shard).
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HEAD_KEYS = ("num_attention_heads", "num_heads", "n_heads", "n_head", "attention_heads")
_KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv", "kv_n_heads")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
_DTYPE_KEYS = ("torch_dtype", "dtype")  # transformers 4 writes torch_dtype, 5 writes dtype
_CHECKPOINT_DTYPES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}

# FastGen's RMSNorm (deepspeed/inference/v2/modules/configs/norm_config.py) ignores the model's eps.
_FASTGEN_NORM_EPS = 1e-5

# Device nodes the NVIDIA driver creates (/dev/dxg: WSL). Without any, CUDA cannot work, and checking them
# costs microseconds where `import torch` costs seconds.
_GPU_DEVICE_NODES = ("/dev/nvidia[0-9]*", "/dev/dxg")


# ---- what is installed --------------------------------------------------------------------------------
def module_importable(name: str) -> bool:
    """Whether `name` could be imported, without importing it (find_spec reads the path only: `plan` stays
    fast and imports no torch). `plan_engine` takes another checker in tests that fake a GPU machine."""
    return importlib.util.find_spec(name) is not None


def _fastgen_kernels_missing(importable: Callable[[str], bool]) -> str | None:
    """Why FastGen cannot start on this machine before any weight is read, or None. The same check
    `handlers.fastgen_engine.load_fastgen_engine` makes at load time (which stays as a second line of
    defence): without it `plan` named fastgen where `serve` then fell back to the next engine."""
    from handlers.fastgen_model import KERNELS_MODULE  # no torch at import; the module name lives there

    if importable(KERNELS_MODULE):
        return None
    return (f"the deepspeed-kernels package (module {KERNELS_MODULE}) is not installed: "
            "pip install 'lmi-deepspeed[gpu]' (FastGen's blocked flash attention lives in it)")


#: DeepSpeed's ops FastGen runs, by the names `installed_ops` records (the Dockerfile prebuilds them)
FASTGEN_OPS = ("inference_core_ops", "ragged_device_ops", "ragged_ops")


def deepspeed_directory() -> Path | None:
    """Where the installed deepspeed package is, found without importing it."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def deepspeed_prebuilt_ops() -> dict[str, bool]:
    """The installed DeepSpeed's `installed_ops` (which ops its wheel carries compiled), read from its
    git_version_info_installed.py without importing deepspeed (that imports torch: `plan` stays fast)."""
    directory = deepspeed_directory()
    if directory is None:
        return {}
    path = directory / "git_version_info_installed.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "installed_ops" for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return {}
            return {str(k): bool(v) for k, v in value.items()} if isinstance(value, dict) else {}
    return {}


#: where torch.utils.cpp_extension looks for the CUDA toolkit when CUDA_HOME is not set
DEFAULT_CUDA_HOME = Path("/usr/local/cuda")


def cuda_compiler() -> str | None:
    """The nvcc DeepSpeed's just-in-time build would use, found where torch.utils.cpp_extension looks for the
    CUDA toolkit (CUDA_HOME / CUDA_PATH, then nvcc on PATH, then /usr/local/cuda), or None."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for candidate in ([Path(home, "bin", "nvcc")] if home else []) + [DEFAULT_CUDA_HOME / "bin" / "nvcc"]:
        if candidate.is_file():
            return str(candidate)
    return shutil.which("nvcc")


def fastgen_ops_unavailable() -> str | None:
    """Why DeepSpeed's FastGen ops could not load here, or None: each is prebuilt, or nvcc can build it on
    first use (about 2 minutes for all in parallel on 16 cores, longer serially). Without either, building
    FastGen would fail after the gate's reference had loaded; `plan` and the loader refuse it first."""
    prebuilt = deepspeed_prebuilt_ops()
    missing = [op for op in FASTGEN_OPS if not prebuilt.get(op)]
    if not missing or cuda_compiler() is not None:
        return None
    return (f"DeepSpeed's FastGen ops ({', '.join(missing)}) are not prebuilt in this installation and no CUDA "
            "compiler (nvcc) was found to build them: use the GPU image, which prebuilds them, or install the CUDA "
            "toolkit")


# ---- the device -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    kind: Literal["cpu", "cuda"]
    count: int  # visible GPUs for cuda; 1 (the host) for cpu
    name: str

    def __str__(self) -> str:
        if self.kind == CUDA:
            return f"{self.count} x {self.name}"
        return f"CPU ({self.name})"


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


# ---- the model's shape, from its HF config dict -------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    model_type: str | None
    architecture: str | None  # config["architectures"][0], e.g. LlamaForCausalLM
    layers: int | None
    heads: int | None
    kv_heads: int | None  # equals heads for plain multi-head attention
    hidden_size: int | None
    context: int | None
    checkpoint_dtype: str | None  # fp32 / fp16 / bf16, as config.json records it
    rms_norm_eps: float | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ModelShape":
        outer = config
        # Multimodal configs keep the language model's numbers under text_config (as AutoTP does).
        if isinstance(config.get("text_config"), Mapping):
            config = config["text_config"]
        model_type = outer.get("model_type") or config.get("model_type")
        architectures = outer.get("architectures") or config.get("architectures") or [None]
        heads = _first(config, _HEAD_KEYS)
        dtype = _first(config, _DTYPE_KEYS) or _first(outer, _DTYPE_KEYS)
        dtype_text = str(dtype).removeprefix("torch.").lower() if dtype is not None else None
        eps = config.get("rms_norm_eps")
        return cls(
            model_type=str(model_type).lower() if model_type else None,
            architecture=architectures[0],
            layers=_first(config, _LAYER_KEYS),
            heads=heads,
            kv_heads=_first(config, _KV_HEAD_KEYS) or heads,
            hidden_size=_first(config, _HIDDEN_KEYS),
            context=_first(config, _CONTEXT_KEYS),
            checkpoint_dtype=_CHECKPOINT_DTYPES.get(dtype_text, dtype_text) if dtype_text else None,
            rms_norm_eps=float(eps) if isinstance(eps, (int, float)) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first(config: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = config.get(key)
        if value is not None:
            return value
    return None


# ---- the plan and its errors --------------------------------------------------------------------------
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


def plan_engine(properties: ServingProperties, model_config: Mapping[str, Any], device: Device,
                available: Collection[str] | None = None,
                quantizers: Collection[str] | None = None,
                failed: Mapping[str, str] | None = None,
                importable: Callable[[str], bool] | None = None) -> EnginePlan:
    """`available`: the engines this build can start (`entrypoint.engine_factory.ENGINE_BUILDERS`) and
    `quantizers` the quantization methods it can apply (`entrypoint.engine_factory.QUANTIZERS`); None plans
    with the whole policy table, as if everything were built. `failed`: engines that were tried for this
    model and could not serve it, with why (the engine factory plans again without them). `importable`:
    whether a Python module is installed (default `module_importable`), for the packages an engine needs
    before it loads weights."""
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

    def blocker(name: str) -> str | None:
        reason = _blocker(ENGINES[name], arch, model_config, properties, quant, dtype, device)
        if reason is None and name == FASTGEN and not properties.fastgen:
            reason = "fastgen=false: FastGen turned off by configuration"
        if reason is None and name == FASTGEN and degree > 1:
            reason = (f"tensor_parallel_degree={degree}: this build drives FastGen on one GPU only (its ranks are "
                      "not wired to the container's rank launcher yet)")
        if reason is None and name == FASTGEN and device.kind == CUDA:
            reason = _fastgen_kernels_missing(importable) or fastgen_ops_unavailable()
        if failed and name in failed:
            reason = f"tried first and could not serve this model: {failed[name]}"
        if reason is None and available is not None and name not in available:
            reason = "not built into this container yet (only " + ", ".join(sorted(available)) + " is)"
        return reason

    blockers = {name: blocker(name) for name in ENGINES}
    _check_quantize(properties, quant, arch, model_config, device, problems)
    if quant is not None and quantizers is not None and quant.method not in quantizers:
        problems.append(PlanProblem("quantize", properties.quantize,
                                    "not built into this container yet (the quantization package has no "
                                    f"{quant.method} yet); unset quantize to serve the model unquantized"))
    _check_cuda_graph(properties, device, blockers, problems)
    if problems:
        raise PlanError(problems)

    engine, rolling, ruled_out = _choose(properties.rolling_batch, device, blockers, shape, notes)
    spec = ENGINES[engine]
    if not arch.known:
        notes.append(f"model_type {shape.model_type or '(none in config.json)'} is not in the engine policy table "
                     "(handlers/engine_policy.py); AutoTP serves it because it handles any Hugging Face model")
    if quant is not None:
        notes.append(f"quantize={quant.method} on {engine}: {quant.engines[engine].reason}")
    notes.extend(spec.caveats)
    # isclose: GGUF metadata stores eps as float32 (1e-5 reads back as 9.9999997e-06).
    if engine == FASTGEN:
        if shape.rms_norm_eps is not None and not math.isclose(shape.rms_norm_eps, _FASTGEN_NORM_EPS, rel_tol=1e-5):
            notes.append(f"FastGen (DeepSpeed 0.19.8) builds its norms with eps={_FASTGEN_NORM_EPS:g}; this model's "
                         f"rms_norm_eps={shape.rms_norm_eps:g} is set on them at load (handlers/fastgen_model.py)")
        notes.append("a correctness gate runs at start-up: FastGen's teacher-forced logits against the HF model's in "
                     "fp32 on random-id probes of 48, 600 and 2,000 positions, alone and in a full batch; if they "
                     "deviate more than twice as much as HF's own half precision, the next engine serves instead "
                     "(correctness_gate=false skips it)"
                     if properties.correctness_gate else
                     "correctness_gate=false: FastGen's logits are not checked against HF's at start-up")
    if shape.context is not None and properties.max_tokens > shape.context:
        notes.append(f"max_tokens={properties.max_tokens} is capped by the model's context of {shape.context} tokens")

    return EnginePlan(
        engine=engine,
        reason=_reason(engine, arch, device, rolling, properties.rolling_batch),
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


def _blocker(spec: EngineSpec, arch: ArchitecturePolicy, model_config: Mapping[str, Any],
             properties: ServingProperties, quant: QuantizationSupport | None, dtype: str,
             device: Device) -> str | None:
    """Why `spec` cannot serve this model and configuration on this device, or None if it can."""
    if device.kind not in spec.devices:
        return "runs on GPU only, and no GPU is visible"
    verdict = arch.engines[spec.name]
    if not verdict.supported:
        return f"{arch.model_type}: {verdict.reason}"
    config = model_config.get("text_config") if isinstance(model_config.get("text_config"), Mapping) else model_config
    for condition in arch.conditions:
        if condition.engine == spec.name and config.get(condition.key, condition.default) != condition.expected:
            return f"{condition.reason} (config.json: {condition.key}={config.get(condition.key)!r})"
    if dtype not in spec.dtypes:
        return f"dtype {dtype} is not supported: {spec.dtype_reason}"
    if quant is not None and not quant.engines[spec.name].supported:
        return f"quantize={quant.method}: {quant.engines[spec.name].reason}"
    if properties.checkpoint is not None and not spec.loads_ds_checkpoint:
        return (f"checkpoint={properties.checkpoint}: it loads Hugging Face checkpoints (or its own format), not "
                "init_inference checkpoint descriptions")
    if properties.enable_cuda_graph and not spec.cuda_graph:
        return "enable_cuda_graph=true: CUDA graphs exist only in DeepSpeed kernel injection"
    return None


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
    capable = [name for name, spec in ENGINES.items() if spec.cuda_graph]
    if device.kind != CUDA:
        problems.append(PlanProblem("enable_cuda_graph", True,
                                    "CUDA graphs need a GPU (and DeepSpeed kernel injection); no GPU is visible"))
    elif all(blockers[name] is not None for name in capable):
        why = "; ".join(f"{name}: {blockers[name]}" for name in capable)
        problems.append(PlanProblem("enable_cuda_graph", True,
                                    f"CUDA graphs exist only in DeepSpeed kernel injection, which cannot serve this "
                                    f"model ({why}); set enable_cuda_graph=false"))


def _choose(mode: RollingBatch, device: Device, blockers: Mapping[str, str | None], shape: ModelShape,
            notes: list[str]) -> tuple[str, bool, list[tuple[str, str]]]:
    """Pick the engine. Returns (engine, continuous batching on, ruled out).

    rolling_batch semantics: `auto` wants continuous batching and takes the best engine that has it, falling
    back to static batches only when the configuration leaves no such engine (e.g. enable_cuda_graph);
    `deepspeed` insists on it; `disable` takes the best engine outright and batches statically."""
    feasible = [name for name in PREFERENCE[device.kind] if blockers[name] is None]
    if not feasible:
        why = "; ".join(f"{name}: {reason}" for name, reason in blockers.items())
        raise PlanError([PlanProblem("model_type", shape.model_type, f"no engine can serve this configuration ({why})")])

    with_batching = [name for name in feasible if ENGINES[name].continuous_batching]
    if mode is RollingBatch.DISABLE:
        chosen, rolling = feasible[0], False
        notes.append("rolling_batch=disable: dynamic batching as DJL Serving did it: requests that arrive within "
                     "max_batch_delay of the first form one batch of at most batch_size, which runs to completion "
                     "before the next one forms (each request still finishes and streams on its own)")
    elif with_batching:
        chosen, rolling = with_batching[0], True
    elif mode is RollingBatch.AUTO:
        chosen, rolling = feasible[0], False
        notes.append(f"rolling_batch=auto: continuous batching is off because only {chosen} can serve this "
                     f"configuration, and {ENGINES[chosen].batching_reason}")
    else:
        capable = [name for name, spec in ENGINES.items() if spec.continuous_batching]
        why = "; ".join(f"{name}: {blockers[name]}" for name in capable)
        raise PlanError([PlanProblem("rolling_batch", mode,
                                     f"continuous batching needs {' or '.join(capable)}, and neither can serve this "
                                     f"configuration ({why}); {feasible[0]} can, but "
                                     f"{ENGINES[feasible[0]].batching_reason}. Set rolling_batch=auto or disable")])

    ruled_out: list[tuple[str, str]] = []
    for name in ENGINES:
        if name == chosen:
            continue
        if blockers[name] is not None:
            ruled_out.append((name, blockers[name]))
        elif rolling and not ENGINES[name].continuous_batching:
            ruled_out.append((name, f"no continuous batching: {ENGINES[name].batching_reason} "
                                    "(set rolling_batch=disable to use it)"))
        else:
            ruled_out.append((name, f"ranks below {chosen} on {_DEVICE_WORDS[device.kind]}: {PREFERENCE_REASONS[name]}"))
    return chosen, rolling, ruled_out


def _reason(engine: str, arch: ArchitecturePolicy, device: Device, rolling: bool, mode: RollingBatch) -> str:
    spec = ENGINES[engine]
    ranking = PREFERENCE[device.kind]
    where = _DEVICE_WORDS[device.kind]
    if len(ranking) == 1:
        lead = f"the only engine that runs on {where}"
    elif engine == ranking[0]:
        lead = f"the preferred engine on {where}: {PREFERENCE_REASONS[engine]}"
    else:
        lead = f"the best engine on {where} that can serve this configuration (see ruled out)"
    batching = ("continuous batching on: " + spec.batching_reason) if rolling else \
        f"dynamic batches (rolling_batch={mode.value}: batch_size, max_batch_delay)"
    return f"{spec.summary}; {lead}; {arch.model_type}: {arch.engines[engine].reason}; {batching}"


_DEVICE_WORDS = {CPU: "CPU", CUDA: "GPU"}


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(getattr(value, "value", value))
