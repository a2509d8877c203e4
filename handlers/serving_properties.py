"""The typed configuration: every property the container understands, with its default and meaning.

This is the single place a property is defined. `serving.properties.example` is checked against it by a
test, `plan` prints it, and everything below the entrypoint receives a validated `ServingProperties`
instead of raw dictionaries or `os.environ`.

Values arrive as strings (from `serving.properties` or environment variables); the validators below
turn them into typed values case-insensitively where that is natural (`FP16`, `fp16` and `float16` are
the same dtype) and reject everything else with the allowed values in the message. Rules that involve
several fields live in `_cross_field_rules`, so a bad combination fails before any weights load.
"""

from __future__ import annotations

import re
import typing
from enum import Enum
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


class RollingBatch(str, Enum):
    AUTO = "auto"
    DEEPSPEED = "deepspeed"
    DISABLE = "disable"


class Quantize(str, Enum):
    SMOOTHQUANT = "smoothquant"
    DYNAMIC_INT8 = "dynamic_int8"


class DType(str, Enum):
    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class OutputFormatter(str, Enum):
    JSON = "json"
    JSONLINES = "jsonlines"
    SSE = "sse"


class Task(str, Enum):
    TEXT_GENERATION = "text-generation"


class DjlEngine(str, Enum):
    """serving.properties' top-level `engine=`: LMI used DeepSpeed (or Python) for one process and MPI for
    tensor-parallel ranks; here the rank count comes from tensor_parallel_degree, so all three behave alike."""
    DEEPSPEED = "deepspeed"
    PYTHON = "python"
    MPI = "mpi"


# Spellings users write for the same thing (LMI accepted only some of them; we accept all the obvious ones).
_ALIASES: dict[type[Enum], dict[str, str]] = {
    DType: {
        "float32": "fp32", "float": "fp32", "fp32": "fp32", "f32": "fp32",
        "float16": "fp16", "half": "fp16", "fp16": "fp16", "f16": "fp16",
        "bfloat16": "bf16", "bf16": "bf16",
        "auto": "auto",
    },
    RollingBatch: {"auto": "auto", "deepspeed": "deepspeed", "disable": "disable", "disabled": "disable",
                   "false": "disable", "off": "disable", "none": "disable"},
    Quantize: {"smoothquant": "smoothquant", "dynamic_int8": "dynamic_int8", "dynamic-int8": "dynamic_int8"},
    OutputFormatter: {"json": "json", "jsonlines": "jsonlines", "jsonl": "jsonlines", "sse": "sse"},
    DjlEngine: {"deepspeed": "deepspeed", "python": "python", "mpi": "mpi"},
    Task: {"text-generation": "text-generation", "text_generation": "text-generation"},
}

# Values LMI users may carry over that we deliberately do not support; the hint says what to use instead.
_REJECTED_WITH_HINT: dict[tuple[type[Enum], str], str] = {
    (DType, "int8"): "int8 is not a dtype here; set quantize=dynamic_int8 (or smoothquant) and keep dtype fp16/bf16/fp32",
    (RollingBatch, "lmi-dist"): "lmi-dist is not part of this container; use rolling_batch=deepspeed or auto",
    (RollingBatch, "vllm"): "vLLM is not part of this container; use rolling_batch=deepspeed or auto",
    (RollingBatch, "scheduler"): "the old DJL scheduler is replaced by the built-in rolling batch; use rolling_batch=deepspeed or auto",
    (Quantize, "bitsandbytes"): "bitsandbytes is not supported by the DeepSpeed engines; use quantize=dynamic_int8",
    (Quantize, "bitsandbytes8"): "bitsandbytes is not supported by the DeepSpeed engines; use quantize=dynamic_int8",
    (Quantize, "bitsandbytes4"): "bitsandbytes is not supported by the DeepSpeed engines; use quantize=dynamic_int8",
    (Quantize, "fp8"): "fp8 is not supported by the DeepSpeed engines; use quantize=dynamic_int8 (int8)",
    (Quantize, "awq"): "AWQ checkpoints are not supported by the DeepSpeed engines; use quantize=smoothquant or dynamic_int8",
    (Quantize, "gptq"): "GPTQ checkpoints are not supported by the DeepSpeed engines; use quantize=smoothquant or dynamic_int8",
}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def allowed_values(enum: type[Enum]) -> list[str]:
    return [member.value for member in enum]


def _parse_enum(enum: type[Enum], value: Any) -> Any:
    if isinstance(value, enum) or value is None:
        return value
    text = str(value).strip().lower()
    hint = _REJECTED_WITH_HINT.get((enum, text))
    if hint:
        raise ValueError(hint)
    canonical = _ALIASES.get(enum, {}).get(text, text)
    try:
        return enum(canonical)
    except ValueError:
        raise ValueError(f"allowed values are {', '.join(allowed_values(enum))}") from None


def _parse_bool(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("expected true or false")


def _blank_to_none(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        return None
    return value


class ServingProperties(BaseModel):
    """Every property of the container. Keys are written `option.<name>` in serving.properties or
    `OPTION_<NAME>` in the environment (see `entrypoint.property_sources` for all sources)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True, use_enum_values=False)

    # ---- model --------------------------------------------------------------------------------------
    model_id: str | None = Field(
        None, description="Model to serve: a local directory, a Hugging Face model id in the local HF cache, or an s3:// URI; "
        "unset means the model directory (/opt/ml/model) if it holds a model, else the embedded SmolLM2-135M-Instruct.")
    revision: str | None = Field(None, description="Revision (branch, tag or commit) of a Hugging Face model id in the local cache.")
    task: Task = Field(Task.TEXT_GENERATION, description="Task of the model; only text-generation (causal language models) is served.")
    trust_remote_code: bool = Field(False, description="Allow the model directory's own Python code (config/model classes) to run.")
    dtype: DType = Field(DType.AUTO, description="Weight and activation dtype: auto (fp32 on CPU; the checkpoint's fp16/bf16 on GPU), fp32, fp16 or bf16.")
    low_cpu_mem_usage: bool = Field(True, description="Load weights without building the model twice in host memory; always on (transformers 5 and the sharded loader have no other mode), so false is refused.")
    checkpoint: str | None = Field(None, description="Weights to load instead of the model directory's own, by file name in the model directory: a .safetensors file, or a DeepSpeed checkpoint JSON ({\"type\": \"ds_model\", \"checkpoints\": [safetensors files]}); config and tokenizer still come from the directory.")
    training_mp_size: int = Field(1, ge=1, le=1, description="Tensor-parallel degree the checkpoint was saved with; only 1 (a full checkpoint: every rank loads its own slices of it).")

    # ---- engine -------------------------------------------------------------------------------------
    tensor_parallel_degree: Union[int, Literal["max"]] = Field(
        1, description="Number of tensor-parallel ranks (one per GPU; CPU processes on a CPU-only machine), or max for every visible GPU (1 without GPUs).")
    rolling_batch: RollingBatch = Field(
        RollingBatch.AUTO, description="Continuous batching: auto (on, with the best engine for the architecture), deepspeed (on, must be possible), disable (one request batch at a time).")
    max_rolling_batch_size: int = Field(32, ge=1, le=4096, description="Most requests decoded together in one engine step.")
    max_rolling_batch_prefill_tokens: int = Field(4096, ge=1, description="Most prompt tokens prefilled in one engine step; longer prompts are prefilled in chunks over several steps.")
    max_tokens: int = Field(4096, ge=1, description="Most tokens (prompt + generated) of one request; capped by the model's context length.")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="Share of each GPU's memory the server may use in all: weights, the largest step's activations (measured at start-up) and, with the rest, the KV cache.")
    cpu_kv_cache_bytes: int = Field(2 * 2**30, ge=2**20, description="Bytes of host memory for the KV cache on a CPU (per rank).")
    batch_size: int = Field(1, ge=1, le=4096, description="With rolling_batch=disable: most requests in one dynamic batch (DJL Serving's batch_size; also the top-level batch_size=).")
    max_batch_delay: int = Field(100, ge=0, le=60000, description="With rolling_batch=disable: milliseconds the first request of a batch waits for batch-mates (DJL Serving's max_batch_delay; also top-level).")
    quantize: Quantize | None = Field(None, description="W8A8 quantization of the linear layers (int8 weights per channel, activations per token at run time): smoothquant (after SmoothQuant calibration and smoothing) or dynamic_int8 (no smoothing).")
    smoothquant_alpha: float | None = Field(None, description="SmoothQuant migration strength alpha in [0, 1]; unset: chosen by a search on the calibration data (logged); only with quantize=smoothquant.")
    smoothquant_calibration_data: str | None = Field(None, description="UTF-8 text file SmoothQuant calibrates on; unset: the calibration half of Python's pydoc_data topics. Calibrations are saved under model_cache_dir and reused.")
    fastgen: bool = Field(True, description="On a GPU, serve with DeepSpeed-FastGen where the plan allows it (one GPU, fp16/bf16, an architecture it implements); false serves with AutoTP (the Hugging Face layers) instead.")
    kernel_injection: bool | None = Field(None, description="On a GPU, DeepSpeed kernel injection (its fused CUDA blocks, one dynamic batch at a time): unset or auto lets the plan choose it where it measured fastest for the architecture; true insists on it (a plan error says why when it cannot serve the model); false never uses it.")
    correctness_gate: bool = Field(True, description="At start-up, compare the engine's teacher-forced next-token logits (FastGen's and kernel injection's: their kernels are not the Hugging Face layers) on probes of random token ids (48, 600 and 2,000 positions; alone and in one full batch, batched as served) with the Hugging Face model's in fp32 (relative to HF's own fp16 deviation) and fall back to the next engine if they differ more; false skips it (faster start-up).")
    enable_cuda_graph: bool = Field(False, description="Capture CUDA graphs for decoding. No engine of this container captures them (DeepSpeed's own capture replays one input shape, and kernel injection's mask grows every step), so true is always a plan error; keep false.")
    triangular_masking: bool = Field(True, description="Causal (triangular) attention; always on for the causal language models served here, so false is refused.")
    return_tuple: bool = Field(True, description="DeepSpeed kernel-injected layers return tuples (init_inference return_tuple); always on (the engines need it), so false is refused.")
    engine: DjlEngine = Field(DjlEngine.DEEPSPEED, description="serving.properties' top-level engine= (DeepSpeed, Python or MPI, as LMI wrote it); ranks follow tensor_parallel_degree in every case.")
    entry_point: str = Field("entrypoint.djl_handler", description="Handler module DJL Serving calls (option.entryPoint); LMI's djl_python.deepspeed and the earlier handlers.deepspeed are accepted as names of it.")

    # ---- output and server --------------------------------------------------------------------------
    output_formatter: OutputFormatter = Field(OutputFormatter.JSON, description="Default response format of /invocations: json, jsonlines (streamed tokens) or sse (server-sent events).")
    port: int = Field(8080, ge=1, le=65535, description="HTTP port; SAGEMAKER_BIND_TO_PORT overrides it.")
    job_queue_size: int = Field(1000, ge=1, description="Most requests admitted at once (running + waiting); more get 503 with Retry-After.")
    max_request_size: int = Field(10 * 1024 * 1024, ge=1024, description="Largest request body in bytes; larger bodies get 413.")
    predict_timeout: float = Field(300.0, gt=0, description="Seconds one request may take end to end before it is cancelled with an error.")
    model_loading_timeout: float = Field(1800.0, gt=0, description="Seconds model resolution, download and loading may take before start-up fails.")
    model_cache_dir: str | None = Field(None, description="Directory for downloaded (s3://) and converted (embedded) models; default ~/.cache/lmi-deepspeed.")
    request_read_timeout: float = Field(30.0, gt=0, description="Seconds a client may take to send a request's headers, or between two parts of its body; a slower connection is closed (headers) or answered 408 (body).")
    api_key: SecretStr | None = Field(None, description="Bearer token every request except /ping must carry (Authorization: Bearer <key>), for deployments outside SageMaker; unset (the default) means no authentication. Never printed.")

    # ---- parsing of raw strings ---------------------------------------------------------------------
    @field_validator("task", mode="before")
    @classmethod
    def _task(cls, v: Any) -> Any:
        return _parse_enum(Task, v)

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v: Any) -> Any:
        return _parse_enum(DType, v)

    @field_validator("engine", mode="before")
    @classmethod
    def _engine(cls, v: Any) -> Any:
        return _parse_enum(DjlEngine, v)

    @field_validator("rolling_batch", mode="before")
    @classmethod
    def _rolling_batch(cls, v: Any) -> Any:
        return _parse_enum(RollingBatch, v)

    @field_validator("quantize", mode="before")
    @classmethod
    def _quantize(cls, v: Any) -> Any:
        v = _blank_to_none(v)
        return None if v is None else _parse_enum(Quantize, v)

    @field_validator("kernel_injection", mode="before")
    @classmethod
    def _kernel_injection(cls, v: Any) -> Any:
        v = _blank_to_none(v)
        if v is None or (isinstance(v, str) and v.strip().lower() == "auto"):
            return None
        try:
            return _parse_bool(v)
        except ValueError:
            raise ValueError("expected auto, true or false") from None

    @field_validator("output_formatter", mode="before")
    @classmethod
    def _output_formatter(cls, v: Any) -> Any:
        return _parse_enum(OutputFormatter, v)

    @field_validator("trust_remote_code", "low_cpu_mem_usage", "enable_cuda_graph", "correctness_gate", "fastgen",
                     "triangular_masking", "return_tuple",
                     mode="before")
    @classmethod
    def _bools(cls, v: Any) -> Any:
        return _parse_bool(v)

    @field_validator("low_cpu_mem_usage", "triangular_masking", "return_tuple")
    @classmethod
    def _always_on(cls, v: bool, info: Any) -> bool:
        if v is False:
            reasons = {
                "low_cpu_mem_usage": "transformers 5 and the sharded loader always load without a second copy of the model",
                "triangular_masking": "the served models are causal language models: a non-causal mask would give wrong text",
                "return_tuple": "the engines rely on DeepSpeed's tuple outputs",
            }
            raise ValueError(f"false is not supported: {reasons[info.field_name]}; remove the setting")
        return v

    @field_validator("model_id", "revision", "checkpoint", "smoothquant_alpha", "smoothquant_calibration_data",
                     "model_cache_dir", "api_key", mode="before")
    @classmethod
    def _optional(cls, v: Any) -> Any:
        return _blank_to_none(v)

    @field_validator("tensor_parallel_degree", mode="before")
    @classmethod
    def _tp_degree(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("expected a positive integer or max")
        if isinstance(v, int):
            value = v
        else:
            text = str(v).strip().lower()
            if text == "max":
                return "max"
            if not re.fullmatch(r"\+?\d+", text):
                raise ValueError("expected a positive integer or max")
            value = int(text)
        if value < 1:
            raise ValueError("expected a positive integer or max")
        return value

    @field_validator("entry_point", mode="before")
    @classmethod
    def _entry_point(cls, v: Any) -> Any:
        text = str(v).strip()
        if text in ("entrypoint.djl_handler", "djl_python.deepspeed", "handlers.deepspeed", "deepspeed"):
            return "entrypoint.djl_handler"
        raise ValueError("allowed values are entrypoint.djl_handler (LMI's djl_python.deepspeed and handlers.deepspeed "
                         "are accepted as names of it)")

    @field_validator("smoothquant_alpha")
    @classmethod
    def _alpha(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError("must be within [0, 1]")
        return v

    # ---- rules across fields ------------------------------------------------------------------------
    @model_validator(mode="after")
    def _cross_field_rules(self) -> "ServingProperties":
        problems: list[tuple[tuple[str, ...], str]] = []
        if self.smoothquant_alpha is not None and self.quantize is not Quantize.SMOOTHQUANT:
            problems.append((("smoothquant_alpha", "quantize"),
                             f"smoothquant_alpha={self.smoothquant_alpha} only applies with quantize=smoothquant, "
                             f"but quantize={_show(self.quantize)}"))
        if self.smoothquant_calibration_data is not None and self.quantize is not Quantize.SMOOTHQUANT:
            problems.append((("smoothquant_calibration_data", "quantize"),
                             f"smoothquant_calibration_data={self.smoothquant_calibration_data} only applies with "
                             f"quantize=smoothquant, but quantize={_show(self.quantize)}"))
        if problems:
            raise CrossFieldError(problems)
        return self


class CrossFieldError(ValueError):
    """Raised by `_cross_field_rules`; carries the fields involved so the message can name their sources."""

    def __init__(self, problems: list[tuple[tuple[str, ...], str]]):
        self.problems = problems
        super().__init__("; ".join(message for _, message in problems))


def _show(value: Any) -> str:
    if value is None:
        return "(unset)"
    return value.value if isinstance(value, Enum) else str(value)


def property_names() -> list[str]:
    return list(ServingProperties.model_fields)


def rejected_values() -> list[tuple[str, str, str]]:
    """(property, value, hint) for each value LMI accepted that is refused here with a hint (the migration
    table lists them: entrypoint/reference_docs.py)."""
    def field_of(enum: type[Enum]) -> str:
        return next(name for name, field in ServingProperties.model_fields.items()
                    if enum is field.annotation or enum in typing.get_args(field.annotation))
    return [(field_of(enum), value, hint) for (enum, value), hint in _REJECTED_WITH_HINT.items()]


def describe_value(value: Any) -> Any:
    """A JSON-friendly form of a property value (enums by their value; secrets masked, never their value)."""
    if isinstance(value, SecretStr):
        return "********"
    return value.value if isinstance(value, Enum) else value
