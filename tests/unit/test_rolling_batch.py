"""The rolling-batch scheduler on a tiny random-weight Llama (no downloads): joining and leaving, the
batch-size and prefill-token limits, stop sequences, seeds, and the token-limit check."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from handlers.engine import FinishReason, GenerationRequest, InvalidRequest, SamplingParams
from tests.support.engines import make_engine as build_engine
from tests.support.engines import STEP_ORDERS, step_order_fixture

VOCAB = 96


@pytest.fixture(autouse=True, params=STEP_ORDERS)
def step_order(request, monkeypatch):
    return step_order_fixture(request, monkeypatch)


class CharTokenizer:
    """Token i decodes to a two-character piece, so text and token boundaries differ."""

    eos_token_id = None
    all_special_ids: list[int] = []

    def __len__(self):
        return VOCAB

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) + chr(ord("A") + (i // 26) % 26) for i in ids)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, initializer_range=0.3)  # peaked logits: no near-ties in greedy
    return LlamaForCausalLM(config).eval()


def make_engine(model, tokenizer=None, **options):
    return build_engine(model, tokenizer or CharTokenizer(), **options)


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


def launched_only(engine, step_order):
    """In the overlapped order a step returns the previous pass's outputs: the first call only launches."""
    if step_order == "overlapped":
        assert engine.step() == []


def test_new_request_joins_next_step_and_finished_leaves_at_once(model, step_order):
    engine = make_engine(model, max_batch=4)
    engine.add_request(request("long", prompts(1)[0], max_new_tokens=20))
    engine.add_request(request("short", prompts(1, seed=2)[0], max_new_tokens=2))
    launched_only(engine, step_order)
    outputs = engine.step()  # both prefilled: first tokens
    assert {o.request_id for o in outputs} == {"long", "short"}
    assert engine.stats().running == 2
    outputs = engine.step()  # short reaches 2 tokens and leaves in this very step
    assert [o.request_id for o in outputs if o.finished] == ["short"]
    assert engine.stats().running == 1
    engine.add_request(request("late", prompts(1, seed=3)[0], max_new_tokens=3))
    outputs = engine.step()
    if step_order == "overlapped":  # late was admitted after the pass on the device was launched
        assert {o.request_id for o in outputs} == {"long"}
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


def test_prefill_budget_splits_long_prompts_across_steps(model, step_order):
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
    lag = step_order == "overlapped"  # a pass's outputs come with the next call
    assert steps_before_first_token == -(-len(prompt) // 8) + lag  # ceil(len / budget) prefill steps
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
    mate = prompts(1, seed=12)[0]
    engine = make_engine(model)
    engine.add_request(request("s", prompt, max_new_tokens=8, stop_sequences=[stop]))
    engine.add_request(request("mate", mate, max_new_tokens=12))
    streamed, final, mate_tokens = "", None, []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == "mate":
                mate_tokens += [t.id for t in out.tokens]
                continue
            assert final is None, "an output after the final one"
            streamed += out.text
            final = out if out.finished else None
    assert final.finish_reason is FinishReason.STOP_SEQUENCE
    assert streamed == text[:5]  # text before the stop sequence; no part of it was ever streamed
    assert final.generated_tokens == 5
    # In the overlapped order the stop is found while the next pass, holding "s", is on the device: that
    # pass's token for it is dropped and its blocks come back once the pass is read.
    assert mate_tokens == alone(model, mate, max_new_tokens=12)
    assert engine.stats().kv_cache_tokens == 0


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


def test_prompt_ids_past_the_models_vocabulary_are_refused_and_batch_mates_run_on(model):
    """A tokenizer with more tokens than the model has embeddings (on a GPU, an id past them is a device-side
    assert that ends the process): the request is refused by name, its batch-mates are served."""
    engine = make_engine(model)
    engine.add_request(request("ok", [1, 2, 3], max_new_tokens=4))
    with pytest.raises(InvalidRequest) as error:
        engine.add_request(request("bad", [5, VOCAB, VOCAB + 7], max_new_tokens=4))
    assert error.value.field == "inputs"
    assert f"[{VOCAB}, {VOCAB + 7}]" in str(error.value) and f"(0..{VOCAB - 1})" in str(error.value)
    tokens, finals, _ = run(engine)
    assert list(finals) == ["ok"] and len(tokens["ok"]) == 4


def test_cancel_frees_the_slot_and_keeps_others_running(model, step_order):
    engine = make_engine(model, max_batch=2)
    engine.add_request(request("a", [1, 2, 3], max_new_tokens=20))
    engine.add_request(request("b", [4, 5, 6], max_new_tokens=20))
    engine.add_request(request("c", [7, 8, 9], max_new_tokens=3))
    launched_only(engine, step_order)
    engine.step()
    assert engine.stats().running == 2 and engine.stats().waiting == 1
    final = engine.cancel("a")
    assert final.finished and final.finish_reason is FinishReason.CANCELLED
    outputs = engine.step()
    if step_order == "overlapped":  # a's token of the pass on the device is dropped; c starts in the next pass
        assert {o.request_id for o in outputs} == {"b"}
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
    """Non-finite logits in one row (what a numerically broken model produces) end that request alone."""
    good_prompt = prompts(1, seed=21)[0]
    engine = make_engine(model)
    engine.add_request(request("bad", [1, 2, 3], max_new_tokens=5, do_sample=True, seed=1))
    engine.add_request(request("good", good_prompt, max_new_tokens=6))
    original = engine.runner.decode

    def decode(sequences, token_ids, positions):
        logits = original(sequences, token_ids, positions).clone()
        bad = engine.sequence_of("bad")
        if bad is not None and bad in sequences:
            logits[sequences.index(bad)] = float("nan")
        return logits

    engine.runner.decode = decode
    tokens, finals, _ = run(engine)
    assert finals["bad"].finish_reason is FinishReason.ERROR and "sampling failed" in finals["bad"].error
    assert finals["good"].finish_reason is FinishReason.LENGTH
    assert tokens["good"] == alone(model, good_prompt, max_new_tokens=6)
    assert engine.health().healthy


def test_whole_prompts_arriving_together_are_prefilled_in_one_pass_and_match_alone(model):
    engine = make_engine(model, max_batch=8, prefill=256)
    calls = []
    original = engine.runner.prefill
    engine.runner.prefill = lambda seqs, chunks, starts, all_logits=False: (
        calls.append([len(c) for c in chunks]) or original(seqs, chunks, starts, all_logits))
    batch = [list(range(1, 9)), list(range(10, 30)), list(range(40, 45)), list(range(50, 70))]  # 3 distinct lengths
    for i, prompt in enumerate(batch):
        engine.add_request(request(i, prompt, max_new_tokens=6))
    tokens, _, _ = run(engine)
    assert calls == [[8, 20, 5, 20]]
    for i, prompt in enumerate(batch):
        assert tokens[str(i)] == alone(model, prompt, max_new_tokens=6), f"request {i}"


# ---- the KV memory budget -------------------------------------------------------------------------------
def test_requests_wait_for_kv_blocks_and_all_complete_as_if_alone(model):
    """A cache of 64 positions (4 blocks) holds two requests of 20 + 12 tokens at a time: the rest wait in
    the queue instead of running out of memory, and every one gives the text it gives alone."""
    engine = make_engine(model, max_batch=8, kv_tokens=64)
    ps = [list(range(i, i + 20)) for i in range(6)]
    for i, p in enumerate(ps):
        engine.add_request(request(i, p, max_new_tokens=12))
    peak_running, peak_blocks = 0, 0
    tokens = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(t.id for t in out.tokens)
        stats = engine.stats()
        peak_running = max(peak_running, stats.running)
        peak_blocks = max(peak_blocks, stats.kv_cache_tokens)
        assert stats.kv_cache_tokens <= stats.kv_cache_capacity_tokens == 64
    assert peak_running == 2 and peak_blocks == 64
    for i, p in enumerate(ps):
        assert tokens[str(i)] == alone(model, p, max_new_tokens=12), f"request {i}"
    assert engine.stats().kv_cache_tokens == 0  # every block given back


def test_a_request_larger_than_the_whole_cache_is_refused_at_validation(model):
    engine = make_engine(model, kv_tokens=32)
    assert engine.max_total_tokens == 32
    with pytest.raises(InvalidRequest) as error:
        engine.add_request(request("big", list(range(30)), max_new_tokens=10))
    assert "40" in str(error.value) and "32" in str(error.value)


# ---- attention semantics --------------------------------------------------------------------------------
def test_sliding_window_model_matches_transformers_generate():
    """Mistral with a 6-token window and 20-token prompts: positions beyond the window are masked."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=6, rms_norm_eps=1e-5, initializer_range=0.3)
    mistral = MistralForCausalLM(config).eval()
    mistral.config._attn_implementation = "sdpa"
    prompt = prompts(1, seed=31)[0] + prompts(1, seed=32)[0]
    expected = mistral.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)
    engine = make_engine(mistral, prefill=7)  # chunked prefill crosses the window too
    engine.add_request(request("w", prompt, max_new_tokens=10))
    assert run(engine)[0]["w"] == expected[0, len(prompt):].tolist()
    # the window matters for this model and prompt: full attention gives other logits
    full = MistralForCausalLM(MistralConfig(**{**config.to_dict(), "sliding_window": None})).eval()
    full.load_state_dict(mistral.state_dict())
    with torch.no_grad():
        assert not torch.allclose(full(torch.tensor([prompt])).logits[0, -1],
                                  mistral(torch.tensor([prompt])).logits[0, -1], atol=1e-3)


# ---- stop token ids, special-token stop strings, prompt log-probabilities --------------------------------
class SpecialTokenizer(CharTokenizer):
    """Token 7 is the special token `<end>`: decoded text never contains it."""

    all_special_tokens = ["<end>"]
    all_special_ids = [7]

    def convert_tokens_to_ids(self, text):
        return 7 if text == "<end>" else -1

    def decode(self, ids, skip_special_tokens=True):
        return super().decode([i for i in ids if i != 7 or not skip_special_tokens])


def test_stop_token_ids_and_special_token_stop_strings(model):
    prompt = prompts(1, seed=41)[0]
    free = alone(model, prompt, max_new_tokens=8)
    target = free[3]
    for params in (dict(stop_token_ids=[target]),):
        engine = make_engine(model)
        engine.add_request(request("s", prompt, max_new_tokens=8, **params))
        tokens, finals, _ = run(engine)
        assert tokens["s"] == free[:free.index(target) + 1]
        assert finals["s"].finish_reason is FinishReason.STOP_SEQUENCE
    # a stop string that is a special token's text stops on that token, which is not part of the text
    forced = [t if i != 2 else 7 for i, t in enumerate(free)]
    engine = make_engine(model, tokenizer=SpecialTokenizer())
    engine.add_request(request("t", prompt, max_new_tokens=8, stop_sequences=["<end>"]))
    original = engine.runner.decode
    step = {"n": 0}

    def decode(sequences, token_ids, positions):  # steer the model to emit token 7 third
        logits = original(sequences, token_ids, positions).clone()
        step["n"] += 1
        if step["n"] == 2:
            logits[:, 7] = 1e4
        return logits

    engine.runner.decode = decode
    streamed = ""
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            streamed += out.text
            final = out
    assert final.finish_reason is FinishReason.STOP_SEQUENCE and final.generated_tokens == 3
    assert "<end>" not in streamed and streamed == CharTokenizer().decode(forced[:2])
    with pytest.raises(InvalidRequest):
        make_engine(model).add_request(request("x", prompt, stop_token_ids=[VOCAB + 5]))


def test_prompt_log_probs_equal_teacher_forced_log_softmax_and_max_new_tokens_zero_scores_only(model):
    prompt = prompts(1, seed=51)[0] + prompts(1, seed=52)[0]
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    expected = [reference[i - 1, token].item() for i, token in enumerate(prompt) if i > 0]
    for max_new in (0, 3):
        engine = make_engine(model, prefill=16)  # several chunks
        engine.add_request(request("p", prompt, max_new_tokens=max_new, prompt_logprobs=True, top_n_tokens=2))
        details, finals = [], {}
        while engine.has_unfinished():
            for out in engine.step():
                details.extend(out.prompt_token_details)
                if out.finished:
                    finals[out.request_id] = out
        assert [t.id for t in details] == prompt
        assert details[0].log_prob != details[0].log_prob  # nan: no context for the first token
        assert [t.log_prob for t in details[1:]] == pytest.approx(expected, abs=1e-4)
        assert [t.id for t in details[1].top_tokens] == reference[0].topk(2).indices.tolist()
        assert finals["p"].generated_tokens == max_new and finals["p"].finish_reason is FinishReason.LENGTH


# ---- rolling_batch=disable: dynamic batching -------------------------------------------------------------
def test_dynamic_batching_runs_each_batch_to_completion(model, step_order):
    from handlers.scheduler import DynamicBatching

    # c, alone after the first batch, waits the whole delay for a batch-mate: long enough that a loaded
    # machine cannot pass it between add_request and step, short enough not to stall the suite
    engine = make_engine(model, max_batch=4, batching=DynamicBatching(batch_size=2, max_batch_delay=3.0))
    ps = prompts(3, seed=61)
    engine.add_request(request("a", ps[0], max_new_tokens=3))
    assert engine.step() == [] and engine.stats().running == 0  # waits for a batch-mate (delay not over)
    engine.add_request(request("b", ps[1], max_new_tokens=6))
    engine.add_request(request("c", ps[2], max_new_tokens=2))
    launched_only(engine, step_order)  # batch_size reached: a and b start together; c waits for the next batch
    outputs = engine.step()
    assert {o.request_id for o in outputs} == {"a", "b"}
    tokens, finished_order = {}, []
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(t.id for t in out.tokens)
            if out.finished:
                finished_order.append(out.request_id)
            if out.request_id == "c":
                assert "b" in finished_order, "c joined a running batch"
    assert finished_order == ["a", "b", "c"]  # a finishes on its own, before its batch-mate b
    assert tokens["c"] == alone(model, ps[2], max_new_tokens=2)


def test_dynamic_batch_starts_after_the_delay_with_fewer_requests(model, step_order):
    import time as _time

    from handlers.scheduler import DynamicBatching

    engine = make_engine(model, batching=DynamicBatching(batch_size=4, max_batch_delay=0.05))
    engine.add_request(request("a", prompts(1)[0], max_new_tokens=2))
    _time.sleep(0.06)
    launched_only(engine, step_order)
    assert any(o.request_id == "a" for o in engine.step())


def test_after_an_out_of_memory_step_cancelling_frees_everything_and_serving_goes_on(model):
    """What the engine loop does on EngineOutOfMemory: cancel the affected requests. Every state (queued,
    prefilling, running) must cancel cleanly and give its blocks back."""
    from handlers.engine import EngineOutOfMemory

    engine = make_engine(model, max_batch=2, prefill=8, kv_tokens=256)
    engine.add_request(request("running", [1, 2, 3], max_new_tokens=20))
    engine.step()
    engine.add_request(request("prefilling", list(range(30)), max_new_tokens=5))
    engine.add_request(request("queued", [4, 5], max_new_tokens=5))
    original = engine.runner.decode

    def failing(*args):
        raise EngineOutOfMemory("out of device memory (test)")

    engine.runner.decode = failing
    with pytest.raises(EngineOutOfMemory):
        engine.step()
    for request_id in ("running", "prefilling", "queued"):
        final = engine.cancel(request_id)
        assert final is not None and final.finish_reason is FinishReason.CANCELLED
    assert not engine.has_unfinished() and engine.stats().kv_cache_tokens == 0
    engine.runner.decode = original
    engine.add_request(request("after", [6, 7, 8], max_new_tokens=4))
    assert run(engine)[0]["after"] == alone(model, [6, 7, 8], max_new_tokens=4)
