"""The W8A8 linear layer for DeepSpeed-FastGen (handlers/fastgen_int8.py) through DeepSpeed's v2 interface, on
the CPU (its eager path and v2's activation arithmetic in PyTorch), against float64 references computed here.
On a GPU the same layer runs the Triton kernels and v2's CUDA activations: tests/gpu/test_gpu_int8.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from deepspeed.inference.v2.inference_utils import ActivationType  # noqa: E402
from deepspeed.inference.v2.modules.configs import DSLinearConfig  # noqa: E402
from deepspeed.inference.v2.modules.interfaces import DSLinearRegistry  # noqa: E402

from handlers.fastgen_int8 import w8a8_linear_class  # noqa: E402

IN, OUT, ROWS = 64, 48, 5


def layer(activation: ActivationType, dtype: torch.dtype = torch.float16):
    config = DSLinearConfig(max_tokens=32, in_channels=IN, out_channels=OUT, activation=activation,
                            input_dtype=dtype, output_dtype=dtype)
    return w8a8_linear_class()(config, {"device": "cpu"})


def float64_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.double() @ weight.double().t() + bias.double()


def test_it_is_registered_with_deepspeeds_linear_registry_and_takes_half_precision_only():
    cls = w8a8_linear_class()
    assert DSLinearRegistry.registry[cls.name()] is cls and w8a8_linear_class() is cls  # registered once
    half = DSLinearConfig(max_tokens=8, in_channels=16, out_channels=16)
    assert cls.supports_config(half)
    assert not cls.supports_config(DSLinearConfig(max_tokens=8, in_channels=16, out_channels=16,
                                                  input_dtype=torch.float32, output_dtype=torch.float32))


def test_weights_load_as_int8_with_a_scale_per_output_channel():
    module = layer(ActivationType.IDENTITY)
    weight = torch.randn(OUT, IN, dtype=torch.float16)
    param = module.transform_param(weight)
    assert param.dtype == torch.int8 and param.shape == (OUT, IN)
    assert param.scales.dtype == torch.float32 and param.scales.shape == (OUT,)
    assert param.aux_attrs.keys() == {"scales"}  # what v2 flattens into its parameter buffer with the weight
    dequantized = param.double() * param.scales.double().unsqueeze(1)
    assert (dequantized - weight.double()).abs().max() <= param.scales.double().max() / 2 + 1e-6
    bias = module.transform_param(torch.randn(OUT))
    assert bias.dtype == torch.float16 and bias.shape == (OUT,)


def test_an_ungated_layer_with_bias_gives_the_float_product_within_int8_error():
    torch.manual_seed(0)
    module = layer(ActivationType.IDENTITY)
    weight, bias = torch.randn(OUT, IN) * 0.1, torch.randn(OUT)
    x = torch.randn(ROWS, IN, dtype=torch.float16)
    out = module(x, module.transform_param(weight.half()), module.transform_param(bias))
    assert out.shape == (ROWS, OUT) and out.dtype == torch.float16
    expected = float64_product(x, weight.half(), bias)
    relative = (out.double() - expected).abs().max() / expected.abs().max()
    assert relative < 0.02
    assert out.data_ptr() == module.output.data_ptr()  # v2's contract: the preallocated output


def test_a_gated_layer_applies_the_activation_to_alternate_gate_and_up_columns():
    """v2 fuses gate and up projections row-interleaved (gate rows even, up rows odd) and its gated kernel
    computes act(gate) * up per pair (kernels/core_ops/gated_activations, 0.19.8)."""
    torch.manual_seed(1)
    module = layer(ActivationType.SiGLU)
    weight, bias = torch.randn(2 * OUT, IN) * 0.1, torch.randn(2 * OUT) * 0.1
    x = torch.randn(ROWS, IN, dtype=torch.float16)
    out = module(x, module.transform_param(weight.half()), module.transform_param(bias))
    product = float64_product(x, weight.half(), bias)
    gate, up = product[:, 0::2], product[:, 1::2]
    expected = gate * torch.sigmoid(gate) * up
    assert out.shape == (ROWS, OUT)
    assert (out.double() - expected).abs().max() / expected.abs().max() < 0.03
    # the other pairing would be far off: the test can tell them apart
    swapped = up * torch.sigmoid(up) * gate
    assert (out.double() - swapped).abs().max() / expected.abs().max() > 0.1


def test_a_weight_of_the_wrong_shape_is_refused_with_both_shapes():
    module = layer(ActivationType.SiGLU)
    with pytest.raises(ValueError, match=r"shape \(48, 64\) for a layer of 64 -> 96 channels"):
        module.transform_param(torch.zeros(OUT, IN, dtype=torch.float16))


def test_the_int8_model_swaps_its_four_linear_layers_for_w8a8_ones_of_the_same_shape():
    """handlers.fastgen_model's int8 model class: each of v2's make_*_layer methods builds DeepSpeed's layer
    (here a stand-in base class holding only the config), then it is replaced by ours with that config."""
    from types import SimpleNamespace

    from handlers.fastgen_model import _int8_model_class

    def config(out_channels, activation=ActivationType.IDENTITY, in_channels=IN):
        return DSLinearConfig(max_tokens=16, in_channels=in_channels, out_channels=out_channels, activation=activation)

    configs = {"qkv": config(3 * IN), "attn_out": config(IN), "mlp_1": config(OUT, ActivationType.SiGLU),
               "mlp_2": config(IN, in_channels=OUT)}

    def built(name):  # what v2's make_*_layer leave behind: a linear module with its config and output buffer
        return SimpleNamespace(_config=configs[name], output=torch.empty(1, device="cpu"))

    class DeepSpeedModel:
        def make_qkv_layer(self):
            self.qkv = built("qkv")

        def make_attn_out_layer(self):
            self.attn_out = built("attn_out")

        def make_mlp_1_layer(self):
            self.mlp_1 = built("mlp_1")

        def make_mlp_2_layer(self):
            self.mlp_2 = built("mlp_2")

    model = _int8_model_class(DeepSpeedModel)()
    for name in configs:
        getattr(model, f"make_{name}_layer")()
        layer = getattr(model, name)
        assert type(layer).__name__ == "W8A8Linear" and layer._config is configs[name], name
    assert model.mlp_1.output.shape == (16, OUT) and model.mlp_1._staging.shape == (16, 2 * OUT)
