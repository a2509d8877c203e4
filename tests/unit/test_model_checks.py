"""Faults `plan` (and so `serve`, before the port opens) finds without loading the model: a model directory
without config.json, config.json of `{}`, an unknown model_type, remote code without trust_remote_code,
truncated or missing safetensors, and pickle checkpoints that would run code when loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from entrypoint.cli import build_report
from entrypoint.configuration import load_configuration
from entrypoint.model_resolution import ModelResolutionError
from tests.unit.test_cli_plan import REPO, TINY_LLAMA, clean_environment


def write_model(directory: Path, config: dict | None = None, *, shards: int = 1) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(TINY_LLAMA if config is None else config))
    (directory / "tokenizer.json").write_text("{}")
    tensors = {f"layer{i}.weight": np.ones((16, 16), dtype=np.float32) for i in range(4)}
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
        return directory
    names = sorted(tensors)
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[shard::shards]}
        save_file(part, str(directory / file))
        weight_map.update({name: file for name in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def plan_error(directory: Path, tmp_path: Path, **environ: str) -> str:
    configuration = load_configuration(directory, clean_environment(tmp_path, **environ))
    with pytest.raises(ModelResolutionError) as error:
        build_report(configuration)
    return str(error.value)


def test_a_complete_model_directory_passes(tmp_path):
    report = build_report(load_configuration(write_model(tmp_path / "model", shards=2), clean_environment(tmp_path)))
    assert report["model"]["source"] == "local" and report["plan"]["engine"] == "autotp"


def test_a_model_directory_without_config_json_is_an_error_not_the_embedded_model(tmp_path):
    directory = write_model(tmp_path / "model")
    (directory / "config.json").unlink()
    (directory / "serving.properties").write_text("option.max_tokens=512\n")
    message = plan_error(directory, tmp_path)
    assert "no config.json" in message and str(directory) in message
    assert "model.safetensors" in message and "tokenizer.json" in message  # what it does hold
    assert "option.model_id" in message


def test_an_empty_model_directory_still_serves_the_embedded_model(tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "serving.properties").write_text("option.max_tokens=512\n")
    report = build_report(load_configuration(directory, clean_environment(tmp_path)))
    assert report["model"]["source"] == "embedded"


def test_config_json_of_an_empty_object(tmp_path):
    message = plan_error(write_model(tmp_path / "model", {}), tmp_path)
    assert "config.json" in message and 'no "model_type"' in message and "{}" in message


def test_an_unknown_model_type_names_it_and_the_closest_known_ones(tmp_path):
    message = plan_error(write_model(tmp_path / "model", {**TINY_LLAMA, "model_type": "lama"}), tmp_path)
    assert "'lama'" in message and "did you mean" in message and "llama" in message


def test_remote_code_needs_trust_remote_code(tmp_path):
    config = {**TINY_LLAMA, "model_type": "my_custom_arch",
              "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                           "AutoModelForCausalLM": "modeling_custom.CustomModel"}}
    directory = write_model(tmp_path / "model", config)
    marker = tmp_path / "remote-code-ran"
    (directory / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    message = plan_error(directory, tmp_path)
    assert "option.trust_remote_code" in message and "OPTION_TRUST_REMOTE_CODE" in message
    assert "my_custom_arch" in message
    assert not marker.exists()  # nothing of the model directory's code ran
    # With trust_remote_code the plan goes on (the code itself only runs when the model loads).
    report = build_report(load_configuration(directory, clean_environment(tmp_path, OPTION_TRUST_REMOTE_CODE="true")))
    assert report["model"]["model_type"] == "my_custom_arch"


def test_a_truncated_safetensors_file_is_named_with_its_expected_length(tmp_path):
    directory = write_model(tmp_path / "model", shards=2)
    shard = directory / "model-00002-of-00002.safetensors"
    full = shard.stat().st_size
    with shard.open("r+b") as file:
        file.truncate(full - 100)
    message = plan_error(directory, tmp_path)
    assert str(shard) in message and "truncated" in message
    assert f"{full - 100} bytes" in message and f"{full} bytes" in message
    assert "model-00001-of-00002" not in message  # the intact shard is not blamed


def test_a_safetensors_file_cut_inside_its_header(tmp_path):
    directory = write_model(tmp_path / "model")
    with (directory / "model.safetensors").open("r+b") as file:
        file.truncate(20)
    message = plan_error(directory, tmp_path)
    assert "model.safetensors is truncated: 20 bytes" in message


def test_a_shard_named_by_the_index_but_missing(tmp_path):
    directory = write_model(tmp_path / "model", shards=2)
    (directory / "model-00001-of-00002.safetensors").unlink()
    message = plan_error(directory, tmp_path)
    assert "model-00001-of-00002.safetensors is missing" in message and "index" in message


def test_serve_fails_at_once_on_truncated_weights(tmp_path):
    directory = write_model(tmp_path / "model")
    with (directory / "model.safetensors").open("r+b") as file:
        file.truncate(500)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "entrypoint", "serve", "--model-dir", str(directory)], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env=clean_environment(tmp_path, SAGEMAKER_BIND_TO_PORT="1"))
    assert result.returncode == 2, result.stderr
    assert "model.safetensors is truncated" in result.stderr and "Traceback" not in result.stderr
    assert "Uvicorn running" not in result.stderr and "starting the HTTP server" not in result.stderr
    assert time.monotonic() - started < 60  # generous: it must not load anything


class RunsCode:
    """Pickled as a call to os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_checkpoint_that_would_run_code_is_refused(tmp_path):
    import torch

    directory = write_model(tmp_path / "model")
    (directory / "model.safetensors").unlink()
    marker = tmp_path / "pickle-code-ran"
    torch.save({"layer0.weight": torch.zeros(2), "payload": RunsCode(marker)}, directory / "pytorch_model.bin")
    message = plan_error(directory, tmp_path)
    assert "pytorch_model.bin is refused" in message and "system" in message
    assert not marker.exists()


def test_a_weights_only_pickle_checkpoint_is_accepted(tmp_path):
    import torch

    directory = write_model(tmp_path / "model")
    (directory / "model.safetensors").unlink()
    torch.save({"layer0.weight": torch.zeros(2)}, directory / "pytorch_model.bin")
    assert build_report(load_configuration(directory, clean_environment(tmp_path)))["plan"]["engine"] == "autotp"
