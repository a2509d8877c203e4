"""SmoothQuant's smoothing leaves the float model's function unchanged, for every mapped family (tiny random
configs), with real calibration ranges; the norm -> linear map matches transformers' modules and the plan."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from handlers.engine_policy import policy_for
from quantization.calibration import calibrate
from quantization.families import FAMILIES, family_for, supported_model_types
from quantization.smoothing import bind_groups, smooth, smoothing_factors

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 128
TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "gpt_neo": dict(hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                    max_position_embeddings=128),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),  # 7B layout: one shared norm
    "falcon-40b": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True,
                       num_kv_heads=2),
    "falcon-rw": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, parallel_attn=False, alibi=True,
                      multi_query=False),
}
SHARED_NORM = {"gptj": 4, "falcon": 2}  # linears fed by one norm when attention and MLP run in parallel


def tiny_model(name: str):
    torch.manual_seed(0)
    model_type = name.split("-")[0]
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                  **TINY[name])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # give the norms non-trivial weights and biases, and some channels large ranges
        for module in model.modules():
            if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                module.weight.copy_(torch.rand_like(module.weight) * 2 + 0.1)
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(torch.randn_like(module.bias) * 0.5)
    return model


def test_the_table_covers_the_required_families():
    assert {"llama", "opt", "gpt2", "gptj", "gpt_neox", "bloom", "falcon"} <= set(supported_model_types())
    assert set(TINY) >= set(supported_model_types())


@pytest.mark.parametrize("name", sorted(TINY))
def test_smoothing_with_calibrated_ranges_leaves_the_float_model_unchanged(name):
    model = tiny_model(name)
    family = family_for(model.config.model_type)
    config = model.config.to_dict()
    groups = bind_groups(model, family, config)
    layers = config.get("num_hidden_layers") or config.get("n_layer") or config.get("num_layers")
    assert len(groups) == layers * len(family.groups(config))
    if name.split("-")[0] in SHARED_NORM and name != "falcon-40b" and name != "falcon-rw":
        assert {len(group.linears) for group in groups} == {SHARED_NORM[name]}

    torch.manual_seed(1)
    windows = torch.randint(3, VOCAB, (3, 12))
    calibration = calibrate(model, groups, windows, show_progress=False, sample_tokens=16)
    assert set(calibration.act_absmax) == {group.key for group in groups}
    for group in groups:  # one range per input channel of the group's linear layers
        width = group.linears[0].weight.shape[1 if type(group.linears[0]).__name__ != "Conv1D" else 0]
        assert calibration.act_absmax[group.key].shape == (width,) and (calibration.act_absmax[group.key] > 0).all()
        assert calibration.samples[group.key].shape[1] == width and 0 < calibration.samples[group.key].shape[0] <= 16

    probe = torch.randint(3, VOCAB, (2, 10))
    with torch.no_grad():
        before = model(input_ids=probe).logits
    sources_before = [group.norm.weight.detach().clone() for group in groups]
    smooth(groups, calibration.act_absmax, alpha=0.5)
    with torch.no_grad():
        after = model(input_ids=probe).logits
    # the factors were really folded into every source (norm, or a gated MLP's up projection)
    assert not any(torch.allclose(group.norm.weight, before) for group, before in zip(groups, sources_before))
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4), (after - before).abs().max()

    # after smoothing, each norm's output range is max|X|^(1-alpha) * max|W|^alpha per channel (eq. 4)
    recalibrated = calibrate(model, groups, windows, show_progress=False)
    key = groups[0].key
    assert recalibrated.act_absmax[key].max() < calibration.act_absmax[key].max()


def test_smoothing_factors_follow_the_formula():
    act, weight = torch.tensor([8.0, 1.0, 0.0]), torch.tensor([2.0, 4.0, 1.0])
    factors = smoothing_factors(act, weight, 0.5)
    assert torch.allclose(factors, torch.tensor([2.0, 0.5, (1e-5) ** 0.5]))
    assert torch.allclose(smoothing_factors(act, weight, 1.0), torch.tensor([8.0, 1.0, 1e-5]))


@pytest.mark.parametrize("config, reason", [
    ({"model_type": "opt", "do_layer_norm_before": False}, "do_layer_norm_before=false"),
    ({"model_type": "bloom", "apply_residual_connection_post_layernorm": True}, "residual"),
])
def test_layouts_without_a_foldable_norm_are_refused(config, reason):
    assert reason in family_for(config["model_type"]).refuse(config)


def test_the_engine_policy_agrees_with_the_family_table():
    for family in FAMILIES:
        for model_type in family.model_types:
            assert policy_for(model_type).smoothquant.supported, model_type
    for model_type in ("gemma", "phi3", "mixtral", "some_new_arch"):
        verdict = policy_for(model_type).smoothquant
        assert not verdict.supported and "llama" in verdict.reason and "dynamic_int8" in verdict.reason
