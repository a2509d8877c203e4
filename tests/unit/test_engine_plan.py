"""The engine policy table and the planner that applies it (no torch, no weights)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from handlers.serving_properties import ServingProperties
from handlers import engine_policy as policy
from handlers.engine_plan import Device, ModelShape, PlanError, cpu_device, detect_device, plan_engine
from handlers import engine_registry
from handlers.engine_policy import AUTOTP, FASTGEN, KERNEL_INJECTION

ENGINES = engine_registry.engines()

CPU = Device("cpu", 1, "test CPU")
GPU1 = Device("cuda", 1, "test GPU")
GPU8 = Device("cuda", 8, "test GPU")

# The embedded default model's shape (SmolLM2-135M-Instruct).
SMOL = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_attention_heads": 9,
        "num_key_value_heads": 3, "num_hidden_layers": 30, "hidden_size": 576, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5}
LLAMA_7B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_attention_heads": 32,
            "num_key_value_heads": 32, "num_hidden_layers": 32, "hidden_size": 4096, "max_position_embeddings": 4096,
            "torch_dtype": "float16", "rms_norm_eps": 1e-5}
GPTJ = {"model_type": "gptj", "architectures": ["GPTJForCausalLM"], "n_head": 16, "n_layer": 28, "n_embd": 4096,
        "n_positions": 2048, "torch_dtype": "float32"}


@pytest.fixture(autouse=True)
def gpu_machine_has_the_fastgen_kernels(monkeypatch):
    """The pretend GPU machines here have the [gpu] extra (deepspeed-kernels) installed, whatever this machine
    has; the tests of a machine without it pass `importable` themselves."""
    monkeypatch.setattr("handlers.engine_plan.module_importable", lambda name: True)
    monkeypatch.setattr("handlers.fastgen_readiness.fastgen_ops_unavailable", lambda: None)


def props(**values) -> ServingProperties:
    return ServingProperties(**values)


def plan_error(properties, config, device) -> PlanError:
    with pytest.raises(PlanError) as caught:
        plan_engine(properties, config, device)
    return caught.value


def ruled_out(plan) -> dict[str, str]:
    return dict(plan.ruled_out)


# ---- the table ----------------------------------------------------------------------------------------
def test_preference_names_only_engines_that_exist_and_run_on_that_device():
    for kind in ("cpu", "cuda"):
        order = engine_registry.preference(kind)
        assert order and set(order) <= set(ENGINES)
        assert all(kind in ENGINES[name].devices for name in order)
    assert engine_registry.preference("cuda") == (FASTGEN, KERNEL_INJECTION, AUTOTP)
    assert engine_registry.preference("cpu") == (AUTOTP,)
    assert all(entry.policy.preference_reason for entry in ENGINES.values())


@pytest.mark.parametrize("model_type", sorted(policy.ARCHITECTURES))
def test_every_row_has_a_verdict_with_a_reason_for_every_engine(model_type):
    row = policy.ARCHITECTURES[model_type]
    assert row.model_type == model_type and row.known
    assert set(row.engines) <= set(ENGINES)
    verdicts = {name: row.verdict(name, entry.policy) for name, entry in ENGINES.items()}
    for verdict in [*verdicts.values(), row.smoothquant]:
        assert verdict.reason.strip()
    for condition in row.conditions:
        assert condition.engine in ENGINES and condition.reason.strip()
    # AutoTP is the fallback that makes every architecture servable, except BLOOM: transformers 5 has no
    # SDPA attention for it (kernel injection is its engine once that works with transformers 5).
    assert verdicts[AUTOTP].supported or model_type == "bloom"


def test_engine_specs_and_quantization_are_consistent():
    for name, spec in ENGINES.items():
        assert spec.name == name and spec.summary and spec.batching_reason
        assert spec.devices <= {"cpu", "cuda"} and spec.dtypes <= {"fp32", "fp16", "bf16"}
        if spec.dtypes != {"fp32", "fp16", "bf16"}:
            assert spec.dtype_reason
    for method, support in policy.QUANTIZATION.items():
        assert support.method == method
        verdicts = [entry.policy.quantization_verdict(method) for entry in ENGINES.values()]
        assert all(method in entry.policy.quantization for entry in ENGINES.values())
        assert all(verdict.reason for verdict in verdicts)
        assert any(verdict.supported for verdict in verdicts)
    assert set(policy.QUANTIZATION) == {"smoothquant", "dynamic_int8"}


def test_fastgen_rows_match_the_installed_deepspeed():
    """The model_types build_hf_engine accepts in the installed DeepSpeed are the FastGen rows. The source is
    read as text: importing deepspeed takes seconds (it imports torch) and may try to build ops."""
    import importlib.util
    import re
    from pathlib import Path

    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("deepspeed is not installed")
    factory = Path(list(spec.submodule_search_locations)[0]) / "inference" / "v2" / "engine_factory.py"
    accepted = set(re.findall(r'model_config\.model_type == "([a-z0-9_]+)"', factory.read_text()))
    assert accepted, f"no model_type checks found in {factory}"
    fastgen_rows = {name for name, row in policy.ARCHITECTURES.items() if row.engines[FASTGEN].supported}
    assert fastgen_rows == accepted


def test_kernel_injection_rows_follow_the_h200_measurements():
    from handlers.kernel_injection_model import ARCHITECTURES as DRIVEN
    from handlers.kernel_injection_model import WRONG_ON_THE_KERNELS

    runs = {name for name, row in policy.ARCHITECTURES.items() if row.engines[KERNEL_INJECTION].supported}
    assert runs == set(DRIVEN) - set(WRONG_ON_THE_KERNELS) == {"gpt2", "gptj", "gpt_neox", "opt", "bloom"}
    for name, fragment in [("gpt2", "1.05x"), ("gptj", "3.33x / 5.47x"), ("opt", "against FastGen not measured"),
                           ("bloom", "AutoTP cannot run it"), ("gpt_neox", "Pythia-6.9B"), ("llama", "42x"),
                           ("gpt_neo", "48x")]:
        assert fragment in policy.ARCHITECTURES[name].engines[KERNEL_INJECTION].reason, name
    assert {name for name, row in policy.ARCHITECTURES.items() if row.prefer} == {"gpt2", "gptj", "gpt_neox"}


def test_unknown_model_type_gets_the_autotp_only_fallback():
    row = policy.policy_for("mamba")
    assert not row.known
    assert [name for name, entry in ENGINES.items() if row.verdict(name, entry.policy).supported] == [AUTOTP]
    assert policy.policy_for("LLAMA") is policy.ARCHITECTURES["llama"]


# ---- engine choice ------------------------------------------------------------------------------------
def test_cpu_llama_gets_autotp_with_gpu_engines_ruled_out():
    plan = plan_engine(props(), SMOL, CPU)
    assert plan.engine == AUTOTP
    assert plan.rolling_batch is True
    assert plan.tensor_parallel_degree == 1
    assert plan.dtype == "fp32"
    assert (plan.model_type, plan.architecture) == ("llama", "LlamaForCausalLM")
    reasons = ruled_out(plan)
    assert set(reasons) == {FASTGEN, KERNEL_INJECTION}
    assert all("GPU only" in why for why in reasons.values())
    assert "only engine that runs on CPU" in plan.reason


def test_gpu_llama_gets_fastgen():
    plan = plan_engine(props(), LLAMA_7B, GPU1)
    assert plan.engine == FASTGEN
    assert plan.rolling_batch is True
    assert plan.dtype == "fp16"  # the checkpoint's dtype
    reasons = ruled_out(plan)
    assert "42x" in reasons[KERNEL_INJECTION]
    assert "ranks below fastgen" in reasons[AUTOTP]
    # the figures say where they come from: this server (RESULTS.md) vs DeepSpeed's bare loop (FACTS)
    assert "150 / 2,588 / 3,436" in plan.reason and "RESULTS.md section 10" in plan.reason
    assert "bare put() loop" in plan.reason


def test_gpu_gptj_gets_kernel_injection_measured_fastest_and_deepspeed_mode_keeps_autotp():
    plan = plan_engine(props(), GPTJ, GPU1)
    assert (plan.engine, plan.rolling_batch) == (KERNEL_INJECTION, False)
    assert "measured fastest for gptj" in plan.reason and "3.33x / 5.47x" in plan.reason
    assert any("measured fastest for gptj and batches dynamically" in note for note in plan.notes)
    assert "kernel_injection measured faster for gptj" in ruled_out(plan)[AUTOTP]
    rolling = plan_engine(props(rolling_batch="deepspeed"), GPTJ, GPU1)
    assert (rolling.engine, rolling.rolling_batch) == (AUTOTP, True)
    reasons = ruled_out(rolling)
    assert "no inference-v2 implementation" in reasons[FASTGEN]
    assert "no continuous batching" in reasons[KERNEL_INJECTION]


def test_gpu_gptj_with_rolling_batch_disabled_gets_kernel_injection():
    plan = plan_engine(props(rolling_batch="disable"), GPTJ, GPU1)
    assert plan.engine == KERNEL_INJECTION
    assert plan.rolling_batch is False
    assert plan.dtype == "fp16"  # fp32 checkpoint -> fp16 on GPU
    assert "kernel_injection measured faster for gptj" in ruled_out(plan)[AUTOTP]
    assert any("rolling_batch=disable" in note for note in plan.notes)


def test_gpu_llama_with_rolling_batch_disabled_still_prefers_fastgen_without_continuous_batching():
    plan = plan_engine(props(rolling_batch="disable"), LLAMA_7B, GPU1)
    assert (plan.engine, plan.rolling_batch) == (FASTGEN, False)


def test_fp32_on_gpu_rules_out_fastgen():
    plan = plan_engine(props(dtype="fp32"), LLAMA_7B, GPU1)
    assert plan.engine == AUTOTP
    assert "fp16 and bf16" in ruled_out(plan)[FASTGEN]


def test_bf16_checkpoint_is_kept_on_gpu():
    assert plan_engine(props(), {**LLAMA_7B, "dtype": "bfloat16", "torch_dtype": None}, GPU1).dtype == "bf16"


def test_opt_350m_is_refused_by_fastgen():
    config = {"model_type": "opt", "num_attention_heads": 16, "do_layer_norm_before": False}
    plan = plan_engine(props(), config, GPU1)
    assert plan.engine == AUTOTP
    assert "do_layer_norm_before" in ruled_out(plan)[FASTGEN]
    assert plan_engine(props(), {**config, "do_layer_norm_before": True}, GPU1).engine == FASTGEN


def test_unknown_model_type_gets_autotp_with_a_note():
    plan = plan_engine(props(), {"model_type": "mamba", "num_attention_heads": 8}, GPU1)
    assert plan.engine == AUTOTP
    assert any("mamba is not in the engine policy table" in note for note in plan.notes)
    assert plan_engine(props(), {"num_attention_heads": 8}, CPU).engine == AUTOTP  # no model_type at all


def test_checkpoint_rules_out_fastgen():
    plan = plan_engine(props(checkpoint="ds.json", dtype="fp16"), LLAMA_7B, GPU1)
    assert plan.engine == AUTOTP
    assert "checkpoint=ds.json" in ruled_out(plan)[FASTGEN]


# ---- tensor parallel degree ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", [CPU, GPU8])
def test_degree_that_does_not_divide_the_heads(device):
    error = plan_error(props(tensor_parallel_degree=2), SMOL, device)
    message = str(error)
    assert error.key == "tensor_parallel_degree"
    assert "tensor_parallel_degree=2" in message
    assert "9 attention heads" in message and "3 key/value heads" in message
    assert "valid degrees: 1, 3" in message


def test_valid_degree_for_the_heads():
    assert plan_engine(props(tensor_parallel_degree=3), SMOL, GPU8).tensor_parallel_degree == 3
    assert plan_engine(props(tensor_parallel_degree=3), SMOL, CPU).tensor_parallel_degree == 3  # 3 CPU ranks


def test_degree_above_the_visible_gpu_count():
    message = str(plan_error(props(tensor_parallel_degree=4), LLAMA_7B, Device("cuda", 2, "test GPU")))
    assert "tensor_parallel_degree=4" in message
    assert "needs 4 GPUs" in message and "only 2 are visible" in message


def test_max_is_every_visible_gpu():
    assert plan_engine(props(tensor_parallel_degree="max"), LLAMA_7B, GPU8).tensor_parallel_degree == 8
    message = str(plan_error(props(tensor_parallel_degree="max"), SMOL, GPU8))
    assert "max (= 8 visible GPUs)" in message and "valid degrees: 1, 3" in message


def test_max_on_cpu_is_one_process():
    plan = plan_engine(props(tensor_parallel_degree="max"), SMOL, CPU)
    assert plan.tensor_parallel_degree == 1
    assert any("max resolves to 1 on a CPU-only machine" in note for note in plan.notes)


def test_head_counts_under_other_config_names():
    shape = ModelShape.from_config(GPTJ)
    assert (shape.heads, shape.kv_heads, shape.layers, shape.context) == (16, 16, 28, 2048)
    falcon = ModelShape.from_config({"model_type": "falcon", "num_attention_heads": 64, "num_kv_heads": 8})
    assert (falcon.heads, falcon.kv_heads) == (64, 8)
    multimodal = ModelShape.from_config({"model_type": "llava", "text_config": {"num_attention_heads": 32,
                                                                                "num_key_value_heads": 8}})
    assert (multimodal.model_type, multimodal.heads, multimodal.kv_heads) == ("llava", 32, 8)


def test_missing_head_count_is_a_note_not_an_error():
    plan = plan_engine(props(tensor_parallel_degree=2), {"model_type": "llama"}, CPU)
    assert plan.tensor_parallel_degree == 2
    assert any("not checked" in note for note in plan.notes)


@pytest.mark.parametrize("model_type, architecture, reason", [
    ("bloom", "BloomForCausalLM", "build_alibi_tensor"),
    ("gpt2", "GPT2LMHeadModel", "AutoTP refuses GPT-2 by name"),
    ("mixtral", "MixtralForCausalLM", "merging or splitting tensors (WeightConverter for .experts.*.w1.weight"),
])
def test_architectures_that_cannot_be_sharded_are_refused_above_degree_1(model_type, architecture, reason):
    config = {"model_type": model_type, "architectures": [architecture], "num_attention_heads": 32,
              "num_key_value_heads": 8, "torch_dtype": "float16"}
    error = plan_error(props(tensor_parallel_degree=2), config, GPU8)
    assert error.key == "tensor_parallel_degree"
    assert f"{architecture} cannot be sharded" in str(error) and reason in str(error)
    assert "use tensor_parallel_degree=1" in str(error)
    assert plan_engine(props(tensor_parallel_degree=1), config, GPU8).tensor_parallel_degree == 1


def test_bloom_runs_on_kernel_injection_on_a_gpu_and_is_refused_on_a_cpu_naming_the_missing_sdpa_attention():
    config = {"model_type": "bloom", "architectures": ["BloomForCausalLM"], "n_head": 8, "torch_dtype": "float16"}
    plan = plan_engine(props(), config, GPU8)
    assert (plan.engine, plan.rolling_batch) == (KERNEL_INJECTION, False)
    assert any("continuous batching is off because only kernel_injection" in note for note in plan.notes)
    assert "no SDPA attention for BLOOM" in ruled_out(plan)[AUTOTP]
    assert "no SDPA attention for BLOOM" in str(plan_error(props(), config, CPU))


def test_kernel_injection_true_insists_and_a_plan_error_says_why_it_cannot():
    plan = plan_engine(props(kernel_injection=True), GPTJ, GPU1)
    assert (plan.engine, plan.rolling_batch) == (KERNEL_INJECTION, False)
    assert "kernel_injection=true insists on it" in plan.reason
    error = plan_error(props(kernel_injection=True), {"model_type": "mistral"}, GPU1)
    assert error.key == "kernel_injection" and "no kernel-injection policy" in str(error)
    assert "unset kernel_injection" in str(error)
    assert "GPU only" in str(plan_error(props(kernel_injection=True), GPTJ, CPU))
    off = plan_engine(props(kernel_injection=False, rolling_batch="disable"), GPTJ, GPU1)
    assert off.engine == AUTOTP and "kernel_injection=false" in ruled_out(off)[KERNEL_INJECTION]


@pytest.mark.parametrize("model_type, architecture", [("phi3", "Phi3ForCausalLM"),
                                                      ("gpt_neox", "GPTNeoXForCausalLM"), ("falcon", "FalconForCausalLM"),
                                                      ("qwen2", "Qwen2ForCausalLM"), ("mistral", "MistralForCausalLM")])
def test_architectures_measured_to_shard_are_planned_above_degree_1(model_type, architecture):
    config = {"model_type": model_type, "architectures": [architecture], "num_attention_heads": 12,
              "num_key_value_heads": 6}
    assert plan_engine(props(tensor_parallel_degree=3), config, CPU).tensor_parallel_degree == 3


# ---- dtype, quantization, CUDA graphs, rolling batch --------------------------------------------------
def test_fp16_on_cpu_is_refused_with_a_hint():
    message = str(plan_error(props(dtype="fp16"), SMOL, CPU))
    assert "dtype=fp16" in message and "use dtype=fp32" in message and "bf16" in message


def test_bf16_on_cpu_is_allowed():
    plan = plan_engine(props(dtype="bf16"), SMOL, CPU)
    assert (plan.engine, plan.dtype) == (AUTOTP, "bf16")


def test_smoothquant_on_cpu_runs_on_autotp_in_fp32():
    plan = plan_engine(props(quantize="smoothquant"), SMOL, CPU)
    assert (plan.engine, plan.dtype, plan.quantize) == (AUTOTP, "fp32", "smoothquant")
    assert any(note.startswith("quantize=smoothquant on autotp") for note in plan.notes)


def test_smoothquant_on_an_architecture_without_a_norm_map_is_refused_naming_the_supported_ones():
    message = str(plan_error(props(quantize="smoothquant"), {"model_type": "phi3", "num_attention_heads": 32}, GPU1))
    assert "not available for model_type phi3" in message
    assert "llama, mistral, opt" in message and "dynamic_int8" in message


def test_smoothquant_on_a_layout_without_a_foldable_norm_is_refused():
    message = str(plan_error(props(quantize="smoothquant"),
                             {"model_type": "opt", "num_attention_heads": 12, "do_layer_norm_before": False}, CPU))
    assert "do_layer_norm_before=false" in message and "use quantize=dynamic_int8" in message


def test_a_missing_calibration_file_is_a_plan_error(tmp_path):
    missing = str(tmp_path / "calib.txt")
    message = str(plan_error(props(quantize="smoothquant", smoothquant_calibration_data=missing), SMOL, CPU))
    assert f"smoothquant_calibration_data={missing}" in message and "no such file" in message
    (tmp_path / "calib.txt").write_text("text")
    assert plan_engine(props(quantize="smoothquant", smoothquant_calibration_data=missing), SMOL, CPU).quantize


def test_smoothquant_on_gpu_llama_runs_on_fastgens_int8_layers_in_fp16_with_autotp_as_fallback():
    plan = plan_engine(props(quantize="smoothquant"), {**LLAMA_7B, "torch_dtype": "bfloat16"}, GPU1)
    assert (plan.engine, plan.dtype, plan.quantize) == (FASTGEN, "fp16", "smoothquant")
    note = next(note for note in plan.notes if note.startswith("quantize=smoothquant on fastgen"))
    assert "W8A8 linear layer" in note and "serving speed against fp16 FastGen is not measured yet" in note
    assert any("reference is HF with the same quantization" in note for note in plan.notes)


def test_dynamic_int8_on_gpu_runs_on_fastgen_unless_fastgen_cannot_start():
    plan = plan_engine(props(quantize="dynamic_int8"), LLAMA_7B, GPU1)
    assert (plan.engine, plan.quantize) == (FASTGEN, "dynamic_int8")
    without = plan_engine(props(quantize="dynamic_int8"), LLAMA_7B, GPU1, available={AUTOTP})
    assert (without.engine, without.quantize) == (AUTOTP, "dynamic_int8")


@pytest.mark.parametrize("method", ["smoothquant", "dynamic_int8"])
def test_int8_never_takes_kernel_injection(method):
    plan = plan_engine(props(quantize=method, rolling_batch="disable"), GPTJ, GPU1)
    assert plan.engine == AUTOTP
    assert "quantize runs on fastgen and autotp" in ruled_out(plan)[KERNEL_INJECTION]
    # kernel injection insisted on: a plan error that names where int8 runs
    message = str(plan_error(props(quantize=method, kernel_injection=True), GPTJ, GPU1))
    assert "kernel_injection=true" in message and "quantize runs on fastgen and autotp" in message


def test_dynamic_int8_runs_on_cpu_autotp():
    plan = plan_engine(props(quantize="dynamic_int8"), SMOL, CPU)
    assert (plan.engine, plan.quantize) == (AUTOTP, "dynamic_int8")
    assert any(note.startswith("quantize=dynamic_int8 on autotp") for note in plan.notes)


def test_cuda_graphs_are_refused_on_every_engine_with_the_reason():
    for config, device in ((LLAMA_7B, GPU1), (GPTJ, GPU1), (SMOL, CPU)):
        message = str(plan_error(props(enable_cuda_graph=True), config, device))
        assert "enable_cuda_graph=true" in message, config["model_type"]
    assert "no engine of this container captures CUDA graphs" in str(plan_error(props(enable_cuda_graph=True), GPTJ,
                                                                               GPU1))


def test_rolling_batch_deepspeed_when_no_engine_can_do_it():
    error = plan_error(props(kernel_injection=True, rolling_batch="deepspeed"), GPTJ, GPU1)
    assert error.key == "rolling_batch"
    assert "rolling_batch=deepspeed" in str(error) and "continuous batching" in str(error)


def test_several_plan_problems_are_reported_together():
    error = plan_error(props(dtype="fp16", tensor_parallel_degree=2), SMOL, CPU)
    assert [problem.key for problem in error.problems] == ["dtype", "tensor_parallel_degree"]
    assert "2 problems" in str(error)
    described = error.describe(lambda key: "serving.properties:3" if key == "dtype" else None)
    assert "dtype=fp16 (from serving.properties:3)" in described


def test_max_tokens_above_the_context_is_noted():
    plan = plan_engine(props(max_tokens=16384), SMOL, CPU)
    assert any("capped by the model's context of 8192" in note for note in plan.notes)


def test_fastgen_eps_mismatch_is_noted_with_the_bridge_that_handles_it():
    plan = plan_engine(props(), {**LLAMA_7B, "rms_norm_eps": 1e-6}, GPU1)
    assert any("rms_norm_eps=1e-06 is set on them at load" in note for note in plan.notes)


def test_plan_says_a_correctness_gate_will_run_and_how_to_turn_it_off():
    plan = plan_engine(props(), LLAMA_7B, GPU1)
    assert plan.engine == FASTGEN
    assert any("correctness gate runs at start-up" in note and "correctness_gate=false" in note for note in plan.notes)
    off = plan_engine(props(correctness_gate="false"), LLAMA_7B, GPU1)
    assert any("not checked" in note for note in off.notes)
    assert not any("correctness gate runs" in note for note in plan_engine(props(), SMOL, CPU).notes)


def test_without_deepspeed_kernels_plan_chooses_autotp_and_names_the_package():
    """What `serve` checks before loading FastGen, `plan` checks too, so both name the same engine."""
    asked = []

    def importable(name):
        asked.append(name)
        return False

    plan = plan_engine(props(), LLAMA_7B, GPU1, importable=importable)
    assert asked == ["dskernels"]
    assert plan.engine == AUTOTP and plan.rolling_batch
    assert dict(plan.ruled_out)[FASTGEN].startswith(
        "the deepspeed-kernels package (module dskernels) is not installed: pip install 'lmi-deepspeed[gpu]'")
    assert "best engine on GPU that can serve this configuration" in plan.reason


def test_with_deepspeed_kernels_installed_plan_chooses_fastgen():
    plan = plan_engine(props(), LLAMA_7B, GPU1, importable=lambda name: name == "dskernels")
    assert plan.engine == FASTGEN
    assert FASTGEN not in dict(plan.ruled_out)


def test_deepspeed_kernels_are_not_asked_for_on_cpu_or_when_fastgen_is_already_refused():
    def importable(name):
        raise AssertionError(f"asked for {name}")

    assert plan_engine(props(), SMOL, CPU, importable=importable).engine == AUTOTP
    plan = plan_engine(props(), GPTJ, GPU1, importable=importable)  # no FastGen implementation for GPT-J
    assert "no inference-v2 implementation" in dict(plan.ruled_out)[FASTGEN]


def test_the_default_check_looks_for_the_module_without_importing_it(monkeypatch):
    monkeypatch.undo()  # the real check, not this file's pretend GPU machine
    from handlers import engine_plan

    assert engine_plan.module_importable("json") is True
    assert engine_plan.module_importable("no_such_module_lmi_test") is False
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    plan = plan_engine(props(), LLAMA_7B, GPU1)
    assert plan.engine == AUTOTP and "module dskernels" in dict(plan.ruled_out)[FASTGEN]


def test_fastgen_false_serves_a_fastgen_model_with_autotp_on_a_gpu():
    plan = plan_engine(props(fastgen="false"), LLAMA_7B, GPU1)
    assert plan.engine == AUTOTP and plan.rolling_batch
    assert dict(plan.ruled_out)[FASTGEN] == "fastgen=false: FastGen turned off by configuration"


def test_fastgen_at_tensor_parallel_degree_2_is_ruled_out_with_the_reason():
    plan = plan_engine(props(tensor_parallel_degree=2), LLAMA_7B, GPU8)
    assert plan.engine == AUTOTP
    assert "one GPU only" in dict(plan.ruled_out)[FASTGEN]


def test_an_engine_that_failed_at_load_is_ruled_out_with_its_failure():
    plan = plan_engine(props(), LLAMA_7B, GPU1, available={"autotp"},
                       failed={"fastgen": "correctness gate FAILED (tolerance 2x)"})
    assert plan.engine == AUTOTP
    assert dict(plan.ruled_out)[FASTGEN] == "tried first and could not serve this model: correctness gate FAILED (tolerance 2x)"


def test_float32_rounded_eps_from_gguf_is_not_a_mismatch():
    plan = plan_engine(props(), {**LLAMA_7B, "rms_norm_eps": 9.999999747378752e-06}, GPU1)
    assert not any("rms_norm_eps" in note for note in plan.notes)


def test_plan_to_dict_is_json_ready():
    import json

    data = json.loads(json.dumps(plan_engine(props(), SMOL, CPU).to_dict()))
    assert data["engine"] == AUTOTP and data["device"]["kind"] == "cpu"
    assert {entry["engine"] for entry in data["ruled_out"]} == {FASTGEN, KERNEL_INJECTION}
    assert set(data) >= {"engine", "reason", "ruled_out", "tensor_parallel_degree", "dtype", "rolling_batch",
                         "architecture", "model_type", "notes"}


# ---- purity and device detection ----------------------------------------------------------------------
def test_planning_imports_no_torch():
    code = ("import sys; from handlers.serving_properties import ServingProperties as P; "
            "from handlers.engine_plan import plan_engine, Device; "
            "plan_engine(P(), {'model_type': 'llama', 'num_attention_heads': 4}, Device('cuda', 1, 'x')); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_hidden_gpus_mean_cpu_without_importing_torch(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_device().kind == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    device = detect_device()
    assert device == cpu_device() and device.count == 1


def test_no_nvidia_device_nodes_mean_cpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("handlers.engine_plan.glob.glob", lambda pattern: [])
    assert detect_device().kind == "cpu"


def test_engines_not_built_into_this_container_are_ruled_out_with_that_reason():
    plan = plan_engine(props(), LLAMA_7B, GPU1, available={"autotp"})
    assert plan.engine == "autotp"
    ruled = dict(plan.ruled_out)
    assert "not built into this container" in ruled["fastgen"]


def test_quantization_this_build_cannot_apply_is_an_error_not_silently_ignored():
    with pytest.raises(PlanError) as error:
        plan_engine(props(quantize="dynamic_int8"), SMOL, CPU, available={"autotp"}, quantizers=set())
    assert "quantize=dynamic_int8" in str(error.value) and "not built" in str(error.value)


def _fake_deepspeed(root, ops):
    """A DeepSpeed installation as its wheel lays it out: git_version_info_installed.py records installed_ops."""
    package = root / "deepspeed"
    package.mkdir()
    (package / "git_version_info_installed.py").write_text(
        f"version='0.19.8'\ngit_hash='unknown'\ninstalled_ops={ops!r}\naccelerator_name='cuda'\n")


def test_fastgen_needs_its_ops_prebuilt_or_nvcc_to_build_them(monkeypatch, tmp_path):
    """Without prebuilt ops and without the CUDA toolkit, DeepSpeed's first use of FastGen's ops fails after the
    gate's fp32 reference has loaded: plan and the loader refuse FastGen first, and name what to do."""
    monkeypatch.undo()
    from handlers import engine_plan, fastgen_readiness

    _fake_deepspeed(tmp_path, {"ragged_ops": False, "ragged_device_ops": False, "inference_core_ops": True})
    monkeypatch.setattr(fastgen_readiness, "deepspeed_directory", lambda: tmp_path / "deepspeed")
    monkeypatch.setattr(engine_plan, "module_importable", lambda name: True)
    assert fastgen_readiness.deepspeed_prebuilt_ops() == {"ragged_ops": False, "ragged_device_ops": False,
                                                    "inference_core_ops": True}
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc on it
    monkeypatch.setattr(fastgen_readiness, "DEFAULT_CUDA_HOME", tmp_path / "no-toolkit")
    reason = fastgen_readiness.fastgen_ops_unavailable()
    assert reason.startswith("DeepSpeed's FastGen ops (ragged_device_ops, ragged_ops) are not prebuilt")
    plan = plan_engine(props(), LLAMA_7B, GPU1)
    assert plan.engine == AUTOTP and dict(plan.ruled_out)[FASTGEN] == reason
    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "nvcc").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert fastgen_readiness.cuda_compiler() == str(toolkit / "bin" / "nvcc")
    assert fastgen_readiness.fastgen_ops_unavailable() is None
    assert plan_engine(props(), LLAMA_7B, GPU1).engine == FASTGEN


def test_prebuilt_ops_need_no_compiler(monkeypatch, tmp_path):
    monkeypatch.undo()
    from handlers import fastgen_readiness

    _fake_deepspeed(tmp_path, {op: True for op in fastgen_readiness.FASTGEN_OPS})
    monkeypatch.setattr(fastgen_readiness, "deepspeed_directory", lambda: tmp_path / "deepspeed")
    monkeypatch.setattr(fastgen_readiness, "cuda_compiler", lambda: None)
    assert fastgen_readiness.fastgen_ops_unavailable() is None


def test_the_installed_deepspeeds_op_record_is_read():
    from handlers import fastgen_readiness

    directory = fastgen_readiness.deepspeed_directory()
    assert directory is not None and (directory / "git_version_info_installed.py").is_file()
    assert "cpu_adam" in fastgen_readiness.deepspeed_prebuilt_ops()  # the CPU install records its ops, none prebuilt
