"""`python -m entrypoint plan` as a real subprocess: JSON on stdout only, the table, and exit status 2 on errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from entrypoint.cli import plan_main
from entrypoint.property_sources import COMPAT_ENV, LMI_ENV

REPO = Path(__file__).resolve().parents[2]

TINY_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_attention_heads": 8,
              "num_key_value_heads": 4, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
              "max_position_embeddings": 2048, "vocab_size": 1000, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}
SMOL_SHAPE = {**TINY_LLAMA, "num_attention_heads": 9, "num_key_value_heads": 3}


def model_dir(tmp_path: Path, properties: str, config: dict | None = None) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config or TINY_LLAMA))
    (directory / "serving.properties").write_text(properties)
    return directory


def clean_environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test process's environment without any configuration variable, on the CPU (deterministic plan,
    and no `import torch`), with caches under tmp_path."""
    ours = set(LMI_ENV) | set(COMPAT_ENV) | {"SAGEMAKER_BIND_TO_PORT"}
    environ = {key: value for key, value in os.environ.items() if not key.startswith("OPTION_") and key not in ours}
    environ.update(CUDA_VISIBLE_DEVICES="", LMI_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    environ.update(extra)
    return environ


def run(tmp_path: Path, *args: str, **environ: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "entrypoint", *args], cwd=REPO, capture_output=True, text=True,
                          env=clean_environment(tmp_path, **environ), timeout=120)


def test_plan_json_prints_one_object_with_properties_sources_and_plan(tmp_path):
    directory = model_dir(tmp_path, "engine=DeepSpeed\noption.tensor_parallel_degree=max\n"
                                    "option.max_rolling_batch_size=16\nminWorkers=1\n")
    result = run(tmp_path, "plan", "--json", "--model-dir", str(directory),
                 OPTION_DTYPE="BF16", MAX_BATCH_PREFILL_TOKENS="1024", OPTION_MAX_TOKENS="1024")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # the whole of stdout is one JSON document

    properties = report["properties"]
    location = f"{directory / 'serving.properties'}"
    assert properties["engine"] == {"value": "deepspeed", "source": f"{location}:1"}
    assert properties["tensor_parallel_degree"] == {"value": "max", "source": f"{location}:2"}
    assert properties["max_rolling_batch_size"] == {"value": 16, "source": f"{location}:3"}
    assert properties["dtype"] == {"value": "bf16", "source": "environment variable OPTION_DTYPE"}
    assert properties["max_rolling_batch_prefill_tokens"] == {
        "value": 1024, "source": "environment variable MAX_BATCH_PREFILL_TOKENS"}
    assert properties["port"] == {"value": 8080, "source": "default"}
    assert properties["model_id"] == {"value": None, "source": "default"}
    assert report["warnings"] == [f"1 LMI key accepted but ignored (no effect in this container; docs/lmi-migration.md):"
                                  f"\n  minWorkers ({location}:4): one process group (one rank per tensor-parallel "
                                  "GPU) serves the one model; there is no worker pool"]

    model = report["model"]
    assert model["source"] == "local"
    assert Path(model["path"]) == directory
    assert (model["model_type"], model["layers"], model["heads"], model["kv_heads"], model["context"]) == (
        "llama", 2, 8, 4, 2048)

    plan = report["plan"]
    assert plan["engine"] == "autotp"
    assert plan["tensor_parallel_degree"] == 1  # max on a CPU-only machine
    assert plan["dtype"] == "bf16"
    assert plan["rolling_batch"] is True
    assert (plan["architecture"], plan["model_type"]) == ("LlamaForCausalLM", "llama")
    assert plan["device"]["kind"] == "cpu"
    assert {entry["engine"] for entry in plan["ruled_out"]} == {"fastgen", "kernel_injection"}
    assert all(entry["why"] for entry in plan["ruled_out"])
    assert plan["reason"]


def test_plan_prints_the_table(tmp_path):
    directory = model_dir(tmp_path, "option.max_rolling_batch_size=16\n")
    result = run(tmp_path, "plan", "--model-dir", str(directory))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for heading in ("Properties", "Model", "Architecture", "Engine plan", "ruled out"):
        assert heading in out
    row = next(line for line in out.splitlines() if line.strip().startswith("max_rolling_batch_size"))
    assert row.split()[1] == "16" and row.rstrip().endswith(f"{directory / 'serving.properties'}:1")
    assert "8 attention, 4 key/value" in out
    assert "autotp" in out and "fastgen: runs on GPU only" in out


def test_bad_configuration_exits_2_with_the_message_on_stderr(tmp_path):
    directory = model_dir(tmp_path, "option.dtype=fp8\noption.tensor_paralel_degree=2\n")
    result = run(tmp_path, "plan", "--json", "--model-dir", str(directory), OPTION_PORT="http")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "invalid configuration (3 problems)" in result.stderr
    assert f"{directory / 'serving.properties'}:1" in result.stderr
    assert "allowed values are auto, fp32, fp16, bf16" in result.stderr
    assert "did you mean option.tensor_parallel_degree" in result.stderr
    assert "environment variable OPTION_PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_impossible_plan_exits_2_naming_the_source(tmp_path):
    directory = model_dir(tmp_path, "option.tensor_parallel_degree=2\n", config=SMOL_SHAPE)
    result = run(tmp_path, "plan", "--model-dir", str(directory))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "tensor_parallel_degree=2" in result.stderr
    assert f"from {directory / 'serving.properties'}:1" in result.stderr
    assert "9 attention heads" in result.stderr and "valid degrees: 1, 3" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_exits_2(tmp_path):
    directory = model_dir(tmp_path, f"option.model_id={tmp_path / 'nowhere'}\n")
    result = run(tmp_path, "plan", "--json", "--model-dir", str(directory))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_a_bad_configuration_exits_2_before_starting_anything(tmp_path):
    directory = model_dir(tmp_path, "option.rolling_batch=vllm\n")
    result = run(tmp_path, "serve", "--model-dir", str(directory))
    assert result.returncode == 2
    assert "vLLM is not part of this container" in result.stderr


def test_no_command_is_a_usage_error(tmp_path):
    result = run(tmp_path)
    assert result.returncode == 2
    assert "plan" in result.stderr and "serve" in result.stderr


def test_plan_main_in_process(tmp_path, monkeypatch, capsys):
    for key in list(os.environ):
        if key.startswith("OPTION_") or key in LMI_ENV or key in COMPAT_ENV or key == "SAGEMAKER_BIND_TO_PORT":
            monkeypatch.delenv(key)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    directory = model_dir(tmp_path, "option.max_tokens=512\n")
    assert plan_main(["--model-dir", str(directory), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["properties"]["max_tokens"]["value"] == 512
    assert report["plan"]["engine"] == "autotp"


def test_plan_of_an_lmi_file_shows_the_mapped_value_and_the_ignored_keys(tmp_path, monkeypatch, capsys):
    for key in list(os.environ):
        if key.startswith("OPTION_") or key in LMI_ENV or key in COMPAT_ENV or key == "SAGEMAKER_BIND_TO_PORT":
            monkeypatch.delenv(key)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    directory = model_dir(tmp_path, "option.max_model_len=512\noption.enable_prefix_caching=true\n"
                                    "option.enforce_eager=true\n")
    assert plan_main(["--model-dir", str(directory)]) == 0
    out = capsys.readouterr().out
    location = directory / "serving.properties"
    row = next(line for line in out.splitlines() if line.strip().startswith("max_tokens"))
    assert row.split()[1] == "512" and row.rstrip().endswith(f"{location}:1")
    section = out[out.index("Configuration warnings"):out.index("\nModel")]
    words = " ".join(section.split())  # long paths wrap the lines
    assert words.startswith("Configuration warnings ! 2 LMI keys accepted but ignored")
    assert f"- option.enable_prefix_caching ({location}:2): no prefix cache" in words
    assert f"- option.enforce_eager ({location}:3): PyTorch runs eagerly here" in words


@pytest.mark.parametrize("args", [["plan", "--help"], ["serve", "--help"]])
def test_help(tmp_path, args):
    result = run(tmp_path, *args)
    assert result.returncode == 0
    assert "--model-dir" in result.stdout
