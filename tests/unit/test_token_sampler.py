"""The batched sampler against transformers' own logits processors (the reference semantics), per row with
different parameters in one batch; seeds; failures that stay in their row."""

from __future__ import annotations

import collections

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from handlers.engine import SamplingParams
from handlers.token_sampler import CPU_TOP_P_CANDIDATES, SequenceSampling, TokenSampler

# The same tests on the GPU (the sampler runs on the logits' device); skipped, and reported so, without one.
DEVICES = [pytest.param("cpu"),
           pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="needs a CUDA GPU")])]


def state(prompt, generated=(), **params):
    s = SequenceSampling.create(SamplingParams(**params), list(prompt))
    s.history.extend(generated)
    return s


def hf_processed(logits_row, s: SequenceSampling):
    """transformers' processors applied to one row, in generate's order."""
    p = s.params
    scores = logits_row.view(1, -1).clone()
    ids = torch.tensor([s.history])
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
    generated = torch.tensor(s.history[s.prompt_length:], dtype=torch.long)
    counts = torch.bincount(generated, minlength=scores.shape[-1]).to(scores.dtype)
    scores = scores - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(scores.dtype)
    if p.do_sample:
        scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
        if p.top_k:
            scores = TopKLogitsWarper(p.top_k)(ids, scores)
        if p.top_p < 1.0:
            scores = TopPLogitsWarper(p.top_p)(ids, scores)
    return scores[0]


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_match_transformers_and_openai_definitions_row_by_row(device):
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    states = [
        state([1, 2, 3, 3], [7, 7, 9], repetition_penalty=1.3),
        state([4, 5], [5, 6, 6, 6], presence_penalty=0.7, frequency_penalty=0.4),
        state([8], [1, 2], repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=1.5),
        state([9, 9], [3]),  # no penalty: untouched
    ]
    sampler = TokenSampler(max_sequences=8, max_length=64)
    processed = sampler._penalize(logits.to(device), states).cpu()
    for row, s in enumerate(states):
        torch.testing.assert_close(processed[row], hf_processed(logits[row], s), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
# On a CPU, top-p rows look at CPU_TOP_P_CANDIDATES tokens first, then 8x as many, then the sorted
# vocabulary: 1024 (flat rows) reaches the full sort, 8192 (scale 2.0) stops at the 8x candidates.
@pytest.mark.parametrize("vocab", [24, 4 * CPU_TOP_P_CANDIDATES, 32 * CPU_TOP_P_CANDIDATES])
def test_draws_follow_transformers_distribution_per_row(vocab, device):
    """Rows with different temperature/top-k/top-p in one batch: every draw lies in the set HF's warpers
    keep, and the empirical frequencies match HF's probabilities."""
    torch.manual_seed(1)
    base = torch.randn(4, vocab) * {24: 2.0, 1024: 0.3}.get(vocab, 2.0)  # 8192: row 2 nucleus of 1021 tokens
    params = [dict(do_sample=True, temperature=0.7),
              dict(do_sample=True, temperature=1.3, top_k=5),
              dict(do_sample=True, top_p=0.8),
              dict(do_sample=True, temperature=0.9, top_k=12, top_p=0.6)]
    draws = 3000 if vocab <= 1024 else 1000  # [4 x draws, vocab] logits in one batch
    counts = [collections.Counter() for _ in params]
    sampler = TokenSampler(max_sequences=8, max_length=16)
    # one batch of 4 x draws rows: row r of the logits, with its parameters, under `draws` different seeds
    states = [state([0], seed=seed, **params[row]) for row in range(len(params)) for seed in range(draws)]
    choices = sampler.sample(base.repeat_interleave(draws, dim=0).to(device), states)
    for index, choice in enumerate(choices):
        assert choice.error is None
        counts[index // draws][choice.token_id] += 1
    for row, p in enumerate(params):
        reference = torch.softmax(hf_processed(base[row], state([0], **p)), dim=-1)
        allowed = set(torch.nonzero(reference > 0).view(-1).tolist())
        assert set(counts[row]) <= allowed, f"row {row} drew tokens HF's warpers remove"
        empirical = torch.zeros(vocab)
        for token, n in counts[row].items():
            empirical[token] = n / draws
        if len(allowed) <= 64:
            total_variation = 0.5 * (empirical - reference).abs().sum().item()
            assert total_variation < 0.06, f"row {row}: TV distance {total_variation:.3f}"
        else:  # too many tokens for a histogram: the likeliest half of the mass gets its share of draws
            order = reference.argsort(descending=True)
            head = order[:int((reference[order].cumsum(0) <= 0.5).sum())]
            tolerance = 0.04 if draws >= 3000 else 0.06  # about 3 standard deviations of the draw
            assert abs(empirical[head].sum().item() - reference[head].sum().item()) < tolerance, f"row {row}"


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_tokens_whatever_the_batch(device):
    torch.manual_seed(2)
    logits = torch.randn(3, 40, device=device)
    params = dict(do_sample=True, temperature=1.0, top_p=0.9, seed=42)
    sampler = TokenSampler(max_sequences=8, max_length=64)

    def run(rows):
        target = state([0], **params)
        others = [state([0], do_sample=True, seed=i) for i in range(len(rows) - 1)]
        order = others[:]
        order.insert(rows.index(0), target)
        picked = []
        for _ in range(10):
            batch = torch.stack([logits[0] if s is target else logits[1 + i % 2] for i, s in enumerate(order)])
            picked.append(sampler.sample(batch, order)[order.index(target)].token_id)
        return picked

    assert run([0]) == run([1, 0, 2]) == run([2, 1, 0])
    other = state([0], **{**params, "seed": 43})
    assert [sampler.sample(logits[:1], [other])[0].token_id for _ in range(10)] != run([0])


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_row_fails_alone_and_tiny_temperature_is_greedy(device):
    logits = torch.randn(3, 30, device=device)
    logits[1] = float("nan")
    states = [state([0], do_sample=True, seed=1), state([0], do_sample=True, seed=2),
              state([0], do_sample=True, temperature=1e-300, seed=3)]
    choices = TokenSampler(8, 16).sample(logits, states)
    assert choices[0].error is None and 0 <= choices[0].token_id < 30
    assert choices[1].error is not None and "not finite" in choices[1].error
    assert choices[2].error is None and choices[2].token_id == int(logits[2].argmax())


def test_log_probs_are_the_models_and_alternatives_only_for_rows_that_ask():
    torch.manual_seed(3)
    logits = torch.randn(2, 30)
    states = [state([0], top_n_tokens=3), state([0], repetition_penalty=2.0)]
    choices = TokenSampler(8, 16).sample(logits, states)
    reference = torch.log_softmax(logits, dim=-1)
    for row, choice in enumerate(choices):
        assert choice.log_prob == pytest.approx(reference[row, choice.token_id].item(), abs=1e-5)
    values, ids = reference[0].topk(3)
    assert [i for i, _ in choices[0].top] == ids.tolist()
    assert [v for _, v in choices[0].top] == pytest.approx(values.tolist(), abs=1e-5)
    assert choices[1].top == ()


def test_history_rows_are_reused_after_release():
    sampler = TokenSampler(max_sequences=2, max_length=16)
    logits = torch.randn(1, 10)
    for _ in range(5):  # more penalised requests over time than rows
        s = state([1, 2], repetition_penalty=1.5)
        sampler.sample(logits, [s])
        sampler.release(s)
    assert len(sampler._histories.free) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_a_top_k_beyond_the_vocabulary_keeps_every_token(device):
    """Clients send any integer (a fuzzer found 2**70, which overflowed int64 and failed the whole batch):
    past the vocabulary it means no top-k, the same draws as top_k 0 with the same seed."""
    torch.manual_seed(3)
    logits = torch.randn(3, 40, device=device)
    huge = [state([0], do_sample=True, top_k=k, top_p=0.9, seed=7) for k in (2**70, 2**63, 41)]
    plain = [state([0], do_sample=True, top_k=0, top_p=0.9, seed=7) for _ in range(3)]
    sampler = TokenSampler(max_sequences=8, max_length=16)
    picked = sampler.sample(logits, huge)
    assert all(choice.error is None for choice in picked)
    assert [c.token_id for c in picked] == [c.token_id for c in TokenSampler(8, 16).sample(logits, plain)]
