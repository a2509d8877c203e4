"""DeepSpeed-FastGen on a CUDA GPU: the bridged engine's teacher-forced logits against HF fp32 per
architecture at every probe length (fed as the server feeds them: its prefill budget, alone and in a full
batch), a gate that fails DeepSpeed's defects and passes the fixed engine, the attention-atom boundary, the
FastGen rolling batch through HTTP with sampled and greedy requests, and cancel freeing KV blocks.

On a machine with CUDA nothing here skips for a missing part of the GPU install (deepspeed, deepspeed-kernels):
it fails, since the server would silently fall back to a slower engine there. Random weights use
initializer_range 0.1 so that attention depends on position (HF's 0.02 makes random attention nearly uniform
and would hide position errors), and probes are random token ids (no period to hide in)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.ports import free_port
from tests.support.word_tokenizer import sized_word_tokenizer
from tests.support.server_process import wait_until_healthy

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from fastgen_gate_table import ARCHS, VOCAB, engine_for, references_for, saved_model  # noqa: E402

LENGTHS = [48, 600, 2000, 4000]


@pytest.fixture(autouse=True)
def gpu_install():
    """The GPU install provides both; without them FastGen cannot start, which is a failure here."""
    from handlers.fastgen_model import KERNELS_MODULE
    for module in ("deepspeed", KERNELS_MODULE):
        assert importlib.util.find_spec(module) is not None, \
            f"{module} is not installed: pip install -e '.[gpu]' (FastGen needs it)"
    yield
    import gc
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("kind", ARCHS)
def test_fastgen_logits_follow_hf_fp32_as_closely_as_hf_fp16_at_every_length(kind, tmp_path):
    """Within 1.5x HF fp16's own deviation at 48-4,000 positions, each probe alone and all four in one batch of
    8 sequences (4 fillers decoding ahead of them), prompts chunked by the server's default 4,096-token budget."""
    from handlers.correctness_gate import run_gate

    path = saved_model(kind, tmp_path / kind)
    references = references_for(path, LENGTHS)
    runner, room = engine_for(path, "fixed", max_sequences=8, prefill=4096)
    result = run_gate(references, runner.ragged_forward, runner.release, max_sequences=8, max_prefill_tokens=4096,
                      vocab_size=VOCAB, tolerance=1.5)
    assert result.passed, result.describe()
    assert [p.key for p in result.probes] == ["48", "600", "2000", "4000", "48@batch8", "600@batch8", "2000@batch8",
                                              "4000@batch8"]
    assert room.atoms == 8 + 4095 // room.q_block


def _gate_table(*arguments: str) -> list[dict]:
    """benchmarks/fastgen_gate_table.py in a child process: a put past DeepSpeed's atom buffer writes past a
    pinned host buffer, which must not take this test process with it."""
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fastgen_gate_table.py"), "--json",
                                *arguments], capture_output=True, text=True, timeout=900, cwd=ROOT)
    result = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert completed.returncode == 0 and result, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(result[-1][len("RESULT "):])


def test_the_gate_fails_deepspeeds_defects_and_passes_the_fixed_engine():
    """The server's gate (random-id probes at 48/600/2000, alone and in a full batch, the server's chunking)
    on a Llama: the attention-atom buffer sized by sequences, as before, and DeepSpeed's fp16-rounded rotary
    both fail it; the fixed engine passes."""
    rows = {row["variant"]: row for row in _gate_table(
        "--archs", "llama", "--variants", "fixed", "fp16-rotary", "atoms-by-sequences", "--lengths", "48", "600",
        "2000", "--max-sequences", "8", "--prefill-tokens", "4096")}
    assert rows["fixed"]["passed_at_1.5x"], rows["fixed"]
    assert not rows["fp16-rotary"]["passed_at_1.5x"], rows["fp16-rotary"]
    assert not rows["atoms-by-sequences"]["passed_at_1.5x"], rows["atoms-by-sequences"]
    assert rows["atoms-by-sequences"]["atom_room"] == 8 and rows["fixed"]["atom_room"] > 8


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_a_long_prompt_prefilled_alone_over_many_puts_follows_hf(kind, tmp_path):
    """A 6,000-token probe with a 512-token budget goes in 12 puts with nothing read between them; each put
    refills DeepSpeed's pinned host buffers, so the runner must wait until the previous put's inputs reached the
    device (without that wait, alone probes of 6,000-8,000 tokens measured 130-240x, rotary or not)."""
    from handlers.correctness_gate import run_gate

    path = saved_model(kind, tmp_path / kind)
    references = references_for(path, [6000])
    runner, _ = engine_for(path, "fixed", max_sequences=2, prefill=512)
    result = run_gate(references, runner.ragged_forward, runner.release, max_sequences=2, max_prefill_tokens=512,
                      vocab_size=VOCAB, tolerance=1.5)
    assert result.passed, result.describe()


def test_a_step_that_exactly_fills_the_atom_buffer_is_correct_and_one_atom_less_is_not():
    """Three fillers decode while a 2,048-token prefix goes in one chunk: 3 + 16 = 19 atoms, exactly what the
    engine gives DeepSpeed room for (4 sequences, 2,048-token budget); a 6,144-token prefix is split by the
    budget over steps, none needing more. With room for one atom less, the probe placed last loses it."""
    rows = _gate_table("--archs", "boundary")
    fixed = [row for row in rows if row["variant"] == "fixed"]
    short = [row for row in rows if row["variant"] == "one-atom-short"]
    assert [row["most_atoms_in_a_step"] for row in fixed] == [19, 19] and fixed[0]["atom_room"] == 19
    assert all(row["ratio"] <= 1.5 for row in fixed), fixed
    assert fixed[1]["steps"] > 3 + 15  # the long prefix went in several chunks
    assert short[0]["atom_room"] == 18 and short[0]["ratio"] > 10, short


def test_cancel_and_finish_give_kv_blocks_back_to_deepspeed(tmp_path):
    from handlers.engine import GenerationRequest, SamplingParams
    from handlers.engine_plan import detect_device, plan_engine
    from handlers.fastgen_engine import load_fastgen_engine
    from handlers.serving_properties import ServingProperties

    path = saved_model("llama", tmp_path / "llama")
    properties = ServingProperties(max_rolling_batch_size=8, correctness_gate=False, max_tokens=2048, dtype="fp16",
                                   gpu_memory_utilization=0.2)
    plan = plan_engine(properties, json.loads((tmp_path / "llama" / "config.json").read_text()), detect_device())
    assert plan.engine == "fastgen", plan.reason
    from tests.gpu.test_gpu_autotp import word_tokenizer
    word_tokenizer().save_pretrained(path)
    engine = load_fastgen_engine(properties, plan, path, lambda text: None)
    ragged = engine.runner.engine
    free_at_start = int(ragged.free_blocks[0])
    rng = random.Random(2)
    for i in range(6):
        prompt = [rng.randrange(512) for _ in range(rng.randrange(100, 700))]
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
    engine.shutdown()


def test_fastgen_serves_sampled_and_greedy_requests_through_http(tmp_path):
    """The plan's FastGen is the engine that serves (the start-up summary's `engine`), its gate passes, and
    requests with OpenAI's default sampling, penalties, seeds and a prompt longer than one atom answer."""
    path = saved_model("llama", tmp_path / "model")
    sized_word_tokenizer(VOCAB).save_pretrained(path)
    port = free_port()
    env = {**os.environ, "OPTION_MODEL_ID": path, "SAGEMAKER_BIND_TO_PORT": str(port), "OPTION_DTYPE": "fp16",
           "OPTION_MAX_ROLLING_BATCH_SIZE": "16", "OPTION_MAX_TOKENS": "4096", "OPTION_GPU_MEMORY_UTILIZATION": "0.3"}
    log = open(tmp_path / "server.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "entrypoint", "serve"], env=env, stdout=log,
                               stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"

        def text() -> str:
            log.seek(0)
            return log.read()

        wait_until_healthy(url, process, timeout=900, log=text)
        served = re.findall(r"^\s+engine\s+(\S+)\s*$", text(), re.M)  # the start-up summary's row
        assert "plan: engine fastgen" in text() and served == ["fastgen"], text()
        assert "correctness gate passed" in text() and "attention_atoms" in text(), text()
        bodies = [{"model": path, "messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 32},  # defaults
                  {"model": path, "messages": [{"role": "user", "content": "w3"}], "max_tokens": 32,
                   "temperature": 0, "frequency_penalty": 0.5, "presence_penalty": 0.5},
                  {"model": path, "messages": [{"role": "user", "content": "w5 " * 1500}], "max_tokens": 16,
                   "seed": 7, "top_p": 0.9}]
        with httpx.Client(timeout=300) as client:
            for body in bodies:
                response = client.post(f"{url}/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                assert response.json()["usage"]["completion_tokens"] > 0
            seeded = [client.post(f"{url}/v1/chat/completions", json=bodies[2]).json()["choices"][0]["message"]
                      for _ in range(2)]
            assert seeded[0] == seeded[1]
            lmi = client.post(f"{url}/invocations", json={"inputs": "w9 w10", "parameters": {
                "do_sample": True, "top_k": 10, "repetition_penalty": 1.3, "max_new_tokens": 8}})
            assert lmi.status_code == 200, lmi.text
            too_large = client.post(f"{url}/v1/completions", json={"model": path, "prompt": [1, VOCAB + 5],
                                                                   "max_tokens": 4})
            assert too_large.status_code == 400 and "vocabulary" in too_large.text, too_large.text
            assert client.get(f"{url}/ping").status_code == 200  # the server lives on
    finally:
        process.terminate()
        process.wait(timeout=60)
