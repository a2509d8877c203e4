"""quantize=smoothquant / dynamic_int8 on a tiny random Llama saved to disk: the alpha search runs and is
reported, the calibration is saved and reused (a restart does not calibrate again), a changed model or
setting misses the cache, and unsupported families fail naming the supported ones."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from quantization import calibration_cache, quantizer
from quantization.alpha_search import CANDIDATES
from quantization.corpus import pydoc_topics
from quantization.int8_linear import Int8Linear

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tokenizer():
    """A small real BPE tokenizer trained on the calibration text (the embedded model's would need its
    conversion; any tokenizer does for the arithmetic under test)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(pydoc_topics("calibration")[:3], trainers.BpeTrainer(vocab_size=300,
                                                                                  special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def calibration_file(tmp_path: Path) -> str:
    path = tmp_path / "calibration.txt"
    path.write_text("\n\n".join(pydoc_topics("calibration")[:4]), encoding="utf-8")
    return str(path)


def load(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def run(model, tokenizer, model_dir, cache_dir, **settings):
    return quantizer.quantize_model(model, "smoothquant", tokenizer=tokenizer, model_path=str(model_dir),
                                    cache_dir=cache_dir, show_progress=False, **settings)


def test_smoothquant_searches_alpha_saves_the_calibration_and_reuses_it(model_dir, tokenizer, calibration_file,
                                                                       tmp_path, monkeypatch, caplog):
    cache_dir = tmp_path / "cache"
    probe = torch.randint(0, 300, (2, 16))
    first = load(model_dir)
    with caplog.at_level(logging.INFO, logger="quantization.quantizer"):
        result = run(first, tokenizer, model_dir, cache_dir, calibration_data=calibration_file)
    assert result.alpha_source == "search" and result.alpha in CANDIDATES
    assert set(result.alpha_errors) == set(CANDIDATES)
    assert result.alpha_errors[result.alpha] == min(result.alpha_errors.values())
    assert f"alpha={result.alpha:g} chosen by search" in caplog.text
    assert result.calibration.startswith("calibrated on") and calibration_file in result.calibration
    assert Path(result.calibration_file).is_file() and result.calibration_file.startswith(str(cache_dir))
    assert result.linears == 14 and isinstance(first.model.layers[0].mlp.down_proj, Int8Linear)

    # A restart: the same model and settings reuse the saved calibration and give the same model.
    monkeypatch.setattr("quantization.calibration.calibrate", lambda *a, **k: pytest.fail("calibrated again"))
    second = load(model_dir)
    again = run(second, tokenizer, model_dir, cache_dir, calibration_data=calibration_file)
    assert again.calibration == f"reused {result.calibration_file}"
    assert (again.alpha, again.alpha_source) == (result.alpha, "search")
    with torch.no_grad():
        assert torch.equal(first(input_ids=probe).logits, second(input_ids=probe).logits)


def test_a_changed_setting_or_model_misses_the_cache(model_dir, tokenizer, calibration_file, tmp_path):
    cache_dir = tmp_path / "cache"
    base = run(load(model_dir), tokenizer, model_dir, cache_dir, calibration_data=calibration_file)
    with_alpha = run(load(model_dir), tokenizer, model_dir, cache_dir, calibration_data=calibration_file, alpha=0.65)
    assert (with_alpha.alpha, with_alpha.alpha_source) == (0.65, "smoothquant_alpha")
    assert with_alpha.calibration.startswith("calibrated") and with_alpha.calibration_file != base.calibration_file
    # new weights under the same path
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(load(model_dir).config).save_pretrained(model_dir)
    changed = run(load(model_dir), tokenizer, model_dir, cache_dir, calibration_data=calibration_file)
    assert changed.calibration.startswith("calibrated") and changed.calibration_file != base.calibration_file


def test_smoothing_alone_keeps_the_float_model_names_what_it_changed_and_matches_smoothquant(
        model_dir, tokenizer, calibration_file, tmp_path):
    """What FastGen's int8 path uses: the smoothed float weights, quantized afterwards by its own layers."""
    from quantization.int8_linear import linear_names, replace_linears

    model, before = load(model_dir), load(model_dir)
    ids = torch.tensor([[5, 17, 42, 99, 7, 250]])
    result, changed = quantizer.smooth_model(model, tokenizer=tokenizer, model_path=str(model_dir), alpha=0.5,
                                             calibration_data=calibration_file, cache_dir=tmp_path / "cache")
    assert result.method == "smoothquant" and result.alpha == 0.5 and result.calibration.startswith("calibrated")
    with torch.no_grad():  # folding is exact in real arithmetic: the float function stays
        assert torch.allclose(model(ids).logits, before(ids).logits, atol=1e-4)
    params, old = dict(model.named_parameters()), dict(before.named_parameters())
    really = sorted(name for name in params if not torch.equal(params[name], old[name]))
    assert changed == really and len(changed) == 2 * (2 + 3 + 2 + 1)  # per layer: 2 norms, q/k/v, gate/up, down
    replace_linears(model, linear_names(model))
    reference = load(model_dir)
    run(reference, tokenizer, model_dir, tmp_path / "cache", alpha=0.5, calibration_data=calibration_file)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_dynamic_int8_does_not_smooth(model_dir):
    model = load(model_dir)
    norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    result = quantizer.quantize_model(model, "dynamic_int8")
    assert result.alpha is None and result.calibration is None and result.linears == 14
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm)
    assert model.lm_head.weight.dtype == torch.float32  # the output head stays float


def test_unmapped_family_and_unreadable_calibration_file_are_refused(model_dir, tokenizer, tmp_path):
    model = load(model_dir)
    model.config.model_type = "gemma"
    with pytest.raises(ValueError, match="model_type gemma has no norm -> linear map; supported: .*llama"):
        quantizer.quantize_model(model, "smoothquant", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="smoothquant_calibration_data=.*missing.txt: cannot read it"):
        quantizer.quantize_model(load(model_dir), "smoothquant", tokenizer=tokenizer,
                                 calibration_data=str(tmp_path / "missing.txt"))


def test_default_cache_dir_follows_the_entrypoint_rule(tmp_path, monkeypatch):
    from entrypoint.model_resolution import default_cache_dir

    for env in ({}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}, {"LMI_CACHE_DIR": str(tmp_path / "lmi")}):
        monkeypatch.delenv("LMI_CACHE_DIR", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert calibration_cache.default_cache_dir() == default_cache_dir()
