"""The rolling-batch scheduler on a tiny random-weight Llama (no downloads): joining and leaving, the
batch-size and prefill-token limits, stop sequences, seeds, and the token-limit check."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from handlers.engine import FinishReason, GenerationRequest, InvalidRequest, SamplingParams
from handlers.model_runner import ModelRunner
from handlers.rolling_batch import RollingBatchEngine

VOCAB = 96


class CharTokenizer:
    """Token i decodes to a two-character piece, so text and token boundaries differ."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) + chr(ord("A") + (i // 26) % 26) for i in ids)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, initializer_range=0.3)  # peaked logits: no near-ties in greedy
    return LlamaForCausalLM(config).eval()


def make_engine(model, max_batch=4, prefill=64, max_total=256, eos=()):
    runner = ModelRunner(model, max_batch=max_batch, max_length=max_total)
    return RollingBatchEngine(runner, CharTokenizer(), max_batch=max_batch, max_prefill_tokens=prefill,
                              max_total_tokens=max_total, eos_token_ids=eos)


def request(rid, prompt, **params):
    return GenerationRequest(str(rid), "", list(prompt), SamplingParams(**params))


def run(engine, until_done=True, max_steps=1000):
    tokens, finals, steps = {}, {}, 0
    while engine.has_unfinished() and steps < max_steps:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(t.id for t in out.tokens)
            if out.finished:
                finals[out.request_id] = out
        steps += 1
    return tokens, finals, steps


def prompts(n, seed=1):
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randrange(3, 30))] for _ in range(n)]


def alone(model, prompt, **params):
    engine = make_engine(model, max_batch=1)
    engine.add_request(request(0, prompt, **params))
    return run(engine)[0]["0"]


def test_batched_greedy_equals_each_request_alone(model):
    ps = prompts(8)
    lengths = [5, 17, 1, 30, 9, 12, 25, 3]
    engine = make_engine(model, max_batch=4, prefill=16)  # small budget: chunked prefills too
    for i, (p, n) in enumerate(zip(ps, lengths)):
        engine.add_request(request(i, p, max_new_tokens=n))
    tokens, finals, _ = run(engine)
    for i, (p, n) in enumerate(zip(ps, lengths)):
        assert tokens[str(i)] == alone(model, p, max_new_tokens=n), f"request {i}"
        assert finals[str(i)].finish_reason is FinishReason.LENGTH
        assert finals[str(i)].generated_tokens == n


def test_matches_transformers_generate_greedy(model):
    prompt = prompts(1, seed=7)[0]
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert alone(model, prompt, max_new_tokens=12) == expected[0, len(prompt):].tolist()


def test_new_request_joins_next_step_and_finished_leaves_at_once(model):
    engine = make_engine(model, max_batch=4)
    engine.add_request(request("long", prompts(1)[0], max_new_tokens=20))
    engine.add_request(request("short", prompts(1, seed=2)[0], max_new_tokens=2))
    outputs = engine.step()  # both prefilled: first tokens
    assert {o.request_id for o in outputs} == {"long", "short"}
    assert engine.stats().running == 2
    outputs = engine.step()  # short reaches 2 tokens and leaves in this very step
    assert [o.request_id for o in outputs if o.finished] == ["short"]
    assert engine.stats().running == 1
    engine.add_request(request("late", prompts(1, seed=3)[0], max_new_tokens=3))
    outputs = engine.step()
    assert {o.request_id for o in outputs} == {"long", "late"}
    assert engine.stats().running == 2


def test_running_batch_never_exceeds_max_batch(model):
    engine = make_engine(model, max_batch=2)
    for i, p in enumerate(prompts(5)):
        engine.add_request(request(i, p, max_new_tokens=4))
    peak = 0
    while engine.has_unfinished():
        engine.step()
        peak = max(peak, engine.stats().running)
        assert engine.stats().running + engine.stats().waiting <= 5
    assert peak == 2


def test_prefill_budget_splits_long_prompts_across_steps(model):
    engine = make_engine(model, max_batch=4, prefill=8)
    prompt = prompts(1, seed=5)[0] + prompts(1, seed=6)[0]  # longer than 8 tokens
    assert len(prompt) > 16
    engine.add_request(request("long", prompt, max_new_tokens=3))
    steps_before_first_token = 0
    while True:
        outputs = engine.step()
        steps_before_first_token += 1
        if any(o.tokens for o in outputs):
            break
    assert steps_before_first_token == -(-len(prompt) // 8)  # ceil(len / budget) prefill steps
    assert run(engine)[0]["long"]  # and it completes
    assert alone(model, prompt, max_new_tokens=3)[:1] == [outputs[0].tokens[0].id]


def test_running_requests_keep_decoding_while_a_long_prompt_prefills(model):
    engine = make_engine(model, max_batch=4, prefill=4)
    engine.add_request(request("running", [1, 2, 3], max_new_tokens=10))
    engine.step()
    engine.add_request(request("long", list(range(40)), max_new_tokens=2))
    for _ in range(5):
        outputs = engine.step()
        assert any(o.request_id == "running" and o.tokens for o in outputs)


def test_stop_sequence_across_token_boundaries(model):
    prompt = prompts(1, seed=11)[0]
    free = alone(model, prompt, max_new_tokens=8)
    text = CharTokenizer().decode(free)
    stop = text[5:9]  # starts in the 3rd token's second character, ends in the 5th token
    engine = make_engine(model)
    engine.add_request(request("s", prompt, max_new_tokens=8, stop_sequences=[stop]))
    streamed, final = "", None
    while engine.has_unfinished():
        for out in engine.step():
            streamed += out.text
            final = out
    assert final.finish_reason is FinishReason.STOP_SEQUENCE
    assert streamed == text[:5]  # text before the stop sequence; no part of it was ever streamed
    assert final.generated_tokens == 5


def test_eos_finishes_unless_ignored(model):
    prompt = prompts(1, seed=12)[0]
    free = alone(model, prompt, max_new_tokens=6)
    eos = free[3]
    engine = make_engine(model, eos=[eos])
    engine.add_request(request("e", prompt, max_new_tokens=6))
    engine.add_request(request("i", prompt, max_new_tokens=6, ignore_eos=True))
    tokens, finals, _ = run(engine)
    first_eos = free.index(eos)
    assert finals["e"].finish_reason is FinishReason.EOS_TOKEN
    assert tokens["e"] == free[:first_eos + 1]
    assert finals["i"].finish_reason is FinishReason.LENGTH and tokens["i"] == free


def test_same_seed_same_text_regardless_of_batch_mates(model):
    prompt = prompts(1, seed=13)[0]
    params = dict(max_new_tokens=15, do_sample=True, temperature=1.5, top_k=40, top_p=0.95, seed=1234)
    reference = alone(model, prompt, **params)
    engine = make_engine(model)
    engine.add_request(request("a", prompt, **params))
    for i, p in enumerate(prompts(3, seed=14)):
        engine.add_request(request(f"other{i}", p, max_new_tokens=10, do_sample=True, temperature=2.0))
    assert run(engine)[0]["a"] == reference
    assert alone(model, prompt, **{**params, "seed": 99}) != reference  # the seed matters


def test_prompt_plus_max_new_tokens_over_limit_is_rejected_naming_both_numbers(model):
    engine = make_engine(model, max_total=64)
    with pytest.raises(InvalidRequest) as error:
        engine.add_request(request("x", list(range(50)), max_new_tokens=20))
    message = str(error.value)
    assert "50" in message and "20" in message and "64" in message
    assert error.value.field == "max_new_tokens"
    assert not engine.has_unfinished()


def test_cancel_frees_the_slot_and_keeps_others_running(model):
    engine = make_engine(model, max_batch=2)
    engine.add_request(request("a", [1, 2, 3], max_new_tokens=20))
    engine.add_request(request("b", [4, 5, 6], max_new_tokens=20))
    engine.add_request(request("c", [7, 8, 9], max_new_tokens=3))
    engine.step()
    assert engine.stats().running == 2 and engine.stats().waiting == 1
    final = engine.cancel("a")
    assert final.finished and final.finish_reason is FinishReason.CANCELLED
    outputs = engine.step()
    assert {o.request_id for o in outputs} == {"b", "c"}
    tokens, _, _ = run(engine)
    expected_b = alone(model, [4, 5, 6], max_new_tokens=20)
    assert expected_b[-len(tokens["b"]):] == tokens["b"]


def test_repetition_penalty_changes_greedy_output(model):
    prompt = [5, 5, 5, 5]
    plain = alone(model, prompt, max_new_tokens=10)
    penalized = alone(model, prompt, max_new_tokens=10, repetition_penalty=5.0)
    assert plain != penalized
    assert len(set(penalized)) >= len(set(plain))


def test_a_request_whose_sampling_fails_ends_alone_with_an_error(model):
    class ExplodingProcessor:  # a logits processor that fails, as a buggy or numerically broken one would
        def __call__(self, input_ids, scores):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")

    good_prompt = prompts(1, seed=21)[0]
    engine = make_engine(model)
    engine.add_request(request("bad", [1, 2, 3], max_new_tokens=5, do_sample=True, seed=1))
    engine._by_id["bad"].sampler.processors.append(ExplodingProcessor())
    engine.add_request(request("good", good_prompt, max_new_tokens=6))
    tokens, finals, _ = run(engine)
    assert finals["bad"].finish_reason is FinishReason.ERROR and "sampling failed" in finals["bad"].error
    assert finals["good"].finish_reason is FinishReason.LENGTH
    assert tokens["good"] == alone(model, good_prompt, max_new_tokens=6)
    assert engine.health().healthy


def test_whole_prompts_arriving_together_are_prefilled_in_one_pass_and_match_alone(model):
    engine = make_engine(model, max_batch=8, prefill=256)
    calls = []
    original = engine.runner.prefill_many
    engine.runner.prefill_many = lambda row, batch: calls.append([len(p) for p in batch]) or original(row, batch)
    batch = [list(range(1, 9)), list(range(10, 30)), list(range(40, 45)), list(range(50, 70))]  # 3 distinct lengths
    for i, prompt in enumerate(batch):
        engine.add_request(request(i, prompt, max_new_tokens=6))
    tokens, _, _ = run(engine)
    assert calls == [[8, 20, 5, 20]]
    for i, prompt in enumerate(batch):
        assert tokens[str(i)] == alone(model, prompt, max_new_tokens=6), f"request {i}"
