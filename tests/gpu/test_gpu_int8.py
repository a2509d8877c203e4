"""int8 on a CUDA GPU: the W8A8 arithmetic at the shapes the GPU kernels constrain, FastGen's W8A8 linear layer
against DeepSpeed's own fp16 one, a FastGen engine with int8 layers against HF with the same quantization,
and the server with each `quantize` value.

On a machine with CUDA nothing here skips for a missing part of the GPU install (deepspeed, deepspeed-kernels,
Triton): it fails. References are float64 products computed here, or HF's own model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.int8_reference import reference_w8a8
from tests.support.server_process import serve_process

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(autouse=True)
def gpu_install():
    from handlers.fastgen_model import KERNELS_MODULE
    for module in ("deepspeed", KERNELS_MODULE, "triton"):
        assert importlib.util.find_spec(module) is not None, f"{module} is not installed: pip install -e '.[gpu]'"
    yield
    import gc
    gc.collect()
    torch.cuda.empty_cache()


# rows on both sides of cuBLASLt's int8 limit (more than 16), widths that are not multiples of 8, a 7B layer
SHAPES = [(1, 100, 33), (5, 100, 33), (16, 4096, 4096), (17, 4096, 11008), (33, 11008, 4096), (300, 96, 130)]


@pytest.mark.parametrize("rows,inner,outer", SHAPES)
def test_both_int8_paths_match_the_float64_w8a8_product_on_the_gpu(rows, inner, outer):
    """AutoTP's Int8Linear (quantization.int8: torch._int_mm where cuBLASLt takes the shape, float matmul of the
    integers where not) and FastGen's Triton kernels give the same W8A8 product."""
    from quantization import int8, int8_triton

    torch.manual_seed(rows + inner)
    x = torch.randn(rows, inner, device="cuda", dtype=torch.float16)
    weight = torch.randn(outer, inner, device="cuda") * 0.02
    wq, ws = int8.quantize_weight(weight)
    expected = reference_w8a8(x.float(), weight)
    scale = expected.abs().max()
    eager = int8.w8a8_linear(x, wq, ws)
    assert (eager.double() - expected).abs().max() / scale < 1e-5
    fused = int8_triton.w8a8_linear(x, wq, ws)
    assert fused.dtype == torch.float16
    assert (fused.double() - expected).abs().max() / scale < 2e-3  # fp16 rounding of the output only
    exact = x.double() @ weight.double().t()
    assert (fused.double() - exact).abs().max() / exact.abs().max() < 0.03  # int8's own error


def _deepspeed_linear(name: str, activation, in_channels: int, out_channels: int):
    from deepspeed.inference.v2.modules.configs import DSLinearConfig
    from deepspeed.inference.v2.modules.interfaces import DSLinearRegistry
    from deepspeed.inference.v2.modules.module_registry import ConfigBundle

    from handlers.fastgen_int8 import w8a8_linear_class

    w8a8_linear_class()  # registered
    config = DSLinearConfig(max_tokens=256, in_channels=in_channels, out_channels=out_channels,
                            activation=activation, input_dtype=torch.float16, output_dtype=torch.float16)
    return DSLinearRegistry.instantiate_config(ConfigBundle(name=name, config=config))


@pytest.mark.parametrize("activation_name", ["IDENTITY", "SiGLU", "GELU"])
@pytest.mark.parametrize("rows", [1, 7, 200])
def test_fastgens_w8a8_layer_follows_deepspeeds_fp16_layer(activation_name, rows):
    """Same weights through DeepSpeed's BlasFPLinear (fp16) and ours (int8), with v2's own activation kernels."""
    from deepspeed.inference.v2.inference_utils import ActivationType, is_gated

    activation = ActivationType[activation_name]
    in_channels, out_channels = 1024, 1408
    width = out_channels * (2 if is_gated(activation) else 1)
    torch.manual_seed(rows)
    weight = (torch.randn(width, in_channels) * 0.03).half().cuda()
    bias = (torch.randn(width) * 0.1).half().cuda()
    x = torch.randn(rows, in_channels, device="cuda", dtype=torch.float16)
    results = []
    for name in ("blas_fp_linear", "lmi_w8a8_int8_linear"):
        module = _deepspeed_linear(name, activation, in_channels, out_channels)
        results.append(module(x, module.transform_param(weight.clone()), module.transform_param(bias.clone())).clone())
    fp16, w8a8 = results
    assert w8a8.shape == fp16.shape == (rows, out_channels)
    relative = (w8a8.float() - fp16.float()).abs().max() / fp16.float().abs().max()
    assert relative < 0.04, relative


def test_a_fastgen_engine_with_int8_layers_follows_hf_with_the_same_quantization(tmp_path):
    """The gate's measure on a random Llama (attention depending on position), probes alone and in a full batch:
    FastGen int8 deviates from HF fp32 no more than 1.5x as much as HF fp16 with AutoTP's Int8Linear does."""
    from fastgen_gate_table import VOCAB, engine_for, references_for, saved_model

    from handlers.correctness_gate import run_gate

    path = saved_model("llama", tmp_path / "llama")
    references = references_for(path, [48, 600, 2000], int8=True)
    runner, _ = engine_for(path, "int8", max_sequences=8, prefill=4096)
    result = run_gate(references, runner.ragged_forward, runner.release, max_sequences=8, max_prefill_tokens=4096,
                      vocab_size=VOCAB, tolerance=1.5)
    assert result.passed, result.describe()
    assert type(runner.engine.model().qkv).__name__ == "W8A8Linear"


@pytest.mark.parametrize("engine", ["fastgen", "autotp"])
@pytest.mark.parametrize("quantize", ["dynamic_int8", "smoothquant"])
def test_the_server_serves_each_quantize_value_on_each_int8_engine(quantize, engine, tmp_path):
    """FastGen (the plan's choice) with its W8A8 layers and its gate against HF int8, and AutoTP's Int8Linear
    (fastgen=false), each answering through HTTP."""
    from fastgen_gate_table import tiny_config

    log = _serve_tiny_llama(tmp_path, OPTION_QUANTIZE=quantize, OPTION_MODEL_CACHE_DIR=str(tmp_path / "cache"),
                            OPTION_FASTGEN="true" if engine == "fastgen" else "false")
    if engine == "fastgen":
        assert "fell back" not in log and "cannot serve this model" not in log, log[-5000:]
        assert f"quantize={quantize}: W8A8 linear layers in FastGen" in log, log[-5000:]
        assert quantize != "smoothquant" or "tensors smoothed" in log, log[-5000:]
    else:
        layers = tiny_config("llama").num_hidden_layers * 7
        assert f"quantize={quantize}: {layers} linear layers now int8 (W8A8)" in log, log[-5000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallelism needs two GPUs")
def test_int8_at_tensor_parallel_degree_2_answers_with_every_rank_quantized(tmp_path):
    """FastGen serves one GPU only, so degree 2 is AutoTP's: each rank quantizes its own shards (row-parallel
    layers dequantize before the all-reduce), and the greedy text answers through HTTP."""
    log = _serve_tiny_llama(tmp_path, OPTION_QUANTIZE="dynamic_int8", OPTION_TENSOR_PARALLEL_DEGREE="2")
    assert log.count("linear layers now int8 (W8A8)") >= 2  # both ranks


def _serve_tiny_llama(tmp_path, **options: str) -> str:
    """`python -m entrypoint serve` on the gate table's random Llama (attention that depends on position) with
    these OPTION_* settings: one greedy request of 8 tokens must answer 200 with 8 words; returns the log."""
    from fastgen_gate_table import VOCAB, saved_model

    from tests.support.word_tokenizer import sized_word_tokenizer

    model_dir = saved_model("llama", tmp_path / "model")
    sized_word_tokenizer(VOCAB).save_pretrained(model_dir)
    log_path = tmp_path / "server.log"
    with serve_process(model_dir, log_path, OPTION_MAX_TOKENS="2048", OPTION_GPU_MEMORY_UTILIZATION="0.3",
                       **options) as url:
        answer = httpx.post(f"{url}/invocations", timeout=120,
                            json={"inputs": "w1 w2 w3", "parameters": {"max_new_tokens": 8, "do_sample": False}})
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["generated_text"].split()) == 8
        return log_path.read_text()
