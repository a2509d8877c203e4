"""Property-based test of the rolling batch (hypothesis): batches of requests whose parameters take any value
the request schema lets through (extremes included: top_k far past the vocabulary, temperatures near 0 and
100, tiny top_p, the strongest penalties, the largest seeds, stop token ids, prompt scoring) never make a step
raise, and every request finishes with a finish reason, on both step paths: separate prefill and decode
passes (AutoTP) and one ragged pass (FastGen's, over the stand-in of tests/support/ragged_engine.py).

The HTTP fuzz (tests/integration/test_api_fuzz.py) found the first of these: a top_k of 2**70 passed
validation and overflowed int64 in the sampler, failing every request of the batch and stopping the server."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from handlers.engine import FinishReason, GenerationRequest, SamplingParams
from handlers.fastgen_runner import FastGenRunner
from handlers.kv_blocks import BlockAllocator, KVBudget
from handlers.rolling_batch import RollingBatchEngine
from tests.support.engines import make_engine
from tests.support.ragged_engine import ReferenceRaggedEngine
from tests.support.engines import STEP_ORDERS, step_order_fixture

VOCAB = 64


@pytest.fixture(autouse=True, params=STEP_ORDERS)
def step_order(request, monkeypatch):
    return step_order_fixture(request, monkeypatch)


class Tokenizer:
    eos_token_id = 3
    all_special_ids = [3]

    def __len__(self):
        return VOCAB

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids if not (skip_special_tokens and i == 3))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


params = st.fixed_dictionaries({"max_new_tokens": st.integers(0, 6)}, optional={
    "temperature": st.one_of(st.floats(0.0, 100.0), st.sampled_from([0.0, 1e-300, 1e-5, 100.0])),
    "top_k": st.one_of(st.integers(0, 2**80), st.sampled_from([1, VOCAB - 1, VOCAB, VOCAB + 1, 2**63, 2**70])),
    "top_p": st.one_of(st.floats(1e-9, 1.0), st.sampled_from([1e-9, 1.0])),
    "repetition_penalty": st.one_of(st.floats(1e-3, 10.0), st.sampled_from([1e-3, 10.0])),
    "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "do_sample": st.booleans(),
    "seed": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3).map(tuple),
    "stop_sequences": st.lists(st.text("abc", min_size=1, max_size=3), max_size=2).map(tuple),
    "ignore_eos": st.booleans(),
    "top_n_tokens": st.integers(0, 20),
    "prompt_logprobs": st.booleans(),
})
batches = st.lists(st.tuples(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40), params),
                   min_size=1, max_size=6)


def ragged_engine(model):
    budget = KVBudget(block_size=64, num_blocks=16, bytes_per_token=1, basis="test")
    stand_in = ReferenceRaggedEngine(model, num_blocks=16, max_tokens_per_put=32 + 4, max_sequences=4)
    return RollingBatchEngine(FastGenRunner(stand_in, "cpu"), Tokenizer(), allocator=BlockAllocator(budget),
                              max_batch=4, max_prefill_tokens=32, max_total_tokens=256, eos_token_ids=(3,))


@pytest.mark.parametrize("path", ["separate passes", "ragged pass"])
# The same examples every run (a red CI must be reproducible); LMI_FUZZ_EXAMPLES=N hunts with N fresh ones.
@settings(max_examples=int(os.environ.get("LMI_FUZZ_EXAMPLES", "25")), deadline=None,
          suppress_health_check=list(HealthCheck), database=None, derandomize="LMI_FUZZ_EXAMPLES" not in os.environ)
@given(batch=batches)
def test_no_parameter_values_the_schema_accepts_break_a_step(model, path, batch):
    engine = ragged_engine(model) if path == "ragged pass" else make_engine(model, Tokenizer(), max_batch=4,
                                                                             prefill=32, eos=(3,))
    for index, (prompt, values) in enumerate(batch):
        engine.add_request(GenerationRequest(str(index), "", prompt, SamplingParams(**values)))
    finals = {}
    for _ in range(500):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert sorted(finals) == sorted(str(i) for i in range(len(batch)))
    for request_id, final in finals.items():
        assert final.finish_reason is not None
        # the only errors allowed are a row's own non-finite logits, never a crash of its batch-mates
        assert final.finish_reason is not FinishReason.ERROR or "not finite" in (final.error or ""), final.error
