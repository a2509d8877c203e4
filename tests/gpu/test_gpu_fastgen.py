"""DeepSpeed-FastGen on a CUDA GPU (skipped without one, or without deepspeed-kernels): the bridged model's
teacher-forced logits against HF fp32 per architecture (norm eps and rope scaling set as real models set
them), the FastGen rolling batch through HTTP with sampled and greedy requests, and cancel freeing KV blocks.

Random weights use initializer_range 0.1 so that attention depends on position (HF's 0.02 makes random
attention nearly uniform and would hide rotary errors)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import httpx
import pytest

from tests.support.ports import free_port
from tests.support.server_process import wait_until_healthy

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _kernels() -> None:
    pytest.importorskip("deepspeed_kernels", reason="FastGen's blocked flash attention needs deepspeed-kernels")


def _config(kind: str):
    from transformers import (FalconConfig, LlamaConfig, MistralConfig, OPTConfig, Phi3Config, PhiConfig,
                              Qwen2Config)
    common = dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                  max_position_embeddings=4096, initializer_range=0.1)
    if kind == "llama":  # Llama-2's eps is 1e-5, Llama-3's 1e-5, LlamaConfig's default 1e-6: take 1e-6
        return LlamaConfig(num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-6, **common)
    if kind == "llama3.1":
        return LlamaConfig(num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5,
                           rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024,
                                            "rope_theta": 500000.0}, **common)
    if kind == "mistral":
        return MistralConfig(num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5, sliding_window=None,
                             **common)
    if kind == "qwen2":
        return Qwen2Config(num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6, **common)
    if kind == "phi3":
        return Phi3Config(num_attention_heads=8, num_key_value_heads=8, rms_norm_eps=1e-5, pad_token_id=0, **common)
    if kind == "phi":
        return PhiConfig(num_attention_heads=8, partial_rotary_factor=0.5, layer_norm_eps=1e-5, **common)
    if kind == "falcon":
        return FalconConfig(vocab_size=1024, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                            new_decoder_architecture=True, num_kv_heads=2, max_position_embeddings=4096,
                            initializer_range=0.1)
    if kind == "opt":
        return OPTConfig(vocab_size=1024, hidden_size=512, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=8,
                         max_position_embeddings=4096, word_embed_proj_dim=512, init_std=0.1)
    raise ValueError(kind)


def saved_model(kind: str, directory) -> str:
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(kind))
    model.save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("kind", ["llama", "llama3.1", "mistral", "qwen2", "phi3", "phi", "falcon", "opt"])
def test_fastgen_logits_follow_hf_fp32_as_closely_as_hf_fp16_at_every_length(kind, tmp_path):
    _kernels()
    from transformers import AutoConfig, AutoModelForCausalLM

    from handlers.correctness_gate import hf_references, run_gate
    from handlers.fastgen_model import EngineLimits, build_fastgen_engine
    from handlers.fastgen_runner import FastGenRunner

    path = saved_model(kind, tmp_path / kind)
    rng = random.Random(1)
    probes = [[rng.randrange(1024) for _ in range(n)] for n in (48, 600, 2000)]
    references = hf_references(lambda dtype: AutoModelForCausalLM.from_pretrained(path, dtype=dtype), probes,
                               torch.float16, torch.device("cuda"))
    limits = EngineLimits(max_sequences=4, max_batch_tokens=2048 + 4, max_context=4096, reserve_bytes=2**30)
    engine, _ = build_fastgen_engine(path, AutoConfig.from_pretrained(path), limits, dtype=torch.float16)
    runner = FastGenRunner(engine, "cuda")
    result = run_gate(references, lambda i: (lambda tokens: runner.ragged_forward([i], [tokens])[0]),
                      runner.release, tolerance=1.5)
    assert result.passed, result.describe()


def test_cancel_and_finish_give_kv_blocks_back_to_deepspeed(tmp_path):
    _kernels()
    import json

    from handlers.engine import GenerationRequest, SamplingParams
    from handlers.engine_plan import detect_device, plan_engine
    from handlers.fastgen_engine import load_fastgen_engine
    from handlers.serving_properties import ServingProperties

    path = saved_model("llama", tmp_path / "llama")
    properties = ServingProperties(max_rolling_batch_size=8, correctness_gate=False, max_tokens=2048, dtype="fp16")
    plan = plan_engine(properties, json.loads((tmp_path / "llama" / "config.json").read_text()), detect_device())
    assert plan.engine == "fastgen", plan.reason
    engine = load_fastgen_engine(properties, plan, path, lambda text: None)
    ragged = engine.runner.engine
    free_at_start = int(ragged.free_blocks[0])
    rng = random.Random(2)
    for i in range(6):
        prompt = [rng.randrange(1024) for _ in range(rng.randrange(100, 700))]
        engine.add_request(GenerationRequest(str(i), "", prompt, SamplingParams(max_new_tokens=50, do_sample=i % 2 == 1,
                                                                               seed=i, repetition_penalty=1.1)))
    for _ in range(5):
        engine.step()
    assert int(ragged.free_blocks[0]) < free_at_start
    engine.cancel("0")
    engine.cancel("3")
    while engine.has_unfinished():
        engine.step()
    assert int(ragged.free_blocks[0]) == free_at_start
    assert engine.stats().kv_cache_tokens == 0


def test_fastgen_serves_sampled_and_greedy_requests_through_http(tmp_path):
    _kernels()
    path = saved_model("llama", tmp_path / "model")
    tokenizer_dir = os.environ.get("LMI_TEST_TOKENIZER")  # the SmolLM2 tokenizer the GPU session carries
    if not tokenizer_dir:
        pytest.skip("set LMI_TEST_TOKENIZER to a tokenizer directory (benchmarks/gpu_session.sh does)")
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    port = free_port()
    env = {**os.environ, "OPTION_MODEL_ID": path, "SAGEMAKER_BIND_TO_PORT": str(port), "OPTION_DTYPE": "fp16",
           "OPTION_MAX_ROLLING_BATCH_SIZE": "16", "OPTION_MAX_TOKENS": "2048"}
    log = open(tmp_path / "server.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "entrypoint", "serve"], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        def text() -> str:
            log.seek(0)
            return log.read()

        wait_until_healthy(url, process, timeout=900, log=text)
        assert "engine fastgen" in text() and "correctness gate passed" in text(), text()
        bodies = [{"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 32},  # defaults
                  {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32,
                   "temperature": 0, "frequency_penalty": 0.5, "presence_penalty": 0.5},
                  {"model": "m", "messages": [{"role": "user", "content": "x " * 1500}], "max_tokens": 16,
                   "seed": 7, "top_p": 0.9}]
        with httpx.Client(timeout=300) as client:
            for body in bodies:
                response = client.post(f"{url}/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                assert response.json()["usage"]["completion_tokens"] > 0
            seeded = [client.post(f"{url}/v1/chat/completions", json=bodies[2]).json()["choices"][0]["message"]
                      for _ in range(2)]
            assert seeded[0] == seeded[1]
    finally:
        process.terminate()
        process.wait(timeout=60)
