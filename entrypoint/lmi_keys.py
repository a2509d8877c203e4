"""LMI's configuration keys, and what each one does in this container: the one table `property_sources` reads.

LMI (DJL Serving's Large Model Inference containers) documents its keys per container: the DeepSpeed container,
the LMI-dist and vLLM rolling batches, Hugging Face Accelerate, and DJL Serving's own model keys
(serving/docs/lmi/deployment_guide/configurations.md, serving/docs/lmi/user_guides/*.md,
serving/docs/configurations_model.md, engines/python/setup/djl_python/properties_manager/*.py). A
serving.properties written for one of them must start here too, so every such key is accepted:

* SAME: the key is a property here (or a spelling `property_sources.KEY_ALIASES` already maps); it is listed
  so that the migration table is complete, and parsing does not consult this table for it.
* MAPPED: LMI's key sets one of this container's properties (`max_model_len` -> `max_tokens`), through
  `convert` where the values differ. A property set under its own name wins over the LMI key when both are
  given with the same precedence (the notes say which won).
* IGNORED: no meaning here; accepted, and every ignored key is named in one start-up warning with why.
* FIXED: only one value is what this container does (`pipeline_parallel_degree=1`); that value is accepted
  without a warning, any other is a configuration error.

Keys that are neither LMI's nor this container's stay errors with a "did you mean" hint.
docs/lmi-migration.md is generated from this table (`python -m entrypoint docs`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

SAME, MAPPED, IGNORED, FIXED = "same", "mapped", "ignored", "fixed"

# Where LMI documents a key (the migration table's column).
COMMON = "LMI (all backends)"
DJL = "DJL Serving model"
DEEPSPEED = "DeepSpeed"
ACCELERATE = "HF Accelerate"
LMI_DIST = "LMI-dist"
VLLM = "vLLM"
TRT_NEURON = "TensorRT-LLM, NeuronX"

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


@dataclass(frozen=True)
class LmiKey:
    key: str  # as LMI documents it: `option.max_model_len`, or a top-level key such as `minWorkers`
    kind: str  # SAME, MAPPED, IGNORED or FIXED
    documented: tuple[str, ...]  # the LMI containers/guides that list it
    meaning: str  # what it does here (SAME, MAPPED), or why it is ignored (IGNORED, FIXED)
    target: str | None = None  # the property it sets here (SAME, MAPPED)
    # MAPPED: LMI's value -> the property's raw value, None for "leaves the property alone"; raises ValueError
    # (the message says what is allowed) for a value with no meaning here. FIXED: raises unless the value is
    # the one this container does. None: the value is passed on unchanged.
    convert: Callable[[str], str | None] | None = None
    example: str = "true"  # a value LMI's documentation shows, for the tests and the migration table

    @property
    def is_option(self) -> bool:
        return self.key.startswith("option.")

    @property
    def bare(self) -> str:
        return self.key[len("option."):] if self.is_option else self.key

    @property
    def environment(self) -> str | None:
        """The environment variable LMI reads for an `option.` key (`option.max_model_len` ->
        `OPTION_MAX_MODEL_LEN`); top-level keys have none here."""
        return "OPTION_" + normalize_key(self.bare).upper() if self.is_option else None


def normalize_key(key: str) -> str:
    """`entryPoint` -> `entry_point`, `MAX-TOKENS` -> `max_tokens`, `LOAD_IN_8BIT` -> `load_in_8bit`: how
    every source's key is compared (`property_sources` uses it for properties too)."""
    key = key.strip()
    # camelCase is split only in mixed case: in an upper-case name (an OPTION_ variable) a digit before a
    # capital (`8BIT`) is part of the word, not a word boundary.
    snake = key if key.isupper() else re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key)
    return snake.replace("-", "_").lower()


# ---- value conversions of the MAPPED and FIXED keys ---------------------------------------------------
def _streaming(value: str) -> str | None:
    text = value.strip().lower()
    if text in ("true", "huggingface"):
        return "jsonlines"
    if text == "false" or not text:
        return None
    raise ValueError("expected true, false or huggingface (LMI's values)")


def _bits(bits: int) -> Callable[[str], str | None]:
    def convert(value: str) -> str | None:
        text = value.strip().lower()
        if text in _FALSE:
            return None
        if text in _TRUE:
            raise ValueError(f"bitsandbytes {bits}-bit loading is not supported by the DeepSpeed engines; "
                             "use option.quantize=dynamic_int8 (int8 weights and activations) or remove the key")
        raise ValueError("expected true or false")
    return convert


def _only(expected: str, why: str) -> Callable[[str], str | None]:
    def convert(value: str) -> str | None:
        if value.strip() in ("", expected):
            return None
        raise ValueError(f"only {expected} is supported here: {why}")
    return convert


# ---- the table ----------------------------------------------------------------------------------------
_WORKERS = "one process group (one rank per tensor-parallel GPU) serves the one model; there is no worker pool"
_LORA = "no LoRA adapters in this container: requests are served by the base model only"
_SPECULATIVE = "no speculative decoding: every token is decoded by the served model itself"
_PASSES_THROUGH = "vLLM engine argument (LMI passes it to vLLM); "
_MEMORY = "memory is not reserved per worker (gpu_memory_utilization bounds GPU memory)"

LMI_KEYS: tuple[LmiKey, ...] = (
    # -- the keys this container shares with LMI (parsed as properties; listed for the migration table) --
    LmiKey("engine", SAME, (COMMON, DEEPSPEED), "accepted as DeepSpeed, Python or MPI; ranks follow "
           "tensor_parallel_degree whichever is written", "engine", example="MPI"),
    LmiKey("job_queue_size", SAME, (COMMON, DJL), "most requests admitted at once; more get 503", "job_queue_size",
           example="1000"),
    LmiKey("batch_size", SAME, (DJL,), "dynamic batch size; only with rolling_batch=disable", "batch_size",
           example="4"),
    LmiKey("max_batch_delay", SAME, (DJL,), "dynamic batching delay in ms; only with rolling_batch=disable",
           "max_batch_delay", example="100"),
    LmiKey("option.model_id", SAME, (COMMON,), "local directory, Hugging Face id in the local cache, or s3:// URI "
           "(the Hub is not downloaded from)", "model_id", example="s3://bucket/llama-2-7b/"),
    LmiKey("option.revision", SAME, (COMMON,), "revision of a Hugging Face id in the local cache", "revision",
           example="main"),
    LmiKey("option.trust_remote_code", SAME, (COMMON,), "same meaning", "trust_remote_code"),
    LmiKey("option.rolling_batch", SAME, (COMMON, DEEPSPEED), "auto, deepspeed or disable; lmi-dist, vllm, "
           "scheduler are refused with a hint (those libraries are not in this container)", "rolling_batch",
           example="auto"),
    LmiKey("option.max_rolling_batch_size", SAME, (COMMON,), "same meaning; default 32", "max_rolling_batch_size",
           example="64"),
    LmiKey("option.max_rolling_batch_prefill_tokens", SAME, (LMI_DIST, VLLM), "most prompt tokens prefilled per "
           "step; longer prompts are chunked over several steps", "max_rolling_batch_prefill_tokens", example="4096"),
    LmiKey("option.dtype", SAME, (COMMON,), "fp32, fp16, bf16 or auto (default); int8 is refused with a hint "
           "(use quantize)", "dtype", example="fp16"),
    LmiKey("option.data_type", SAME, (DEEPSPEED, ACCELERATE), "LMI's older name of dtype", "dtype", example="fp16"),
    LmiKey("option.tensor_parallel_degree", SAME, (COMMON,), "GPUs (ranks) to shard over, or max; default 1",
           "tensor_parallel_degree", example="max"),
    LmiKey("option.entryPoint", SAME, (COMMON,), "djl_python.deepspeed (LMI's DeepSpeed handler) "
           "names this container's handler; other handlers (djl_python.huggingface, custom scripts) are refused",
           "entry_point", example="djl_python.deepspeed"),
    LmiKey("option.model_loading_timeout", SAME, (COMMON,), "same meaning (seconds)", "model_loading_timeout",
           example="1800"),
    LmiKey("option.predict_timeout", SAME, (DJL,), "same meaning (seconds)", "predict_timeout", example="120"),
    LmiKey("option.output_formatter", SAME, (COMMON,), "json, jsonlines or sse; custom formatter functions are "
           "not supported", "output_formatter", example="jsonlines"),
    LmiKey("option.task", SAME, (DEEPSPEED, ACCELERATE), "only text-generation", "task", example="text-generation"),
    LmiKey("option.quantize", SAME, (DEEPSPEED, ACCELERATE, LMI_DIST, VLLM), "smoothquant or dynamic_int8 "
           "(DeepSpeed's); awq, gptq, bitsandbytes, fp8 are refused", "quantize", example="dynamic_int8"),
    LmiKey("option.smoothquant_alpha", SAME, (DEEPSPEED,), "same meaning", "smoothquant_alpha", example="0.5"),
    LmiKey("option.max_tokens", SAME, (DEEPSPEED,), "most prompt + generated tokens of one request; default 4096 "
           "(LMI's DeepSpeed: 1024), capped by the model's context", "max_tokens", example="2048"),
    LmiKey("option.low_cpu_mem_usage", SAME, (DEEPSPEED, ACCELERATE), "always on", "low_cpu_mem_usage"),
    LmiKey("option.enable_cuda_graph", SAME, (DEEPSPEED,), "a plan error here: no engine captures CUDA graphs",
           "enable_cuda_graph", example="false"),
    LmiKey("option.triangular_masking", SAME, (DEEPSPEED,), "always on", "triangular_masking"),
    LmiKey("option.return_tuple", SAME, (DEEPSPEED,), "always on", "return_tuple"),
    LmiKey("option.training_mp_size", SAME, (DEEPSPEED,), "only 1 (full checkpoints)", "training_mp_size",
           example="1"),
    LmiKey("option.checkpoint", SAME, (DEEPSPEED,), "a safetensors file or DeepSpeed checkpoint JSON in the model "
           "directory", "checkpoint", example="ds_inference_checkpoint.json"),
    LmiKey("option.gpu_memory_utilization", SAME, (LMI_DIST, VLLM), "share of each GPU's memory for weights, "
           "activations and the KV cache", "gpu_memory_utilization", example="0.9"),

    # -- LMI's keys that set one of this container's properties ------------------------------------------------
    LmiKey("option.max_model_len", MAPPED, (LMI_DIST, VLLM), "sets max_tokens: the most tokens (prompt + "
           "generated) of one request, capped by the model's context", "max_tokens", example="2048"),
    LmiKey("option.enable_streaming", MAPPED, (COMMON, DEEPSPEED), "every request may stream here (\"stream\": "
           "true, or an Accept header); true or huggingface also makes /invocations stream jsonlines by default, "
           "as LMI's DeepSpeed handler did (sets output_formatter=jsonlines); false changes nothing",
           "output_formatter", _streaming),
    LmiKey("option.max_num_batched_tokens", MAPPED, (VLLM,), "vLLM's name of max_rolling_batch_prefill_tokens",
           "max_rolling_batch_prefill_tokens", example="4096"),
    LmiKey("option.max_num_seqs", MAPPED, (VLLM,), "vLLM's name of max_rolling_batch_size",
           "max_rolling_batch_size", example="64"),
    LmiKey("option.quantization", MAPPED, (VLLM,), "vLLM's name of quantize", "quantize", example="dynamic_int8"),
    LmiKey("option.load_in_8bit", MAPPED, (ACCELERATE,), "LMI's older bitsandbytes switch: false changes nothing; "
           "true is refused like quantize=bitsandbytes8 (use quantize=dynamic_int8)", "quantize", _bits(8),
           example="false"),
    LmiKey("option.load_in_4bit", MAPPED, (ACCELERATE,), "LMI's older bitsandbytes switch: false changes nothing; "
           "true is refused like quantize=bitsandbytes4 (use quantize=dynamic_int8)", "quantize", _bits(4),
           example="false"),

    # -- FIXED: only what this container does -----------------------------------------------------------------
    LmiKey("option.pipeline_parallel_degree", FIXED, (VLLM,), "no pipeline parallelism; ranks come from "
           "tensor_parallel_degree", convert=_only("1", "no pipeline parallelism; use tensor_parallel_degree"),
           example="1"),
    LmiKey("option.cluster_size", FIXED, (COMMON,), "one host; no multi-node serving",
           convert=_only("1", "this container serves from one host; use tensor_parallel_degree"), example="1"),

    # -- IGNORED: accepted, named in the one start-up warning -------------------------------------------------
    # DJL Serving's worker pool and model-server keys
    LmiKey("minWorkers", IGNORED, (DJL,), _WORKERS, example="1"),
    LmiKey("maxWorkers", IGNORED, (DJL,), _WORKERS, example="1"),
    LmiKey("gpu.minWorkers", IGNORED, (DJL,), _WORKERS, example="1"),
    LmiKey("gpu.maxWorkers", IGNORED, (DJL,), _WORKERS, example="1"),
    LmiKey("cpu.minWorkers", IGNORED, (DJL,), _WORKERS, example="1"),
    LmiKey("cpu.maxWorkers", IGNORED, (DJL,), _WORKERS, example="1"),
    LmiKey("max_idle_time", IGNORED, (DJL,), "workers are never scaled down", example="60"),
    LmiKey("load_on_devices", IGNORED, (DJL,), "tensor_parallel_degree decides the devices", example="0;1"),
    LmiKey("required_memory_mb", IGNORED, (DJL,), _MEMORY, example="8192"),
    LmiKey("gpu.required_memory_mb", IGNORED, (DJL,), _MEMORY, example="8192"),
    LmiKey("reserved_memory_mb", IGNORED, (DJL,), _MEMORY, example="1024"),
    LmiKey("gpu.reserved_memory_mb", IGNORED, (DJL,), _MEMORY, example="1024"),
    LmiKey("translatorFactory", IGNORED, (DJL,), "no Java translator: the Python server parses requests itself",
           example="ai.djl.translate.NoopServingTranslatorFactory"),
    LmiKey("log_request_metric", IGNORED, (DJL,), "request metrics are always exported at /metrics",
           example="true"),
    LmiKey("metrics_aggregation", IGNORED, (DJL,), "Prometheus histograms at /metrics aggregate every request",
           example="1000"),
    LmiKey("retry_threshold", IGNORED, (DJL,), "a crashed rank stops the server (the platform restarts the "
           "container); there is no worker restart count", example="10"),
    LmiKey("option.parallel_loading", IGNORED, (COMMON, DJL), "one model copy per container; its ranks load "
           "their shards in parallel anyway"),
    LmiKey("option.mpi_mode", IGNORED, (LMI_DIST,), "ranks are launched by this container's own launcher from "
           "tensor_parallel_degree, with or without MPI"),
    LmiKey("option.pythonExecutable", IGNORED, (DJL,), "the server runs in the container's own Python",
           example="python3"),
    LmiKey("option.handler", IGNORED, (DJL,), "DJL Serving calls entrypoint.djl_handler.handle; the HTTP server "
           "needs no handler name", example="handle"),
    LmiKey("option.enable_venv", IGNORED, (DJL,), "one model, one environment: the container's"),
    LmiKey("option.max_output_size", IGNORED, (DJL,), "responses are bounded by max_tokens and streamed, not by "
           "bytes", example="67108864"),
    LmiKey("option.device_id", IGNORED, (ACCELERATE,), "tensor_parallel_degree decides the devices (from the "
           "first visible GPU; CUDA_VISIBLE_DEVICES selects others)", example="0"),
    # LMI's request handling
    LmiKey("option.waiting_steps", IGNORED, (COMMON, ACCELERATE), "the rolling batch admits waiting requests at "
           "every step", example="4"),
    LmiKey("option.tgi_compat", IGNORED, (COMMON,), "responses use LMI's schema (and OpenAI's at "
           "/v1/chat/completions); TGI's schema is not produced"),
    LmiKey("option.bedrock_compat", IGNORED, (COMMON,), "responses use LMI's schema; Bedrock's is not produced"),
    # DeepSpeed container
    LmiKey("option.deepspeed_config_path", IGNORED, (DEEPSPEED,), "the engines build their DeepSpeed "
           "configuration from these properties", example="ds_config.json"),
    LmiKey("option.save_mp_checkpoint_path", IGNORED, (DEEPSPEED,), "no sharded checkpoints are written; each "
           "rank reads its slices of the full checkpoint", example="/tmp/ds_ckpt"),
    # Hugging Face Accelerate
    LmiKey("option.device_map", IGNORED, (ACCELERATE,), "tensor_parallel_degree decides the GPUs (AutoTP shards "
           "every layer across them); there is no layer-per-GPU device map", example="auto"),
    LmiKey("option.disable_flash_attn", IGNORED, (ACCELERATE,), "the engine the plan chooses decides the "
           "attention kernels"),
    # LMI-dist and vLLM
    LmiKey("option.load_format", IGNORED, (LMI_DIST, VLLM), "safetensors (or .bin) files are found in the model "
           "directory; option.checkpoint names another file", example="auto"),
    LmiKey("option.enforce_eager", IGNORED, (LMI_DIST, VLLM), "PyTorch runs eagerly here; no engine of this "
           "container captures CUDA graphs"),
    LmiKey("option.enable_chunked_prefill", IGNORED, (LMI_DIST, VLLM), "prompts longer than "
           "max_rolling_batch_prefill_tokens are always prefilled in chunks, next to the decoding requests"),
    LmiKey("option.enable_prefix_caching", IGNORED, (LMI_DIST, VLLM), "no prefix cache: each request prefills its "
           "whole prompt"),
    LmiKey("option.disable_sliding_window", IGNORED, (LMI_DIST, VLLM), "the model's attention is used as its "
           "config.json defines it (FastGen is ruled out where a sliding window is shorter than max_tokens)"),
    LmiKey("option.tokenizer_mode", IGNORED, (LMI_DIST, VLLM), "the model directory's Hugging Face tokenizer is "
           "used", example="auto"),
    LmiKey("option.cpu_offload_gb_per_gpu", IGNORED, (LMI_DIST, VLLM), "weights stay on the GPUs; lower "
           "max_tokens or raise tensor_parallel_degree to fit", example="0"),
    LmiKey("option.cpu_offload_gb", IGNORED, (VLLM,), _PASSES_THROUGH + "weights stay on the GPUs", example="0"),
    LmiKey("option.use_v2_block_manager", IGNORED, (VLLM,), _PASSES_THROUGH + "the KV cache is this container's "
           "own (paged blocks on every engine)"),
    LmiKey("option.swap_space", IGNORED, (VLLM,), _PASSES_THROUGH + "the KV cache is never swapped to host "
           "memory; requests wait for free blocks", example="4"),
    LmiKey("option.block_size", IGNORED, (VLLM,), _PASSES_THROUGH + "KV block sizes are the engines' own",
           example="16"),
    LmiKey("option.kv_cache_dtype", IGNORED, (VLLM,), _PASSES_THROUGH + "the KV cache uses the model's dtype",
           example="auto"),
    LmiKey("option.max_seq_len_to_capture", IGNORED, (VLLM,), _PASSES_THROUGH + "no engine of this container "
           "captures CUDA graphs", example="8192"),
    LmiKey("option.seed", IGNORED, (VLLM,), _PASSES_THROUGH + "sampling takes a seed per request "
           "(parameters.seed)", example="0"),
    LmiKey("option.max_logprobs", IGNORED, (VLLM,), _PASSES_THROUGH + "log-probabilities are returned per request "
           "as LMI's details", example="20"),
    LmiKey("option.enable_lora", IGNORED, (COMMON, LMI_DIST, VLLM), _LORA),
    LmiKey("option.max_loras", IGNORED, (LMI_DIST, VLLM), _LORA, example="4"),
    LmiKey("option.max_lora_rank", IGNORED, (LMI_DIST, VLLM), _LORA, example="16"),
    LmiKey("option.lora_extra_vocab_size", IGNORED, (LMI_DIST, VLLM), _LORA, example="256"),
    LmiKey("option.max_cpu_loras", IGNORED, (LMI_DIST, VLLM), _LORA, example="8"),
    LmiKey("option.long_lora_scaling_factors", IGNORED, (VLLM,), _LORA, example="4.0"),
    LmiKey("option.draft_model_id", IGNORED, (COMMON,), _SPECULATIVE, example="s3://bucket/draft/"),
    LmiKey("option.spec_length", IGNORED, (COMMON,), _SPECULATIVE, example="5"),
    LmiKey("option.speculative_draft_model", IGNORED, (LMI_DIST,), _SPECULATIVE, example="s3://bucket/draft/"),
    LmiKey("option.speculative_length", IGNORED, (LMI_DIST,), _SPECULATIVE, example="5"),
    LmiKey("option.draft_model_tp_size", IGNORED, (LMI_DIST,), _SPECULATIVE, example="1"),
    LmiKey("option.record_acceptance_rate", IGNORED, (LMI_DIST,), _SPECULATIVE),
    LmiKey("option.speculative_model", IGNORED, (VLLM,), _PASSES_THROUGH + _SPECULATIVE, example="s3://bucket/draft/"),
    LmiKey("option.num_speculative_tokens", IGNORED, (VLLM,), _PASSES_THROUGH + _SPECULATIVE, example="5"),
    # TensorRT-LLM and NeuronX (their serving.properties often travel to other LMI containers)
    LmiKey("option.max_input_len", IGNORED, (TRT_NEURON,), "one limit covers prompt and generated tokens "
           "together here: set option.max_tokens (to max_input_len + max_output_len)", example="1024"),
    LmiKey("option.max_output_len", IGNORED, (TRT_NEURON,), "one limit covers prompt and generated tokens "
           "together here: set option.max_tokens (to max_input_len + max_output_len)", example="512"),
)

#: `option.` keys by their normalized bare name (`entry_point`), as `normalize_key` writes it
OPTION_KEYS: dict[str, LmiKey] = {normalize_key(entry.bare): entry for entry in LMI_KEYS if entry.is_option}
#: top-level keys by their lowercase spelling (`minworkers`, `gpu.maxworkers`), as DJL Serving compares them
TOP_LEVEL_KEYS: dict[str, LmiKey] = {entry.key.lower(): entry for entry in LMI_KEYS if not entry.is_option}


def option_key(normalized: str) -> LmiKey | None:
    """The LMI `option.` key with this normalized name, unless this container parses it as a property (SAME)."""
    entry = OPTION_KEYS.get(normalized)
    return entry if entry is not None and entry.kind != SAME else None


def top_level_key(key: str) -> LmiKey | None:
    entry = TOP_LEVEL_KEYS.get(key.strip().lower())
    return entry if entry is not None and entry.kind != SAME else None


def ignored_warning(ignored: list[tuple[LmiKey, str]]) -> str:
    """The one start-up warning naming every ignored LMI key (with where it was set) and why."""
    lines = [f"{len(ignored)} LMI key{'s' if len(ignored) != 1 else ''} accepted but ignored (no effect in this "
             "container; docs/lmi-migration.md):"]
    lines += [f"{entry.key} ({where}): {entry.meaning}" for entry, where in ignored]
    return "\n  ".join(lines)
