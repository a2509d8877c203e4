"""The FastGen engine's CPU-testable half: `FastGenRunner` and the rolling batch's ragged step (decode tokens
and prefill chunks in one put, Dynamic SplitFuse) over a stand-in for DeepSpeed's ragged engine that keeps
DeepSpeed's contract and limits (tests/support/ragged_engine.py), on a tiny random Llama.

The random initialisation (initializer_range 0.3) makes logits peaked, so greedy decoding has no near-ties
and token equality with HF `generate` is a meaningful check of the bookkeeping (positions, uids, flushes)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from handlers.engine import FinishReason, GenerationRequest, SamplingParams
from handlers.fastgen_runner import FastGenRunner
from handlers.kv_blocks import BlockAllocator, KVBudget
from handlers.rolling_batch import RollingBatchEngine
from tests.support.ragged_engine import ReferenceRaggedEngine
from tests.support.engines import STEP_ORDERS, step_order_fixture

VOCAB = 96
BLOCK = 64


@pytest.fixture(autouse=True, params=STEP_ORDERS)
def step_order(request, monkeypatch):
    return step_order_fixture(request, monkeypatch)


class Tokenizer:
    eos_token_id = None
    all_special_ids: list[int] = []

    def __len__(self):
        return VOCAB

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, initializer_range=0.3)
    return LlamaForCausalLM(config).eval()


def make(model, *, max_batch=4, prefill=32, num_blocks=64, max_total=512):
    ragged = ReferenceRaggedEngine(model, num_blocks=num_blocks, block_size=BLOCK,
                                   max_tokens_per_put=prefill + max_batch, max_sequences=max_batch)
    budget = KVBudget(block_size=BLOCK, num_blocks=num_blocks, bytes_per_token=1, basis="test")
    engine = RollingBatchEngine(FastGenRunner(ragged, "cpu"), Tokenizer(), allocator=BlockAllocator(budget),
                                max_batch=max_batch, max_prefill_tokens=prefill, max_total_tokens=max_total,
                                eos_token_ids=(), name="fastgen")
    return engine, ragged


def request(rid, prompt, **params):
    return GenerationRequest(str(rid), "", list(prompt), SamplingParams(**params))


def run(engine, max_steps=5000):
    tokens, finals = {}, {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(t.id for t in out.tokens)
            if out.finished:
                finals[out.request_id] = out
    return tokens, finals


def hf_greedy(model, prompt, n):
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(n, seed=1, low=3, high=90):
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randrange(low, high))] for _ in range(n)]


def test_ragged_batches_give_hf_generates_greedy_tokens_and_fuse_decode_with_prefill(model):
    engine, ragged = make(model, max_batch=4, prefill=32)  # prompts up to 90 tokens: chunked over steps
    lengths = [5, 17, 1, 30, 9, 12]
    ps = prompts(len(lengths))
    for i, (p, n) in enumerate(zip(ps, lengths)):
        engine.add_request(request(i, p, max_new_tokens=n))
    tokens, finals = run(engine)
    for i, (p, n) in enumerate(zip(ps, lengths)):
        assert tokens[str(i)] == hf_greedy(model, p, n), f"request {i}"
        assert finals[str(i)].finish_reason is FinishReason.LENGTH
    # Dynamic SplitFuse: some put carried decode tokens (1 each) and a prefill chunk (>1) together
    assert any(1 in sizes and max(sizes) > 1 for _, sizes in ragged.puts)
    assert max(sum(sizes) for _, sizes in ragged.puts) <= 32 + 4
    # every finished request's state was flushed from the engine, and its KV blocks are free again
    assert ragged.seen == {} and int(ragged.free_blocks[0]) == 64
    assert engine.stats().kv_cache_tokens == 0


def test_admission_by_blocks_never_lets_deepspeeds_cache_run_out(model):
    """Eight requests of 200 prompt + 56 new tokens (4 blocks each) into a 9-block cache: at most two fit
    at once; the rest wait in the queue, and DeepSpeed's lazy allocation never runs short."""
    engine, ragged = make(model, max_batch=8, prefill=256, num_blocks=9)
    ps = prompts(8, seed=3, low=200, high=201)
    for i, p in enumerate(ps):
        engine.add_request(request(i, p, max_new_tokens=56, ignore_eos=True))
    peak = 0
    finished = 0
    while engine.has_unfinished():
        outputs = engine.step()  # ReferenceRaggedEngine raises OutOfKVBlocks if admission over-commits
        peak = max(peak, len(ragged.seen))
        finished += sum(out.finished for out in outputs)
    assert finished == 8 and peak == 2
    assert int(ragged.free_blocks[0]) == 9


def test_cancel_flushes_the_sequence_and_its_batch_mates_are_unaffected(model, step_order):
    engine, ragged = make(model, max_batch=4)
    ps = prompts(3, seed=5)
    for i, p in enumerate(ps):
        engine.add_request(request(i, p, max_new_tokens=20))
    for _ in range(8):
        engine.step()
    cancelled_uid = engine.sequence_of("1")
    final = engine.cancel("1")
    assert final.finished and final.finish_reason is FinishReason.CANCELLED
    if step_order == "overlapped":  # the sequence is in the put on the device: flushed once it is read back
        assert cancelled_uid not in ragged.flushed
        assert all(out.request_id != "1" for out in engine.step())
    assert cancelled_uid in ragged.flushed and cancelled_uid not in ragged.seen
    tokens, _ = run(engine)
    for i in (0, 2):
        produced = tokens[str(i)]
        assert produced == hf_greedy(model, ps[i], 20)[-len(produced):]


def test_prompt_log_probabilities_match_the_full_forward(model):
    engine, _ = make(model, max_batch=2, prefill=32)
    prompt = prompts(1, seed=7, low=40, high=41)[0]
    engine.add_request(request("p", prompt, max_new_tokens=2, prompt_logprobs=True))
    engine.add_request(request("q", prompts(1, seed=8)[0], max_new_tokens=5))  # batch-mate, no prompt scores
    details = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == "p":
                details.extend(out.prompt_token_details)
    with torch.inference_mode():
        reference = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0].float(), dim=-1)
    expected = [reference[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    got = [token.log_prob for token in details[1:]]
    assert [token.id for token in details] == prompt
    # the stand-in returns fp16 logits, as DeepSpeed does: log-probabilities within fp16 rounding
    assert got == pytest.approx(expected, abs=2e-2)


def test_seeded_sampling_is_the_same_alone_and_in_a_ragged_batch(model):
    prompt = prompts(1, seed=9)[0]
    params = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.9, seed=1234)
    alone, _ = make(model, max_batch=1)
    alone.add_request(request("s", prompt, **params))
    batched, _ = make(model, max_batch=4, prefill=16)
    for i, p in enumerate(prompts(3, seed=10)):
        batched.add_request(request(i, p, max_new_tokens=15, do_sample=True, temperature=1.0))
    batched.add_request(request("s", prompt, **params))
    assert run(alone)[0]["s"] == run(batched)[0]["s"]


# ---- attention atoms: DeepSpeed's buffer sized for every step the scheduler can build ----------------------
def test_q_block_size_follows_deepspeeds_choice_per_head_size_and_device():
    from handlers.fastgen_model import FastGenUnsupported, q_block_size

    assert q_block_size(64, (9, 0)) == 128 and q_block_size(64, (8, 6)) == 128
    assert q_block_size(128, (9, 0)) == 128 and q_block_size(128, (8, 0)) == 128  # H100/H200, A100
    assert q_block_size(128, (8, 9)) == 64 and q_block_size(256, (9, 0)) == 64  # L40S; large heads
    with pytest.raises(FastGenUnsupported, match="compute capability 8.0 or newer, not 7.5"):
        q_block_size(128, (7, 5))


def _scheduler_steps(max_sequences, budget):
    """Every step shape the rolling batch can build: r running sequences put one token each, p prefilling
    sequences put chunks of at least one token whose sum is within the budget (r + p <= max_sequences)."""
    def chunks(p, left):
        if p == 0:
            yield []
            return
        for first in range(1, left - p + 2):
            for rest in chunks(p - 1, left - first):
                yield [first] + rest
    for r in range(max_sequences + 1):
        for p in range(max_sequences - r + 1):
            for prefill in chunks(p, budget):
                yield [1] * r + prefill


@pytest.mark.parametrize("max_sequences, budget, q", [(3, 10, 4), (2, 9, 4), (4, 8, 3), (1, 5, 2), (3, 7, 8)])
def test_attention_atoms_is_the_most_any_scheduler_step_needs(max_sequences, budget, q):
    from handlers.fastgen_model import atoms_needed, attention_atoms

    needed = max(atoms_needed(step, q) for step in _scheduler_steps(max_sequences, budget))
    assert attention_atoms(max_sequences, budget, q) == needed
    # the server's defaults on an H200 (64 sequences, 4,096 prefill tokens, 128-token atoms): 95, not 64
    assert attention_atoms(64, 4096, 128) == 95


def test_deepspeeds_state_manager_gets_room_for_the_atoms_and_passes_its_own_validator():
    pytest.importorskip("deepspeed")
    from deepspeed.inference.v2.ragged.manager_configs import DSStateManagerConfig

    from handlers.fastgen_model import EngineLimits

    limits = EngineLimits(max_sequences=64, max_prefill_tokens=4096, max_context=8192, reserve_bytes=2**30)
    config = limits.state_manager(128)
    assert config["max_ragged_sequence_count"] == 95 and config["max_ragged_batch_size"] == 4096 + 64
    DSStateManagerConfig(**config)  # its validator: count <= tracked sequences and <= batch size
    tiny = EngineLimits(max_sequences=8, max_prefill_tokens=1, max_context=64, reserve_bytes=1, kv_blocks=16)
    assert tiny.state_manager(128)["memory_config"] == {"mode": "allocate", "size": 16}
    DSStateManagerConfig(**tiny.state_manager(128))


def test_the_runner_refuses_a_put_deepspeed_would_compute_wrongly(model):
    from handlers.fastgen_model import AtomRoom

    ragged = ReferenceRaggedEngine(model, num_blocks=64, max_tokens_per_put=64, max_sequences=4, q_block=8)
    runner = FastGenRunner(ragged, "cpu", AtomRoom(atoms=5, q_block=8))
    runner.ragged_forward([0, 1], [[1] * 32, [2]])  # 4 + 1 atoms: exactly the room
    with pytest.raises(RuntimeError, match="needs 6 attention atoms of 8 tokens; DeepSpeed's buffer holds 5"):
        runner.ragged_forward([2, 3], [[1] * 33, [2]])
    assert ragged.atoms == [5]  # the refused put never reached the engine


def test_a_step_that_exactly_fills_the_atom_buffer_is_correct_and_one_short_is_not(model):
    """Three running requests decode while a long prompt arrives: the step of 3 decodes and a full 32-token
    chunk needs 3 + 32/8 = 7 atoms, exactly `attention_atoms(4, 32, 8)`; longer prompts are split over steps
    by the prefill budget, so no step needs more. With the buffer one atom short (DeepSpeed computing the
    last sequence without attention, as the stand-in emulates) the long request's text changes."""
    from handlers.fastgen_model import attention_atoms

    room = attention_atoms(4, 32, 8)
    assert room == 7
    short = prompts(3, seed=11, low=4, high=8)
    long = prompts(1, seed=12, low=100, high=101)[0]

    def serve(max_atoms):
        ragged = ReferenceRaggedEngine(model, num_blocks=64, block_size=BLOCK, max_tokens_per_put=36, max_sequences=4,
                                       q_block=8, max_atoms=max_atoms)
        budget = KVBudget(block_size=BLOCK, num_blocks=64, bytes_per_token=1, basis="test")
        engine = RollingBatchEngine(FastGenRunner(ragged, "cpu"), Tokenizer(), allocator=BlockAllocator(budget),
                                    max_batch=4, max_prefill_tokens=32, max_total_tokens=512, eos_token_ids=(),
                                    name="fastgen")
        for i, p in enumerate(short):
            engine.add_request(request(i, p, max_new_tokens=30))
        first = {out.request_id: [t.id for t in out.tokens] for out in engine.step()}  # the three prefill together
        engine.add_request(request("long", long, max_new_tokens=8))
        tokens = run(engine)[0]
        return {rid: first.get(rid, []) + ids for rid, ids in tokens.items()}, ragged

    tokens, ragged = serve(room)
    assert max(ragged.atoms) == room and ragged.puts[1] == ([0, 1, 2, 3], [1, 1, 1, 32])
    assert all(atoms <= room for atoms in ragged.atoms)
    assert tokens["long"] == hf_greedy(model, long, 8)
    for i, p in enumerate(short):
        assert tokens[str(i)] == hf_greedy(model, p, 30)
    tokens, _ = serve(room - 1)
    assert tokens["long"] != hf_greedy(model, long, 8)


def test_split_prefill_budget_is_first_come_first_served():
    from handlers.scheduler import split_prefill_budget

    assert split_prefill_budget([10, 20, 30], 35) == [10, 20, 5]
    assert split_prefill_budget([100], 32) == [32]
    assert split_prefill_budget([3, 4], 100) == [3, 4]
    assert split_prefill_budget([5, 6], 5) == [5]
    assert split_prefill_budget([], 8) == []


class DeferredCopies:
    """DeepSpeed's put() as the GPU runs it: the batch's inputs sit in one pinned host buffer until the device
    copies them, which happens only when the stream gets there (here: when the fence of the put is waited on,
    or when the logits are read). A put that refills the buffer first makes the earlier pass compute on the
    new inputs, which this records."""

    def __init__(self, ragged):
        self.ragged = ragged
        self.buffer = None  # the host buffer every put fills
        self.pending = None  # the put whose copy has not run yet
        self.corrupted = 0

    def put(self, uids, tokens, do_checks=True):
        if self.pending is not None:
            self.corrupted += 1  # the previous pass's inputs are overwritten before they were copied
            self.pending = None
        self.buffer = (list(uids), [t.clone() for t in tokens])
        self.pending = self.buffer
        return self.ragged.put(uids, tokens, do_checks=do_checks)

    def flush(self, uid):
        self.ragged.flush(uid)

    def fence(self):
        copies = self

        class Fence:
            def synchronize(self):
                copies.pending = None  # the stream has passed the copy

        return Fence()


def test_a_put_waits_until_the_previous_puts_inputs_are_copied_before_it_refills_deepspeeds_host_buffer(model):
    """A prompt prefilled over several steps issues puts without reading anything in between: each must wait
    for the previous one's inputs to reach the device (measured on an H200: without the wait, 130-240x HF
    fp16's deviation on long prompts prefilled alone)."""
    ragged = ReferenceRaggedEngine(model, num_blocks=64, block_size=BLOCK, max_tokens_per_put=36, max_sequences=4)
    device = DeferredCopies(ragged)
    runner = FastGenRunner(device, "cpu", fence=device.fence)
    prompt = prompts(1, seed=9, low=100, high=101)[0]
    for start in range(0, len(prompt), 32):
        runner.ragged_forward([0], [prompt[start:start + 32]])
    assert device.corrupted == 0
    unguarded = DeferredCopies(ReferenceRaggedEngine(model, num_blocks=64, block_size=BLOCK, max_tokens_per_put=36,
                                                     max_sequences=4))
    runner = FastGenRunner(unguarded, "cpu")  # on a CPU no fence is needed: this shows what the fence prevents
    for start in range(0, len(prompt), 32):
        runner.ragged_forward([0], [prompt[start:start + 32]])
    assert unguarded.corrupted == 3
