"""The engine core on a CUDA GPU (skipped without one): every sampling parameter runs on the device, seeds
reproduce on CUDA whatever the batch-mates, the KV budget makes an overload wait instead of running out of
memory, the budget respects gpu_memory_utilization, and a server answers OpenAI requests with default
(sampling) parameters.

The models are tiny random Llamas (initializer_range 0.2: peaked logits, so greedy has no near-ties); what
they make easy is correctness of text, not speed."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from tests.support.ports import free_port
from tests.support.server_process import wait_until_healthy

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from tests.gpu.test_gpu_autotp import engine_for, requests, run, tiny_llama, word_tokenizer  # noqa: E402

EVERY_PARAMETER = [
    dict(do_sample=True),  # OpenAI's defaults: temperature 1, top_p 1
    dict(do_sample=True, temperature=0.7, top_p=0.9, seed=11),
    dict(do_sample=True, temperature=1.3, top_k=20, seed=12),
    dict(do_sample=True, top_k=50, top_p=0.8, repetition_penalty=1.2, seed=13),
    dict(repetition_penalty=1.2),  # greedy with a penalty
    dict(do_sample=True, presence_penalty=1.0, frequency_penalty=0.5, seed=14),
    dict(do_sample=True, temperature=1e-300, seed=15),  # effectively greedy
    dict(top_n_tokens=5, details=True),
]


def run_params(engine, items):
    from handlers.engine import GenerationRequest, SamplingParams
    for rid, (prompt, params) in enumerate(items):
        engine.add_request(GenerationRequest(str(rid), "", prompt, SamplingParams(max_new_tokens=24, **params)))
    tokens, finals = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(t.id for t in out.tokens)
            if out.finished:
                finals[out.request_id] = out
    return [tokens.get(str(i), []) for i in range(len(items))], [finals[str(i)] for i in range(len(items))]


def test_every_sampling_parameter_runs_on_the_gpu_in_one_batch():
    model = tiny_llama()
    prompts = [p for p, _ in requests(len(EVERY_PARAMETER))]
    tokens, finals = run_params(engine_for(model), list(zip(prompts, EVERY_PARAMETER)))
    for params, final, ids in zip(EVERY_PARAMETER, finals, tokens):
        assert final.error is None, (params, final.error)
        assert len(ids) == 24 and all(0 <= i < 512 for i in ids), params


def test_seeds_reproduce_on_cuda_whatever_the_batch_mates():
    model = tiny_llama()
    prompt = requests(1, seed=9)[0][0]
    seeded = dict(do_sample=True, temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=1234)
    alone, _ = run_params(engine_for(model), [(prompt, seeded)])
    mates = [(p, dict(do_sample=True, temperature=1.5)) for p, _ in requests(6, seed=10)]
    crowded, _ = run_params(engine_for(model), mates[:3] + [(prompt, seeded)] + mates[3:])
    assert crowded[3] == alone[0]
    other, _ = run_params(engine_for(model), [(prompt, {**seeded, "seed": 4321})])
    assert other[0] != alone[0]


def test_overload_waits_for_kv_blocks_instead_of_running_out_of_memory():
    """32 requests of 200-700 tokens against a 4096-token cache: at most a few fit at once, all finish, and
    greedy text equals each request alone."""
    model = tiny_llama()
    import random
    rng = random.Random(5)
    batch = [([rng.randrange(512) for _ in range(rng.randrange(200, 600))], rng.randrange(20, 100)) for _ in range(32)]
    engine = engine_for(model, max_batch=32, kv_tokens=4096, prefill=512)
    from handlers.engine import GenerationRequest, SamplingParams
    for rid, (prompt, n) in enumerate(batch):
        engine.add_request(GenerationRequest(str(rid), "", prompt, SamplingParams(max_new_tokens=n)))
    tokens, peak = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None
            tokens.setdefault(out.request_id, []).extend(t.id for t in out.tokens)
        stats = engine.stats()
        assert stats.kv_cache_tokens <= stats.kv_cache_capacity_tokens
        peak = max(peak, stats.running)
    assert 1 < peak < 32
    for rid in (0, 7, 31):
        prompt, n = batch[rid]
        assert tokens[str(rid)] == run(engine_for(model, max_batch=1, kv_tokens=4096), [(prompt, n)])[0]


def test_budget_respects_gpu_memory_utilization():
    from handlers.autotp_engine import _runner_within_budget
    from handlers.serving_properties import ServingProperties

    import gc

    model = tiny_llama()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # as the budget does before it measures: earlier tests' cached blocks are not in use
    free, total = torch.cuda.mem_get_info()
    share = round((total - free) / total + 0.05, 3)  # what is in use now, plus about 5% of the device
    properties = ServingProperties(gpu_memory_utilization=share, max_rolling_batch_size=8, max_tokens=1024)
    runner, budget = _runner_within_budget(model, properties, torch.device("cuda"), 8, 1024, None)
    assert budget.num_blocks > 0 and "gpu_memory_utilization" in budget.basis
    assert budget.bytes <= share * total - (total - free)  # no more than what the share leaves
    runner.prefill([0], [[1, 2, 3]], [0])  # the cache is allocated on first use
    used = total - torch.cuda.mem_get_info()[0]
    assert used <= share * total * 1.02, (used / 2**30, share * total / 2**30)


def test_server_answers_openai_requests_with_default_parameters(tmp_path):
    model = tiny_llama(dtype=torch.float32)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer = word_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(model_dir)
    port = free_port()
    env = {**os.environ, "SAGEMAKER_BIND_TO_PORT": str(port), "OPTION_MODEL_ID": str(model_dir), "OPTION_DTYPE": "fp16"}
    log_path = tmp_path / "server.log"
    process = subprocess.Popen([sys.executable, "-m", "entrypoint", "serve", "--model-dir", str(tmp_path)],
                               env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, 600, lambda: log_path.read_text()[-3000:], interval=1)
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                          json={"model": "model", "messages": [{"role": "user", "content": "w1 w2 w3"}],
                                "max_tokens": 16})
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["finish_reason"] in ("length", "stop")
        completion = httpx.post(f"{url}/v1/completions", timeout=120,
                                json={"model": "model", "prompt": "w5 w6", "max_tokens": 16, "seed": 3,
                                      "presence_penalty": 0.5, "frequency_penalty": 0.5, "logprobs": 2})
        assert completion.status_code == 200, completion.text
        lmi = httpx.post(f"{url}/invocations", timeout=120,
                         json={"inputs": "w9 w10", "parameters": {"do_sample": True, "top_k": 10, "top_p": 0.9,
                                                                  "repetition_penalty": 1.3, "max_new_tokens": 8}})
        assert lmi.status_code == 200, lmi.text
    finally:
        process.terminate()
        process.wait(timeout=120)
