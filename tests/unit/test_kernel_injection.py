"""Kernel injection on the CPU: DeepSpeed's real injected blocks on its own PyTorch fallbacks for the CUDA ops
(tests/support/kernel_injection_reference.py), driven by the project's driver and runner through the shared
rolling-batch engine with aligned dynamic batching. The GPU tests run the same checks on the compiled kernels
and for the rotary families the fallbacks cannot run."""

from __future__ import annotations

import copy

import pytest
import torch

from handlers.engine import FinishReason, GenerationRequest, InvalidRequest, SamplingParams
from handlers.kernel_injection_model import KernelInjectionUnsupported, architecture_for, inject
from handlers.scheduler import DynamicBatching
from tests.support.engines import STEP_ORDERS, step_order_fixture
from tests.support.kernel_injection_reference import (
    CPU_FAMILIES,
    random_model,
    reference_logits,
    teacher_forced,
    tiny_config,
    use_reference_ops,
)

VOCAB = 500


@pytest.fixture(autouse=True, scope="module")
def reference_ops():
    use_reference_ops()


def _non_repeating(count: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(VOCAB, generator=generator)[:length].tolist() for _ in range(count)]


@pytest.mark.parametrize("model_type", CPU_FAMILIES)
def test_driver_matches_hf_in_a_left_padded_batch_and_the_next_batch_starts_clean(model_type):
    """Prompts of 300, 17 and 2 tokens in one left-padded pass, then 8 teacher-forced tokens per row: every
    position's logits equal HF's for that row alone (fp32 both sides). A second, smaller batch after it too."""
    reference = random_model(tiny_config(model_type, vocab=VOCAB, window=1024))  # see kernel_injection_reference
    driver = inject(copy.deepcopy(reference), torch.float32, max_tokens=400)
    prompts = [p[:n] for p, n in zip(_non_repeating(3, 300, 1), (300, 17, 2))]
    continuations = _non_repeating(3, 8, 2)
    for batch in (slice(0, 3), slice(1, 3)):
        got = teacher_forced(driver, prompts[batch], continuations[batch])
        for logits, prompt, continuation in zip(got, prompts[batch], continuations[batch]):
            expected = reference_logits(reference, prompt, continuation)
            assert torch.allclose(torch.stack(logits), expected, atol=2e-3, rtol=1e-3), model_type


def test_positions_matter_to_the_probe():
    """The check above can fail: the same tokens with the learned positions shifted give other logits."""
    reference = random_model(tiny_config("gpt2", vocab=VOCAB))
    driver = inject(copy.deepcopy(reference), torch.float32, max_tokens=64)
    prompt = _non_repeating(1, 20, 3)[0]
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    right = driver.forward(ids, mask, torch.arange(20).view(1, -1))
    shifted = driver.forward(ids, mask, torch.arange(5, 25).view(1, -1))
    assert (right - shifted).abs().max() > 0.1


# ---- the engine: aligned dynamic batches through the shared scheduler, sampler and output processor ---------
class WordTokenizer:
    eos_token_id = None
    all_special_ids: list[int] = []

    def __len__(self):
        return VOCAB

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" w{i}" for i in ids)


@pytest.fixture(params=STEP_ORDERS)
def step_order(request, monkeypatch):
    return step_order_fixture(request, monkeypatch)


@pytest.fixture(scope="module")
def gpt2():
    return random_model(tiny_config("gpt2", vocab=VOCAB), std=0.3)


def _engine(model, rows=4, max_total=96, delay=3.0):
    from handlers.kernel_injection_engine import build
    from handlers.kv_blocks import BlockAllocator
    from handlers.rolling_batch import RollingBatchEngine

    built = build(copy.deepcopy(model), rows, max_total, torch.float32, progress=lambda line: None)
    return RollingBatchEngine(built.runner, WordTokenizer(), allocator=BlockAllocator(built.budget), max_batch=rows,
                              max_prefill_tokens=64, max_total_tokens=max_total, eos_token_ids=(),
                              vocab_size=VOCAB, batching=DynamicBatching(rows, delay, max_total),
                              name="kernel_injection")


def _request(rid, prompt, **params):
    return GenerationRequest(str(rid), "", list(prompt), SamplingParams(**params))


def _run(engine, outputs=()):
    tokens, finals = {}, {}
    pending = list(outputs)
    while pending or engine.has_unfinished():
        for out in pending or engine.step():
            tokens.setdefault(out.request_id, []).extend(t.id for t in out.tokens)
            if out.finished:
                finals[out.request_id] = out
        pending = []
    return tokens, finals


def _greedy(model, prompt, count):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=count, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_a_batch_with_different_lengths_limits_and_stops_gives_each_request_hf_greedy_text(gpt2, step_order):
    """Four requests form one batch (different prompt lengths, one a single token, different max_new_tokens, one
    with a stop sequence): each gets HF generate's greedy tokens, finishes on its own and reports why."""
    engine = _engine(gpt2)
    prompts = [p[:n] for p, n in zip(_non_repeating(4, 40, 5), (40, 1, 12, 7))]
    limits = [6, 20, 3, 12]
    expected = [_greedy(gpt2, p, n) for p, n in zip(prompts, limits)]
    stop = "".join(f" w{i}" for i in expected[3][4:6])  # the stop sequence ends request 3 after 6 tokens
    for i, (prompt, limit) in enumerate(zip(prompts, limits)):
        params = {"max_new_tokens": limit, "do_sample": False}
        if i == 3:
            params["stop_sequences"] = [stop]
        engine.add_request(_request(i, prompt, **params))
    tokens, finals = _run(engine)
    for i in range(3):
        assert tokens[str(i)] == expected[i]
        assert finals[str(i)].finish_reason is FinishReason.LENGTH
    assert tokens["3"][:4] == expected[3][:4]
    assert finals["3"].finish_reason is FinishReason.STOP_SEQUENCE
    assert finals["3"].generated_tokens == 6


def test_a_request_that_cannot_fit_the_batch_positions_starts_the_next_batch(gpt2, step_order):
    """Rows are padded to the longest prompt and run as long as the most new tokens asked: a long prompt and a
    long generation cannot share a batch of 96 positions, so the second waits, then runs as it would alone."""
    engine = _engine(gpt2, delay=0.0)
    long_prompt, short_prompt = _non_repeating(2, 60, 7)
    engine.add_request(_request("long-prompt", long_prompt, max_new_tokens=10, do_sample=False))
    engine.add_request(_request("long-output", short_prompt[:5], max_new_tokens=50, do_sample=False))
    first = engine.step()
    scheduler = engine.scheduler
    assert [r.request_id for r in scheduler.prefilling + scheduler.running] == ["long-prompt"]
    assert [r.request_id for r in scheduler.queued] == ["long-output"]
    tokens, finals = _run(engine, first)
    assert tokens["long-prompt"] == _greedy(gpt2, long_prompt, 10)
    assert tokens["long-output"] == _greedy(gpt2, short_prompt[:5], 50)


def test_a_batch_that_cannot_take_the_next_request_starts_without_waiting_the_delay(gpt2, step_order):
    """The next queued request cannot join (its prompt with the first's max_new_tokens passes the positions), so
    waiting the (long) delay for batch-mates would only delay the first: its batch starts at the first step."""
    engine = _engine(gpt2, delay=600.0)
    first, second = _non_repeating(2, 60, 11)
    engine.add_request(_request("a", first[:5], max_new_tokens=50, do_sample=False))
    engine.add_request(_request("b", second, max_new_tokens=4, do_sample=False))
    outputs = engine.step()
    scheduler = engine.scheduler
    assert [r.request_id for r in scheduler.prefilling + scheduler.running] == ["a"]
    tokens = [t.id for out in outputs for t in out.tokens]
    while "a" in engine.output:  # b, alone in the queue now, waits the delay for batch-mates: only a runs
        tokens += [t.id for out in engine.step() for t in out.tokens if out.request_id == "a"]
    assert tokens == _greedy(gpt2, first[:5], 50)
    assert [r.request_id for r in scheduler.queued] == ["b"]
    engine.cancel("b")


def test_sampled_requests_with_seeds_and_penalties_repeat_and_differ_by_seed(gpt2, step_order):
    engine = _engine(gpt2, delay=0.0)
    prompt = _non_repeating(1, 10, 9)[0]
    params = dict(max_new_tokens=12, do_sample=True, temperature=1.0, top_p=0.9, top_k=50,
                  repetition_penalty=1.3)
    for rid, seed in (("a", 1), ("b", 1), ("c", 2)):
        engine.add_request(_request(rid, prompt, seed=seed, **params))
    tokens, _ = _run(engine)
    assert tokens["a"] == tokens["b"] and len(tokens["a"]) == 12
    assert tokens["a"] != tokens["c"]


def test_prompt_log_probabilities_are_refused_with_the_reason(gpt2):
    engine = _engine(gpt2)
    with pytest.raises(InvalidRequest, match="prompt log-probabilities .* kernel_injection") as caught:
        engine.add_request(_request("x", [1, 2, 3], max_new_tokens=2, prompt_logprobs=True))
    assert caught.value.field == "prompt_logprobs"
    engine.add_request(_request("y", [1, 2, 3], max_new_tokens=2, do_sample=False))  # the engine still serves
    assert _run(engine)[0]["y"] == _greedy(gpt2, [1, 2, 3], 2)


# ---- what kernel injection refuses, before loading weights --------------------------------------------------
@pytest.mark.parametrize("model_type,changes,why", [
    ("llama", {"num_key_value_heads": 2}, "grouped-query attention"),
    ("opt", {"do_layer_norm_before": False}, "do_layer_norm_before=false"),
    ("gpt_neox", {"use_parallel_residual": False}, "parallel residual"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "scales them"),
    ("opt", {"ffn_dim": 100}, "sizes the MLP at 4 x hidden_size"),
    ("gpt_neox", {"intermediate_size": 128}, "intermediate_size is 128"),
])
def test_configurations_the_kernels_would_compute_wrongly_are_refused(model_type, changes, why):
    config = tiny_config(model_type)
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(KernelInjectionUnsupported, match=why):
        architecture_for(config)


def test_an_architecture_without_a_driver_row_is_refused_by_name():
    from transformers import MistralConfig

    with pytest.raises(KernelInjectionUnsupported, match="'mistral'"):
        architecture_for(MistralConfig())


def test_through_the_http_app_lmi_and_openai_requests_answer_and_prompt_scores_get_a_400(gpt2):
    """The real app over the kernel-injection engine: an LMI greedy request answers HF's greedy words, OpenAI chat
    with its default sampling answers, and decoder_input_details is a 400 naming why."""
    from handlers.kernel_injection_engine import build
    from handlers.kv_blocks import BlockAllocator
    from handlers.rolling_batch import RollingBatchEngine
    from tests.support.word_tokenizer import sized_word_tokenizer
    from tests.unit.test_http_app import Served, assert_error

    tokenizer = sized_word_tokenizer(VOCAB)
    built = build(copy.deepcopy(gpt2), 4, 96, torch.float32, progress=lambda line: None)
    engine = RollingBatchEngine(built.runner, tokenizer, allocator=BlockAllocator(built.budget), max_batch=4,
                                max_prefill_tokens=64, max_total_tokens=96, eos_token_ids=(), vocab_size=VOCAB,
                                batching=DynamicBatching(4, 0.0, 96), name="kernel_injection")
    served = Served(engine)
    try:
        answer = served.post({"inputs": "w3 w4 w5", "parameters": {"max_new_tokens": 5, "do_sample": False}})
        assert answer.status_code == 200, answer.text
        assert answer.json()["generated_text"].split() == [f"w{i}" for i in _greedy(gpt2, [3, 4, 5], 5)]
        chat = served.post({"model": "org/fake-model", "messages": [{"role": "user", "content": "w1 w2"}],
                            "max_tokens": 6}, url="/v1/chat/completions")
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] > 0, chat.text
        refused = served.post({"inputs": "w1 w2", "parameters": {"max_new_tokens": 2, "details": True,
                                                                 "decoder_input_details": True}})
        assert_error(refused, 400, "InvalidRequest", "prompt log-probabilities", "kernel_injection")
    finally:
        served.close()
