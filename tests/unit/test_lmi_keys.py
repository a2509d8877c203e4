"""LMI's documented keys in serving.properties, OPTION_* variables and DJL's properties: mapped onto a property
here, or accepted and named in one start-up warning; keys that are neither LMI's nor ours stay errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from entrypoint import lmi_keys
from entrypoint.configuration import ConfigurationError, load_configuration_from_properties
from entrypoint.lmi_keys import FIXED, IGNORED, LMI_KEYS, MAPPED, SAME
from entrypoint.property_sources import canonical_name, normalize_key
from handlers.serving_properties import OutputFormatter, ServingProperties
from tests.support.configuration_files import load_from as load

ACCEPTED = [entry for entry in LMI_KEYS if entry.kind != SAME]
OPTION_ACCEPTED = [entry for entry in ACCEPTED if entry.is_option]


def error_of(tmp_path: Path, properties: str | None = None, **environ: str) -> str:
    with pytest.raises(ConfigurationError) as caught:
        load(tmp_path, properties, **environ)
    return str(caught.value)


def at(tmp_path: Path, line: int) -> str:
    return f"{tmp_path / 'serving.properties'}:{line}"


# ---- the table ----------------------------------------------------------------------------------------
def test_the_table_is_consistent_with_the_properties():
    keys = [entry.key.lower() for entry in LMI_KEYS]
    assert len(keys) == len(set(keys)), "an LMI key is listed twice"
    for entry in LMI_KEYS:
        assert entry.kind in (SAME, MAPPED, IGNORED, FIXED) and entry.meaning.strip() and entry.documented
        normalized = normalize_key(entry.bare)
        if entry.kind == SAME:  # parsed as a property: the table only documents it
            parsed = canonical_name(normalized) if entry.is_option else entry.target
            assert parsed == entry.target and entry.target in ServingProperties.model_fields, entry.key
        else:  # never a property's own name, which would make the row dead
            assert canonical_name(normalized) is None, entry.key
        if entry.kind == MAPPED:
            assert entry.target in ServingProperties.model_fields, entry.key
        if entry.kind in (IGNORED, FIXED):
            assert entry.target is None, entry.key


def test_the_keys_the_issue_names_are_all_in_the_table():
    wanted = ["option.enable_streaming", "option.max_model_len", "option.device_map", "option.task",
              "option.entryPoint", "option.rolling_batch", "option.max_rolling_batch_size",
              "option.tensor_parallel_degree", "option.dtype", "option.trust_remote_code", "option.revision",
              "option.quantize", "option.output_formatter", "load_on_devices", "engine", "option.max_input_len",
              "option.max_output_len", "option.enable_prefix_caching", "option.gpu_memory_utilization",
              "option.enforce_eager", "option.model_loading_timeout", "option.speculative_draft_model",
              "option.speculative_length", "option.draft_model_id"]
    listed = {entry.key for entry in LMI_KEYS}
    assert [key for key in wanted if key not in listed] == []


# ---- every LMI key is accepted, from the file and from the environment ----------------------------------
@pytest.mark.parametrize("entry", ACCEPTED, ids=lambda entry: entry.key)
def test_every_lmi_key_is_accepted_in_serving_properties(tmp_path, entry):
    configuration = load(tmp_path, f"{entry.key}={entry.example}\n")
    if entry.kind == IGNORED:
        assert len(configuration.warnings) == 1
        assert f"{entry.key} ({at(tmp_path, 1)}): {entry.meaning}" in configuration.warnings[0]
        assert configuration.properties == ServingProperties()
    else:
        assert configuration.warnings == []


@pytest.mark.parametrize("entry", OPTION_ACCEPTED, ids=lambda entry: entry.environment)
def test_every_lmi_option_key_is_accepted_as_an_option_variable(tmp_path, entry):
    configuration = load(tmp_path, None, **{entry.environment: entry.example})
    if entry.kind == IGNORED:
        assert f"{entry.key} (environment variable {entry.environment}): {entry.meaning}" in configuration.warnings[0]
    else:
        assert configuration.warnings == []


def test_lmi_keys_from_djl_properties_follow_the_same_table():
    configuration = load_configuration_from_properties(
        {"model_id": "m", "max_model_len": "2048", "device_map": "auto", "enable_prefix_caching": "true",
         "pipeline_parallel_degree": "1"}, environ={})
    assert configuration.properties.max_tokens == 2048
    assert len(configuration.warnings) == 1
    warning = configuration.warnings[0]
    assert warning.startswith("2 LMI keys accepted but ignored")
    assert "option.device_map (DJL properties): tensor_parallel_degree decides the GPUs" in warning
    assert "option.enable_prefix_caching (DJL properties): no prefix cache" in warning


# ---- mapped keys --------------------------------------------------------------------------------------
def test_the_issue_s_lmi_file_starts_with_one_warning(tmp_path):
    configuration = load(tmp_path, "engine=MPI\noption.enable_streaming=true\noption.max_model_len=2048\n"
                                   "option.device_map=auto\noption.rolling_batch=auto\nminWorkers=1\n")
    properties = configuration.properties
    assert properties.max_tokens == 2048
    assert properties.output_formatter is OutputFormatter.JSONLINES
    assert configuration.source_of("max_tokens").key == "option.max_model_len"
    assert str(configuration.source_of("max_tokens")) == at(tmp_path, 3)
    assert f"{at(tmp_path, 3)}: option.max_model_len is LMI's key for max_tokens here" in "\n".join(configuration.notes)
    assert configuration.warnings == [
        "2 LMI keys accepted but ignored (no effect in this container; docs/lmi-migration.md):\n"
        f"  option.device_map ({at(tmp_path, 4)}): tensor_parallel_degree decides the GPUs (AutoTP shards every layer "
        "across them); there is no layer-per-GPU device map\n"
        f"  minWorkers ({at(tmp_path, 6)}): one process group (one rank per tensor-parallel GPU) serves the one model; "
        "there is no worker pool"]


@pytest.mark.parametrize("value, expected", [("true", OutputFormatter.JSONLINES), ("TRUE", OutputFormatter.JSONLINES),
                                             ("huggingface", OutputFormatter.JSONLINES),
                                             ("false", OutputFormatter.JSON)])
def test_enable_streaming_values(tmp_path, value, expected):
    assert load(tmp_path, f"option.enable_streaming={value}\n").properties.output_formatter is expected


def test_enable_streaming_with_a_value_lmi_never_had_names_key_value_and_line(tmp_path):
    message = error_of(tmp_path, "option.enable_streaming=sometimes\n")
    assert (f"option.enable_streaming = 'sometimes' (from {at(tmp_path, 1)}): expected true, false or huggingface"
            in message)


def test_an_explicit_output_formatter_wins_over_enable_streaming_from_the_same_source(tmp_path):
    configuration = load(tmp_path, "option.enable_streaming=true\noption.output_formatter=sse\n")
    assert configuration.properties.output_formatter is OutputFormatter.SSE
    assert (f"output_formatter: {at(tmp_path, 2)} ('sse') overrides {at(tmp_path, 1)} (option.enable_streaming) "
            "('jsonlines')") in configuration.notes


def test_max_tokens_wins_over_max_model_len_but_the_file_wins_over_the_environment(tmp_path):
    assert load(tmp_path, "option.max_model_len=2048\noption.max_tokens=1024\n").properties.max_tokens == 1024
    configuration = load(tmp_path, "option.max_model_len=2048\n", OPTION_MAX_TOKENS="1024")
    assert configuration.properties.max_tokens == 2048  # LMI: serving.properties beats the environment


def test_a_bad_max_model_len_names_the_lmi_key_and_the_property(tmp_path):
    message = error_of(tmp_path, None, OPTION_MAX_MODEL_LEN="lots")
    assert ("environment variable OPTION_MAX_MODEL_LEN (max_tokens) = 'lots': expected a whole number (>= 1)"
            in message)


def test_vllm_names_of_batching_properties(tmp_path):
    properties = load(tmp_path, "option.max_num_seqs=48\noption.max_num_batched_tokens=2048\n"
                                "option.quantization=dynamic_int8\n").properties
    assert (properties.max_rolling_batch_size, properties.max_rolling_batch_prefill_tokens,
            properties.quantize.value) == (48, 2048, "dynamic_int8")


def test_load_in_8bit_true_is_refused_like_bitsandbytes_and_false_is_fine(tmp_path):
    message = error_of(tmp_path, "option.load_in_8bit=true\n")
    assert f"option.load_in_8bit = 'true' (from {at(tmp_path, 1)}): bitsandbytes 8-bit loading is not supported" \
        in message and "option.quantize=dynamic_int8" in message
    configuration = load(tmp_path, "option.load_in_4bit=false\n")
    assert configuration.properties.quantize is None and configuration.warnings == []


# ---- fixed keys ---------------------------------------------------------------------------------------
def test_pipeline_parallelism_other_than_1_is_an_error(tmp_path):
    message = error_of(tmp_path, "option.pipeline_parallel_degree=2\n")
    assert (f"option.pipeline_parallel_degree = '2' (from {at(tmp_path, 1)}): only 1 is supported here: no pipeline "
            "parallelism" in message)
    assert "OPTION_CLUSTER_SIZE = '2': only 1 is supported here" in error_of(tmp_path, "", OPTION_CLUSTER_SIZE="2")
    assert load(tmp_path, "option.pipeline_parallel_degree=1\noption.cluster_size=1\n").warnings == []


# ---- what stays an error ------------------------------------------------------------------------------
def test_a_key_that_is_neither_lmi_s_nor_ours_is_still_an_error_with_the_hint(tmp_path):
    message = error_of(tmp_path, "option.max_model_length=2048\n")
    assert f"option.max_model_length (from {at(tmp_path, 1)}): unknown key; did you mean option.max_model_len?" \
        in message
    message = error_of(tmp_path, "option.frobnicate=1\n")
    assert "unknown key; see serving.properties.example for every key (docs/lmi-migration.md for LMI's)" in message
    assert "did you mean enable_prefix_caching?" in error_of(tmp_path, None, OPTION_ENABLE_PREFIX_CACHIN="true")


def test_ignored_keys_together_with_a_bad_value_report_the_error(tmp_path):
    message = error_of(tmp_path, "option.enforce_eager=true\noption.dtype=int7\n")
    assert "option.dtype (dtype) = 'int7'" in message and "enforce_eager" not in message


def test_no_lmi_keys_no_warning(tmp_path):
    configuration = load(tmp_path, "option.max_tokens=1024\n")
    assert configuration.warnings == [] and configuration.notes == []


def test_lookups_ignore_same_rows():
    assert lmi_keys.option_key("max_tokens") is None  # a property: parsed as one, never through the table
    assert lmi_keys.option_key("max_model_len").target == "max_tokens"
    assert lmi_keys.top_level_key("MINWORKERS").kind == IGNORED
    assert lmi_keys.top_level_key("job_queue_size") is None
