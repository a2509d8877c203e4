"""The scheduler and the output processor on their own, as any engine drives them: step plans from admission
and the prefill budget, finishes a token id decides, slots given back only once the step holding them is read,
and an output processor fed a static batch's tokens directly (as kernel injection's batches would be)."""

from __future__ import annotations

import pytest

from handlers.engine import FinishReason, GenerationRequest, InvalidRequest, SamplingParams
from handlers.kv_blocks import BlockAllocator, KVBudget
from handlers.output_processor import OutputProcessor
from handlers.runner import Runner
from handlers.scheduler import ScheduledRequest, Scheduler
from handlers.step_events import StepEvent, TokenStops
from handlers.token_sampler import Choice, SequenceSampling


class SlotLog(Runner):
    """Records which sequence slots the scheduler assigns and releases (it runs no model)."""

    def __init__(self):
        self.device, self.cache = "cpu", None
        self.assigned: list[int] = []
        self.released: list[int] = []

    def assign(self, sequence, blocks):
        self.assigned.append(sequence)

    def release(self, sequence):
        self.released.append(sequence)

    def prefill(self, *args, **kwargs):
        raise AssertionError("the scheduler runs no model")

    def decode(self, *args, **kwargs):
        raise AssertionError("the scheduler runs no model")


class Words:
    """Token i decodes to "w<i> "; 0 is the end of sequence; "<end>" is a special token (id 1)."""

    all_special_ids = [0, 1]
    all_special_tokens = ["</s>", "<end>"]

    def __len__(self):
        return 50

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if (i in (0, 1) and skip_special_tokens) else f"w{i} " for i in ids)

    def convert_tokens_to_ids(self, text):
        return {"</s>": 0, "<end>": 1}[text]


def request(rid, prompt_length, **params):
    return GenerationRequest(str(rid), "", list(range(2, 2 + prompt_length)), SamplingParams(**params))


def scheduler(max_batch=4, budget=8, blocks=1024):
    runner = SlotLog()
    allocator = BlockAllocator(KVBudget(block_size=4, num_blocks=blocks, bytes_per_token=1, basis="test"))
    return Scheduler(runner, allocator, max_batch=max_batch, max_prefill_tokens=budget), runner, allocator


def track(sched, rid, prompt_length, **params):
    req = request(rid, prompt_length, **params)
    stops = TokenStops(frozenset(), frozenset({0}), req.params.max_new_tokens)
    entry = ScheduledRequest(req, SequenceSampling.create(req.params, req.prompt_token_ids), stops)
    sched.add(entry)
    return entry


def choice(token):
    return Choice(token, -0.5, ())


def test_a_plan_decodes_the_running_batch_then_fills_the_prefill_budget_first_come_first_served():
    sched, runner, _ = scheduler(budget=8)
    a, b, c = track(sched, "a", 5), track(sched, "b", 6), track(sched, "c", 3)
    plan = sched.schedule()
    assert plan.decodes == [] and [(r.request_id, n) for r, n in plan.chunks] == [("a", 5), ("b", 3)]
    rows, sampled = plan.sampling_rows()
    assert sampled == [a] and rows == [0]  # only a's prompt is complete after this step
    events = sched.update(plan, sampled, [choice(7)])
    assert [e.request_id for e in events] == ["a"] and a.generated == [7]
    plan = sched.schedule()
    assert plan.decodes == [a] and [(r.request_id, n) for r, n in plan.chunks] == [("b", 3), ("c", 3)]
    batch = plan.batch()
    assert batch.tokens[0] == [7] and batch.starts[0] == 5 and batch.decodes == 1
    assert batch.tokens[1] == b.prompt[3:6] and batch.starts[1] == 3


def test_token_ids_decide_stop_tokens_end_of_sequence_and_length_before_the_next_step():
    stops = TokenStops(frozenset({9}), frozenset({0}), max_new_tokens=3)
    assert stops.reason(9, 3) is FinishReason.STOP_SEQUENCE  # a stop token outranks the length
    assert stops.reason(0, 1) is FinishReason.EOS_TOKEN
    assert stops.reason(5, 3) is FinishReason.LENGTH
    assert stops.reason(5, 2) is None
    sched, runner, allocator = scheduler()
    a = track(sched, "a", 2, max_new_tokens=5)
    plan = sched.schedule()
    events = sched.update(plan, *plan.sampling_rows()[1:], [choice(0)])
    assert events[0].finish is FinishReason.EOS_TOKEN
    assert a.finished and runner.released == runner.assigned and allocator.used_blocks == 0
    assert sched.schedule().empty


def test_a_request_finished_while_its_step_is_on_the_device_keeps_its_slot_until_that_step_is_read():
    sched, runner, allocator = scheduler()
    a, b = track(sched, "a", 2, max_new_tokens=9), track(sched, "b", 2, max_new_tokens=9)
    plan = sched.schedule()
    sched.update(plan, plan.sampling_rows()[1], [choice(5), choice(6)])
    plan = sched.schedule()  # both decode: the step is "on the device"
    slot = a.sequence
    sched.finish(a)  # a cancel, or a stop sequence found in the previous step's text
    assert runner.released == [] and allocator.used_blocks > 0
    events = sched.update(plan, plan.sampling_rows()[1], [choice(7), choice(8)])
    assert [e.request_id for e in events] == ["b"]  # a's token of that step is dropped
    assert runner.released == [slot] and a.generated == [5]
    assert sched.schedule().decodes == [b]


def test_prompt_log_probability_chunks_go_in_a_pass_of_their_own_and_others_share_the_rest_of_the_budget():
    sched, _, _ = scheduler(budget=8)
    scored = track(sched, "s", 6, prompt_logprobs=True)
    track(sched, "o", 5)
    plan = sched.schedule()
    assert plan.scored == (scored, 6) and [(r.request_id, n) for r, n in plan.chunks] == [("o", 2)]


def test_the_output_processor_serves_a_static_batch_fed_directly():
    output = OutputProcessor(Words(), eos_token_ids=[0])
    stops_a = output.add(request("a", 3, max_new_tokens=4, stop_sequences=["w7"]))
    stops_b = output.add(request("b", 3, max_new_tokens=4, stop_sequences=["<end>"]))
    assert stops_b.stop_ids == {1} and stops_a.stop_ids == frozenset()  # a special-token stop ends by id
    step1 = output.process([StepEvent("a", choice(5), None, generated_tokens=1, prompt_tokens=3),
                            StepEvent("b", choice(6), None, generated_tokens=1, prompt_tokens=3)])
    assert [(o.request_id, o.text, o.finished) for o in step1.outputs] == [("a", "w5 ", False), ("b", "w6 ", False)]
    step2 = output.process([StepEvent("a", choice(7), None, generated_tokens=2, prompt_tokens=3),
                            StepEvent("b", choice(1), FinishReason.STOP_SEQUENCE, generated_tokens=2,
                                      prompt_tokens=3)])
    final_a, final_b = step2.outputs
    assert final_a.finished and final_a.finish_reason is FinishReason.STOP_SEQUENCE and final_a.text == ""
    assert final_b.finished and final_b.text == "" and final_b.tokens[0].special
    assert step2.stopped == ["a"]  # its scheduler still holds it: the stop was found in the text
    assert "a" not in output and "b" not in output


def test_stop_token_ids_outside_the_vocabulary_are_refused_naming_the_field():
    output = OutputProcessor(Words(), eos_token_ids=[0])
    with pytest.raises(InvalidRequest) as refused:
        output.add(request("a", 3, stop_token_ids=[50]))
    assert refused.value.field == "stop_token_ids" and "[50]" in str(refused.value)
    assert "a" not in output
