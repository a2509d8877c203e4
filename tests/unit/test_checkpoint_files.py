"""option.checkpoint: the named safetensors weights (or a DeepSpeed checkpoint JSON naming them) are what
transformers loads; pickle files and files outside the model directory are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from handlers.checkpoint_files import CheckpointError, checkpoint_view


@pytest.fixture()
def model_dir(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path)  # the directory's own weights
    other = LlamaForCausalLM(config)  # different random weights, saved under other names
    state = {k: v.contiguous() for k, v in other.state_dict().items()}
    save_file(state, str(tmp_path / "other.safetensors"))
    names = sorted(state)
    save_file({k: state[k] for k in names[:5]}, str(tmp_path / "part-a.safetensors"))
    save_file({k: state[k] for k in names[5:]}, str(tmp_path / "part-b.safetensors"))
    (tmp_path / "ds_config.json").write_text(json.dumps(
        {"type": "ds_model", "checkpoints": ["part-a.safetensors", "part-b.safetensors"], "version": 1.0}))
    return tmp_path, state


@pytest.mark.parametrize("checkpoint", ["other.safetensors", "ds_config.json"])
def test_the_named_weights_are_loaded_not_the_directorys_own(model_dir, checkpoint):
    directory, expected = model_dir
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint_view(directory, checkpoint)).state_dict()
    own = AutoModelForCausalLM.from_pretrained(directory).state_dict()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    assert any(not torch.equal(own[name], tensor) for name, tensor in expected.items())


def test_unusable_checkpoints_are_refused_naming_the_problem(model_dir, tmp_path_factory):
    directory, _ = model_dir
    torch.save({}, directory / "weights.bin")
    cases = {
        "weights.bin": "pickle checkpoints are refused",
        "missing.safetensors": "no such file",
        "../outside.safetensors": "outside the model directory",
        "config.json": "not a DeepSpeed checkpoint description",
    }
    for checkpoint, fragment in cases.items():
        with pytest.raises(CheckpointError) as error:
            checkpoint_view(directory, checkpoint)
        assert fragment in str(error.value) and checkpoint.split("/")[-1] in str(error.value)
    (directory / "sharded.json").write_text(json.dumps(
        {"type": "ds_model", "checkpoints": ["other.safetensors"], "parallelization": "tp", "tp_size": 2}))
    with pytest.raises(CheckpointError, match="pre-sharded"):
        checkpoint_view(directory, "sharded.json")
