"""int8 (W8A8) linear layers inside DeepSpeed-FastGen: an implementation of v2's linear interface.

DeepSpeed 0.19.8's inference v2 builds each transformer layer's four linear layers (fused QKV, attention
output, the first MLP projection with its activation, the second) through `heuristics.instantiate_linear`,
which knows fp16/bf16 BLAS (`BlasFPLinear`) and FP6 weights on Ampere, nothing in int8. `W8A8Linear` keeps
v2's interface (`transform_param` at load time, `forward(hidden, w, b)` per put, a preallocated output) and
computes as `quantization.int8` does on the CPU (SmoothQuant's W8A8 scheme, Xiao et al., 2022):

  - `transform_param`: a weight [out, in] becomes int8 with one float32 scale per output channel, carried as
    an `InferenceParameter` with the scales as its `scales` attribute (v2 flattens weights and their
    attributes into one buffer, as it does for FP6); a bias stays in the activation dtype;
  - `forward`: each token's activations are quantized to int8 with their own scale, multiplied by the int8
    weight with int32 accumulation, and both scales (and the bias of an ungated layer) applied, in two
    Triton kernels on a GPU (`quantization.int8_triton`), or eagerly with `quantization.int8` elsewhere;
    then v2's own activation (bias + activation, or the gated activation whose gate and up columns
    alternate) runs on the result, as in `BlasFPLinear`.

`replace_linear` swaps one of a v2 model's linear layers for this one before its weights load
(`handlers.fastgen_model` calls it from the model's `make_*_layer`), so the fp16 weights are quantized as
they load and never sit on the device in full.
"""

from __future__ import annotations

from typing import Any

import torch

from quantization.int8 import quantize_weight, w8a8_linear

_CLASS: type | None = None


def w8a8_linear_class() -> type:
    """The `DSLinearBase` subclass, registered once with v2's linear registry (built on first use: DeepSpeed's
    module classes import only with DeepSpeed)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _define()
    return _CLASS


def replace_linear(module: Any) -> Any:
    """A `W8A8Linear` built from a v2 linear module's own config (same channels, activation and max tokens), on
    the device of that module's output buffer."""
    return w8a8_linear_class()(module._config, {"device": module.output.device})


def _define() -> type:
    from deepspeed.accelerator import get_accelerator
    from deepspeed.inference.v2.inference_parameter import InferenceParameter
    from deepspeed.inference.v2.inference_utils import is_gated
    from deepspeed.inference.v2.modules.configs import DSLinearConfig
    from deepspeed.inference.v2.modules.interfaces import DSLinearBase, DSLinearRegistry

    @DSLinearRegistry.register_module
    class W8A8Linear(DSLinearBase):
        """Per-channel int8 weights, per-token dynamic int8 activations (see the module docstring)."""

        @staticmethod
        def name() -> str:
            return "lmi_w8a8_int8_linear"

        @staticmethod
        def supports_config(config: DSLinearConfig) -> bool:
            return config.input_dtype == config.output_dtype and config.input_dtype in (torch.float16, torch.bfloat16)

        def __init__(self, config: DSLinearConfig, implementation_config: dict[str, Any]) -> None:
            super().__init__(config, implementation_config)
            self._device = torch.device(implementation_config.get("device") or get_accelerator().current_device())
            self._gated = is_gated(config.activation)
            width = config.out_channels * (2 if self._gated else 1)
            self._width = width
            dtype = config.output_dtype
            self._activation = _activation(config, self._device, self._gated)
            self._matmul = _matmul(self._device)
            self._staging = (torch.empty((config.max_tokens, width), dtype=dtype, device=self._device)
                             if self._gated else None)
            self._output = torch.empty((config.max_tokens, config.out_channels), dtype=dtype, device=self._device)

        def transform_param(self, param: torch.Tensor) -> Any:
            if param.ndim == 1:  # a bias: added by the activation kernel, in the activation dtype
                return InferenceParameter.initialize(param.to(self._device, self._config.output_dtype))
            if tuple(param.shape) != (self._width, self._config.in_channels):
                raise ValueError(f"{self.name()}: a weight of shape {tuple(param.shape)} for a layer of "
                                 f"{self._config.in_channels} -> {self._width} channels")
            weight, scales = quantize_weight(param.to(self._device, torch.float32))
            return InferenceParameter.initialize(weight, scales=scales)

        def forward(self, hidden_states: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
            from deepspeed.inference.v2.allocator import empty_from

            rows = hidden_states.shape[0]
            output = empty_from(self._output, (rows, self._config.out_channels))
            product = empty_from(self._staging, (rows, self._width)) if self._gated else output
            self._matmul(hidden_states, w, w.scales, product)
            self._activation(output, product, b)
            return output

        @property
        def output(self) -> torch.Tensor:
            return self._output

    return W8A8Linear


def _matmul(device: torch.device) -> Any:
    """matmul(hidden_states [rows, in], int8 weight [width, in], scales, out [rows, width]): the W8A8 product into
    `out`, by the Triton kernels on a GPU (chosen once: a layer is called ~128 times a step) and eagerly elsewhere."""
    if device.type == "cuda":
        from quantization.int8_triton import w8a8_linear as fused

        return lambda hidden_states, weight, scales, out: fused(hidden_states, weight, scales, out=out)
    return lambda hidden_states, weight, scales, out: out.copy_(w8a8_linear(hidden_states, weight, scales))


def _activation(config: Any, device: torch.device, gated: bool) -> Any:
    """activation(output, product, bias): v2's CUDA kernels on a GPU (the ones BlasFPLinear runs), their
    arithmetic in PyTorch elsewhere."""
    if device.type == "cuda":
        from deepspeed.inference.v2.kernels.core_ops import CUDABiasActivation, CUDAGatedActivation

        if gated:
            kernel = CUDAGatedActivation(config.out_channels, config.output_dtype, config.activation)
            return lambda output, product, bias: kernel(output, product, bias)
        kernel = CUDABiasActivation(config.out_channels, config.output_dtype, config.activation)
        return lambda output, product, bias: kernel(output, bias)
    return lambda output, product, bias: output.copy_(reference_activation(config.activation, product, bias))


def reference_activation(activation: Any, product: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What v2's bias-activation and gated-activation kernels compute (kernels/core_ops/bias_activations and
    gated_activations, 0.19.8), in float32: GELU is the tanh approximation; a gated activation reads gate and
    up from alternate columns (gate at even, up at odd) and gives act(gate) * up."""
    from deepspeed.inference.v2.inference_utils import ActivationType

    kind = ActivationType(activation)
    x = product.float() + (bias.float() if bias is not None else 0.0)
    gelu = lambda v: torch.nn.functional.gelu(v, approximate="tanh")  # noqa: E731
    if kind in (ActivationType.GEGLU, ActivationType.ReGLU, ActivationType.SiGLU):
        gate, up = x[:, 0::2], x[:, 1::2]
        act = {ActivationType.GEGLU: gelu, ActivationType.ReGLU: torch.relu,
               ActivationType.SiGLU: torch.nn.functional.silu}[kind]
        return act(gate) * up
    act = {ActivationType.GELU: gelu, ActivationType.RELU: torch.relu, ActivationType.SILU: torch.nn.functional.silu,
           ActivationType.IDENTITY: lambda v: v}[kind]
    return act(x)


# ---- quantize=smoothquant|dynamic_int8 on FastGen --------------------------------------------------------
def smoothed_weights(model_path: str, properties: Any, tokenizer: Any, dtype: torch.dtype, device: torch.device,
                     progress: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """SmoothQuant's smoothed float weights for FastGen to load in place of the checkpoint's (its W8A8 layers then
    quantize them): the HF model in the serving dtype on `device`, calibrated (or a saved calibration reused)
    and folded as the AutoTP engine does it, then only the changed tensors kept, on the host. Returns them and
    the smoothing's result (alpha, calibration)."""
    import gc

    from transformers import AutoModelForCausalLM

    from quantization.quantizer import calibration_cache_dir, smooth_model

    progress("SmoothQuant: loading the model once in " + str(dtype).removeprefix("torch.") + " to calibrate and smooth")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map={"": str(device)},
                                                 trust_remote_code=properties.trust_remote_code).eval()
    try:
        result, names = smooth_model(model, tokenizer=tokenizer, model_path=model_path,
                                     alpha=properties.smoothquant_alpha,
                                     calibration_data=properties.smoothquant_calibration_data,
                                     cache_dir=calibration_cache_dir(properties.model_cache_dir), progress=progress)
        parameters = dict(model.named_parameters())
        weights = {name: parameters[name].detach().to("cpu") for name in names}
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return weights, result


def reference_quantizer(method: str, properties: Any, tokenizer: Any, model_path: str) -> Any:
    """What the correctness gate does to its half-precision HF reference so that it computes as the int8 engine
    should: the same smoothing (the same saved calibration) and W8A8 linear layers (the AutoTP engine's)."""
    from quantization.quantizer import calibration_cache_dir, quantize_model

    def prepare(model: Any) -> None:
        quantize_model(model, method, tokenizer=tokenizer, model_path=model_path, alpha=properties.smoothquant_alpha,
                       calibration_data=properties.smoothquant_calibration_data,
                       cache_dir=calibration_cache_dir(properties.model_cache_dir))

    return prepare
