"""serving.properties + environment -> Configuration: LMI's precedence, parsing, and the error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from entrypoint.configuration import ConfigurationError
from handlers.serving_properties import DjlEngine, DType, Quantize, RollingBatch, ServingProperties, Task
from entrypoint.property_sources import COMPAT_ENV, LMI_ENV, parse_properties_text
from tests.support.configuration_files import load_from as load


def error_of(tmp_path: Path, properties: str | None = None, **environ: str) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as caught:
        load(tmp_path, properties, **environ)
    return caught.value


def file_location(tmp_path: Path, line: int) -> str:
    return f"{tmp_path / 'serving.properties'}:{line}"


# ---- defaults -----------------------------------------------------------------------------------------
def test_defaults_without_file_or_environment(tmp_path):
    configuration = load(tmp_path)
    assert configuration.properties == ServingProperties()
    assert configuration.sources == {}
    assert configuration.notes == []
    resolved = configuration.resolved()
    assert set(resolved) == set(ServingProperties.model_fields)
    assert all(entry["source"] == "default" for entry in resolved.values())
    assert resolved["port"] == {"value": 8080, "source": "default"}
    assert resolved["dtype"] == {"value": "auto", "source": "default"}


def test_unrelated_environment_is_ignored(tmp_path):
    configuration = load(tmp_path, PATH="/usr/bin", HOME="/root", MODEL_DIR="/elsewhere")
    assert configuration.properties == ServingProperties()


# ---- precedence ---------------------------------------------------------------------------------------
def test_file_beats_option_env(tmp_path):
    configuration = load(tmp_path, "option.dtype=fp16\n", OPTION_DTYPE="bf16")
    assert configuration.properties.dtype is DType.FP16
    source = configuration.source_of("dtype")
    assert source.kind == "serving.properties"
    assert str(source) == file_location(tmp_path, 1)
    assert any("overrides environment variable OPTION_DTYPE" in note for note in configuration.notes)


def test_file_beats_lmi_and_compat_env(tmp_path):
    configuration = load(tmp_path, "option.tensor_parallel_degree=2\n", TENSOR_PARALLEL_DEGREE="4", SM_NUM_GPUS="8")
    assert configuration.properties.tensor_parallel_degree == 2
    assert str(configuration.source_of("tensor_parallel_degree")) == file_location(tmp_path, 1)


@pytest.mark.parametrize("option_env, lmi_env, name, option_value, lmi_value, expected", [
    ("OPTION_MODEL_ID", "HF_MODEL_ID", "model_id", "/models/a", "org/b", "/models/a"),
    ("OPTION_REVISION", "HF_MODEL_REVISION", "revision", "v2", "main", "v2"),
    ("OPTION_TASK", "HF_TASK", "task", "text-generation", "text-classification", Task.TEXT_GENERATION),
    ("OPTION_TENSOR_PARALLEL_DEGREE", "TENSOR_PARALLEL_DEGREE", "tensor_parallel_degree", "2", "4", 2),
    ("OPTION_JOB_QUEUE_SIZE", "SERVING_JOB_QUEUE_SIZE", "job_queue_size", "10", "20", 10),
])
def test_option_env_beats_lmi_env(tmp_path, option_env, lmi_env, name, option_value, lmi_value, expected):
    configuration = load(tmp_path, **{option_env: option_value, lmi_env: lmi_value})
    assert getattr(configuration.properties, name) == expected
    assert str(configuration.source_of(name)) == f"environment variable {option_env}"


@pytest.mark.parametrize("winner, winner_value, compat, compat_value, name, expected", [
    ("TENSOR_PARALLEL_DEGREE", "2", "SM_NUM_GPUS", "8", "tensor_parallel_degree", 2),
    ("OPTION_TENSOR_PARALLEL_DEGREE", "max", "SM_NUM_GPUS", "8", "tensor_parallel_degree", "max"),
    ("OPTION_QUANTIZE", "dynamic_int8", "HF_MODEL_QUANTIZE", "smoothquant", "quantize", Quantize.DYNAMIC_INT8),
    ("OPTION_TRUST_REMOTE_CODE", "false", "HF_MODEL_TRUST_REMOTE_CODE", "true", "trust_remote_code", False),
    ("OPTION_MAX_ROLLING_BATCH_SIZE", "16", "MAX_BATCH_SIZE", "64", "max_rolling_batch_size", 16),
    ("OPTION_MAX_ROLLING_BATCH_PREFILL_TOKENS", "1024", "MAX_BATCH_PREFILL_TOKENS", "2048",
     "max_rolling_batch_prefill_tokens", 1024),
    ("OPTION_JOB_QUEUE_SIZE", "10", "MAX_CONCURRENT_REQUESTS", "50", "job_queue_size", 10),
    ("SERVING_JOB_QUEUE_SIZE", "20", "MAX_CONCURRENT_REQUESTS", "50", "job_queue_size", 20),
])
def test_lmi_names_beat_sagemaker_and_tgi_names(tmp_path, winner, winner_value, compat, compat_value, name, expected):
    configuration = load(tmp_path, **{winner: winner_value, compat: compat_value})
    assert getattr(configuration.properties, name) == expected
    assert str(configuration.source_of(name)) == f"environment variable {winner}"
    assert any(f"overrides environment variable {compat}" in note for note in configuration.notes)


def test_sagemaker_bind_to_port_beats_file_and_option_env(tmp_path):
    configuration = load(tmp_path, "option.port=7000\n", OPTION_PORT="7001", SAGEMAKER_BIND_TO_PORT="9000")
    assert configuration.properties.port == 9000
    assert str(configuration.source_of("port")) == "environment variable SAGEMAKER_BIND_TO_PORT"


def test_equal_values_from_two_sources_make_no_override_note(tmp_path):
    configuration = load(tmp_path, "option.dtype=fp16\n", OPTION_DTYPE="fp16")
    assert configuration.notes == []


# ---- every environment name maps to its property ------------------------------------------------------
ENV_NAMES = {
    "HF_MODEL_ID": ("model_id", "org/model", "org/model"),
    "HF_MODEL_REVISION": ("revision", "abc123", "abc123"),
    "HF_TASK": ("task", "text_generation", Task.TEXT_GENERATION),
    "TENSOR_PARALLEL_DEGREE": ("tensor_parallel_degree", "4", 4),
    "SERVING_JOB_QUEUE_SIZE": ("job_queue_size", "12", 12),
    "SM_NUM_GPUS": ("tensor_parallel_degree", "8", 8),
    "HF_MODEL_QUANTIZE": ("quantize", "dynamic_int8", Quantize.DYNAMIC_INT8),
    "HF_MODEL_TRUST_REMOTE_CODE": ("trust_remote_code", "true", True),
    "MAX_BATCH_SIZE": ("max_rolling_batch_size", "64", 64),
    "MAX_BATCH_PREFILL_TOKENS": ("max_rolling_batch_prefill_tokens", "2048", 2048),
    "MAX_CONCURRENT_REQUESTS": ("job_queue_size", "50", 50),
    "SAGEMAKER_BIND_TO_PORT": ("port", "9090", 9090),
}


def test_env_name_table_covers_every_lmi_and_compat_name():
    assert set(LMI_ENV) | set(COMPAT_ENV) | {"SAGEMAKER_BIND_TO_PORT"} == set(ENV_NAMES)


@pytest.mark.parametrize("variable", sorted(ENV_NAMES))
def test_env_name_maps_to_property(tmp_path, variable):
    name, raw, expected = ENV_NAMES[variable]
    configuration = load(tmp_path, **{variable: raw})
    assert getattr(configuration.properties, name) == expected
    assert str(configuration.source_of(name)) == f"environment variable {variable}"


@pytest.mark.parametrize("name", sorted(ServingProperties.model_fields))
def test_every_property_has_an_option_env_variable(tmp_path, name):
    default = ServingProperties.model_fields[name].default
    raw = "" if default is None else str(getattr(default, "value", default))
    configuration = load(tmp_path, **{f"OPTION_{name.upper()}": raw})
    assert str(configuration.source_of(name)) == f"environment variable OPTION_{name.upper()}"


# ---- LMI's serving.properties spellings ---------------------------------------------------------------
def test_top_level_engine_key(tmp_path):
    configuration = load(tmp_path, "# comment\nengine=DeepSpeed\n")
    assert configuration.properties.engine is DjlEngine.DEEPSPEED
    assert str(configuration.source_of("engine")) == file_location(tmp_path, 2)
    assert load(tmp_path, "engine=MPI\n").properties.engine is DjlEngine.MPI
    assert load(tmp_path, "engine=Python\n").properties.engine is DjlEngine.PYTHON


def test_lmi_entry_point_is_accepted(tmp_path):
    configuration = load(tmp_path, "engine=DeepSpeed\noption.entryPoint=djl_python.deepspeed\n")
    assert configuration.properties.entry_point == "entrypoint.djl_handler"
    assert configuration.source_of("entry_point").key == "option.entryPoint"
    assert load(tmp_path, None, OPTION_ENTRYPOINT="djl_python.deepspeed").properties.entry_point == "entrypoint.djl_handler"


def test_top_level_job_queue_size_and_camel_case_keys(tmp_path):
    configuration = load(tmp_path, "job_queue_size=7\noption.tensorParallelDegree=2\noption.maxRollingBatchSize=8\n")
    assert configuration.properties.job_queue_size == 7
    assert configuration.properties.tensor_parallel_degree == 2
    assert configuration.properties.max_rolling_batch_size == 8


def test_properties_syntax_separators_comments_and_continuations():
    text = "# comment\n! also a comment\n\noption.a=1\noption.b: 2\noption.c 3\noption.d = four \\\n  five\noption.e=\n"
    assert parse_properties_text(text) == [
        (4, "option.a", "1"), (5, "option.b", "2"), (6, "option.c", "3"), (7, "option.d", "four five"),
        (9, "option.e", ""),
    ]


@pytest.mark.parametrize("key", ["batch_size", "max_batch_delay"])
def test_dynamic_batching_keys_with_the_rolling_batch_make_a_note_not_an_error(tmp_path, key):
    configuration = load(tmp_path, f"engine=DeepSpeed\n{key}=2\n")
    assert configuration.properties == ServingProperties()
    assert len(configuration.notes) == 1 and configuration.warnings == []
    note = configuration.notes[0]
    assert f"{file_location(tmp_path, 2)}: {key} is ignored" in note


@pytest.mark.parametrize("key", ["minWorkers", "maxWorkers", "gpu.minWorkers", "load_on_devices"])
def test_djl_worker_keys_make_a_warning_not_an_error(tmp_path, key):
    configuration = load(tmp_path, f"engine=DeepSpeed\n{key}=2\n")
    assert configuration.properties == ServingProperties()
    assert configuration.notes == []
    assert len(configuration.warnings) == 1
    assert f"{key} ({file_location(tmp_path, 2)}): " in configuration.warnings[0]


# ---- case-insensitive values --------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("fp16", DType.FP16), ("FP16", DType.FP16), ("float16", DType.FP16), ("Float16", DType.FP16), ("half", DType.FP16),
    ("bf16", DType.BF16), ("BFLOAT16", DType.BF16), ("fp32", DType.FP32), ("FLOAT32", DType.FP32),
    ("float", DType.FP32), ("Auto", DType.AUTO), (" fp16 ", DType.FP16),
])
def test_dtype_spellings(tmp_path, raw, expected):
    assert load(tmp_path, None, OPTION_DTYPE=raw).properties.dtype is expected


@pytest.mark.parametrize("raw, expected", [("TRUE", True), ("true", True), ("True", True), ("1", True), ("yes", True),
                                           ("on", True), ("false", False), ("FALSE", False), ("0", False),
                                           ("no", False), ("Off", False)])
def test_boolean_spellings(tmp_path, raw, expected):
    assert load(tmp_path, f"option.trust_remote_code={raw}\n").properties.trust_remote_code is expected


@pytest.mark.parametrize("name, raw, expected", [
    ("rolling_batch", "DISABLE", RollingBatch.DISABLE), ("rolling_batch", "Disabled", RollingBatch.DISABLE),
    ("rolling_batch", "DeepSpeed", RollingBatch.DEEPSPEED), ("quantize", "SmoothQuant", Quantize.SMOOTHQUANT),
    ("quantize", "Dynamic-Int8", Quantize.DYNAMIC_INT8), ("engine", "DEEPSPEED", DjlEngine.DEEPSPEED),
    ("tensor_parallel_degree", "MAX", "max"), ("tensor_parallel_degree", " 4 ", 4),
])
def test_enum_spellings(tmp_path, name, raw, expected):
    assert getattr(load(tmp_path, f"option.{name}={raw}\n").properties, name) == expected


# ---- invalid values: key, source, bad value, allowed values ---------------------------------------------
INVALID = [
    ("task", "text-classification", "allowed values are text-generation"),
    ("dtype", "fp8", "allowed values are auto, fp32, fp16, bf16"),
    ("dtype", "int8", "set quantize=dynamic_int8"),
    ("trust_remote_code", "maybe", "expected true or false"),
    ("low_cpu_mem_usage", "sometimes", "expected true or false"),
    ("training_mp_size", "0", "out of range (>= 1 and <= 1)"),
    ("training_mp_size", "two", "expected a whole number (>= 1 and <= 1)"),
    ("gpu_memory_utilization", "0", "out of range (> 0.0 and <= 1.0)"),
    ("gpu_memory_utilization", "1.5", "out of range (> 0.0 and <= 1.0)"),
    ("cpu_kv_cache_bytes", "1000", "out of range (>= 1048576)"),
    ("batch_size", "0", "out of range (>= 1 and <= 4096)"),
    ("max_batch_delay", "-5", "out of range (>= 0 and <= 60000)"),
    ("tensor_parallel_degree", "0", "expected a positive integer or max"),
    ("tensor_parallel_degree", "-2", "expected a positive integer or max"),
    ("tensor_parallel_degree", "1.5", "expected a positive integer or max"),
    ("tensor_parallel_degree", "all", "expected a positive integer or max"),
    ("rolling_batch", "sometimes", "allowed values are auto, deepspeed, disable"),
    ("rolling_batch", "vllm", "vLLM is not part of this container"),
    ("rolling_batch", "lmi-dist", "lmi-dist is not part of this container"),
    ("max_rolling_batch_size", "0", "out of range (>= 1 and <= 4096)"),
    ("max_rolling_batch_size", "5000", "out of range (>= 1 and <= 4096)"),
    ("max_rolling_batch_size", "many", "expected a whole number (>= 1 and <= 4096)"),
    ("max_rolling_batch_prefill_tokens", "0", "out of range (>= 1)"),
    ("max_tokens", "-1", "out of range (>= 1)"),
    ("quantize", "int4", "allowed values are smoothquant, dynamic_int8"),
    ("quantize", "awq", "AWQ checkpoints are not supported"),
    ("quantize", "bitsandbytes", "use quantize=dynamic_int8"),
    ("smoothquant_alpha", "1.5", "must be within [0, 1]"),
    ("smoothquant_alpha", "strong", "expected a number"),
    ("enable_cuda_graph", "perhaps", "expected true or false"),
    ("correctness_gate", "sometimes", "expected true or false"),
    ("fastgen", "auto", "expected true or false"),
    ("kernel_injection", "sometimes", "expected auto, true or false"),
    ("triangular_masking", "2", "expected true or false"),
    ("return_tuple", "nope", "expected true or false"),
    ("engine", "vllm", "allowed values are deepspeed, python, mpi"),
    ("entry_point", "my.handler", "allowed values are entrypoint.djl_handler"),
    ("output_formatter", "xml", "allowed values are json, jsonlines, sse"),
    ("port", "0", "out of range (>= 1 and <= 65535)"),
    ("port", "70000", "out of range (>= 1 and <= 65535)"),
    ("port", "http", "expected a whole number (>= 1 and <= 65535)"),
    ("job_queue_size", "0", "out of range (>= 1)"),
    ("max_request_size", "100", "out of range (>= 1024)"),
    ("predict_timeout", "0", "out of range (> 0)"),
    ("predict_timeout", "soon", "expected a number (> 0)"),
    ("request_read_timeout", "0", "out of range (> 0)"),
    ("model_loading_timeout", "-5", "out of range (> 0)"),
]
FREE_TEXT = {"model_id", "revision", "checkpoint", "model_cache_dir", "api_key",
             "smoothquant_calibration_data"}  # any string is a valid value


def test_invalid_value_table_covers_every_constrained_field():
    assert {name for name, _, _ in INVALID} | FREE_TEXT == set(ServingProperties.model_fields)


@pytest.mark.parametrize("name, raw, expected", INVALID)
def test_invalid_value_in_file(tmp_path, name, raw, expected):
    error = error_of(tmp_path, f"# header\noption.{name}={raw}\n")
    assert len(error.problems) == 1
    message = str(error)
    assert f"option.{name}" in message
    assert file_location(tmp_path, 2) in message
    assert repr(raw) in message
    assert expected in message


@pytest.mark.parametrize("name, raw, expected", INVALID)
def test_invalid_value_in_environment(tmp_path, name, raw, expected):
    variable = f"OPTION_{name.upper()}"
    error = error_of(tmp_path, None, **{variable: raw})
    message = str(error)
    assert f"environment variable {variable}" in message
    assert repr(raw) in message
    assert expected in message


def test_invalid_value_from_a_compat_name_names_it_and_the_property(tmp_path):
    message = str(error_of(tmp_path, None, SM_NUM_GPUS="eight"))
    assert "SM_NUM_GPUS (tensor_parallel_degree)" in message
    assert "environment variable SM_NUM_GPUS" in message
    assert "'eight'" in message
    assert "expected a positive integer or max" in message


# ---- unknown keys and typo suggestions ----------------------------------------------------------------
def test_env_typo_suggests_the_property(tmp_path):
    error = error_of(tmp_path, None, OPTION_MAX_ROLING_BATCH_SIZE="64")
    message = str(error)
    assert "OPTION_MAX_ROLING_BATCH_SIZE" in message
    assert "environment variable OPTION_MAX_ROLING_BATCH_SIZE" in message
    assert "did you mean max_rolling_batch_size" in message


def test_file_typo_suggests_the_property_with_file_and_line(tmp_path):
    error = error_of(tmp_path, "engine=DeepSpeed\noption.tensor_paralel_degree=2\n")
    message = str(error)
    assert "option.tensor_paralel_degree" in message
    assert file_location(tmp_path, 2) in message
    assert "did you mean option.tensor_parallel_degree" in message


def test_top_level_key_without_option_prefix_suggests_it(tmp_path):
    message = str(error_of(tmp_path, "tensor_parallel_degree=2\n"))
    assert "did you mean option.tensor_parallel_degree" in message


def test_unknown_key_without_a_close_match_points_at_the_example(tmp_path):
    message = str(error_of(tmp_path, "option.frobnicate=1\n"))
    assert "option.frobnicate" in message
    assert "unknown key" in message
    assert "serving.properties.example" in message


# ---- rules across fields ------------------------------------------------------------------------------
def test_smoothquant_alpha_without_smoothquant(tmp_path):
    error = error_of(tmp_path, "option.smoothquant_alpha=0.7\n")
    message = str(error)
    assert "smoothquant_alpha=0.7" in message
    assert "quantize=(unset)" in message
    assert f"smoothquant_alpha from {file_location(tmp_path, 1)}" in message


def test_smoothquant_alpha_with_dynamic_int8(tmp_path):
    message = str(error_of(tmp_path, None, OPTION_SMOOTHQUANT_ALPHA="0.5", HF_MODEL_QUANTIZE="dynamic_int8"))
    assert "smoothquant_alpha=0.5" in message
    assert "quantize=dynamic_int8" in message
    assert "quantize from environment variable HF_MODEL_QUANTIZE" in message


def test_smoothquant_alpha_with_smoothquant_is_valid(tmp_path):
    properties = load(tmp_path, "option.quantize=smoothquant\noption.smoothquant_alpha=0.8\n").properties
    assert properties.quantize is Quantize.SMOOTHQUANT
    assert properties.smoothquant_alpha == 0.8


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "auto"])
def test_smoothquant_takes_any_dtype(tmp_path, dtype):
    # our W8A8 layers quantize whatever the activation dtype is (the plan refuses fp16 on CPU separately)
    properties = load(tmp_path, f"option.quantize=smoothquant\noption.dtype={dtype}\n").properties
    assert properties.quantize is Quantize.SMOOTHQUANT


def test_smoothquant_calibration_data_without_smoothquant(tmp_path):
    message = str(error_of(tmp_path, None, OPTION_SMOOTHQUANT_CALIBRATION_DATA="/data/calib.txt",
                           OPTION_QUANTIZE="dynamic_int8"))
    assert "smoothquant_calibration_data=/data/calib.txt" in message and "quantize=dynamic_int8" in message


def test_presharded_checkpoints_are_refused(tmp_path):
    message = str(error_of(tmp_path, None, OPTION_TRAINING_MP_SIZE="2"))
    assert "OPTION_TRAINING_MP_SIZE" in message and "'2'" in message
    assert load(tmp_path, "option.checkpoint=ds.json\n").properties.checkpoint == "ds.json"


# ---- several problems at once -------------------------------------------------------------------------
def test_all_field_problems_are_reported_together(tmp_path):
    error = error_of(tmp_path, "option.dtype=fp8\noption.tensor_paralel_degree=2\n",
                     OPTION_PORT="http", OPTION_MAX_ROLING_BATCH_SIZE="4", MAX_BATCH_SIZE="0")
    assert len(error.problems) == 5
    message = str(error)
    assert message.startswith("invalid configuration (5 problems):")
    for fragment in ("option.dtype", "did you mean option.tensor_parallel_degree", "OPTION_PORT",
                     "did you mean max_rolling_batch_size", "MAX_BATCH_SIZE (max_rolling_batch_size)"):
        assert fragment in message


def test_all_cross_field_problems_are_reported_together(tmp_path):
    error = error_of(tmp_path, "option.smoothquant_calibration_data=c.txt\noption.smoothquant_alpha=0.5\n")
    assert len(error.problems) == 2
    message = str(error)
    assert "smoothquant_calibration_data=c.txt" in message
    assert "smoothquant_alpha=0.5" in message


def test_dynamic_batching_keys_apply_with_rolling_batch_disabled(tmp_path):
    configuration = load(tmp_path, "engine=DeepSpeed\nbatch_size=4\nmax_batch_delay=20\noption.rolling_batch=disable\n")
    assert configuration.properties.batch_size == 4 and configuration.properties.max_batch_delay == 20
    assert configuration.notes == []


@pytest.mark.parametrize("key", ["low_cpu_mem_usage", "triangular_masking", "return_tuple"])
def test_always_on_settings_refuse_false_saying_why(tmp_path, key):
    with pytest.raises(ConfigurationError) as error:
        load(tmp_path, f"option.{key}=false\n")
    assert key in str(error.value) and "not supported" in str(error.value)
