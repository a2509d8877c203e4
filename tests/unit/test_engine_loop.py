"""EngineLoop: one thread drives the engine; every admitted request gets exactly one final output."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid

import pytest

from handlers.engine import EngineOutOfMemory, FinishReason, GenerationRequest, RequestOutput, SamplingParams
from handlers.engine_loop import EngineLoop, EngineUnavailable, ErrorKind, QueueFull, error_kind
from tests.support.fake_engine import FakeEngine, expected_text


def make_request(prompt: str = "hello", **params) -> GenerationRequest:
    return GenerationRequest(uuid.uuid4().hex, prompt, [ord(c) for c in prompt], SamplingParams(**params))


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.002)


class Recorder:
    """A sink that records outputs and signals the final one."""

    def __init__(self, engine: FakeEngine | None = None) -> None:
        self.engine = engine
        self.outputs: list[RequestOutput] = []
        self.steps: list[int] = []  # the engine step that produced each output
        self.done = threading.Event()

    def __call__(self, output: RequestOutput) -> None:
        self.outputs.append(output)
        self.steps.append(self.engine.steps if self.engine else 0)
        if output.finished:
            self.done.set()

    @property
    def final(self) -> RequestOutput:
        assert self.done.wait(5), "no final output"
        return self.outputs[-1]

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)


@pytest.fixture
def started():
    loops: list[EngineLoop] = []

    def start(engine: FakeEngine, **kwargs) -> EngineLoop:
        loop = EngineLoop(engine, **kwargs).start()
        loops.append(loop)
        return loop

    yield start
    for loop in loops:
        loop.stop()


def test_stream_yields_outputs_until_finished(started):
    engine = FakeEngine()
    loop = started(engine)

    async def run() -> list[RequestOutput]:
        return [output async for output in loop.stream(make_request(max_new_tokens=5))]

    outputs = asyncio.run(run())
    assert "".join(o.text for o in outputs) == expected_text(5)
    assert [o.finished for o in outputs] == [False] * 4 + [True]
    assert outputs[-1].finish_reason is FinishReason.LENGTH and error_kind(outputs[-1]) is None
    assert engine.step_threads == {"engine-loop"}  # the engine is only ever called from the loop thread
    assert loop.stats().admitted == 0


def test_generate_is_the_blocking_api(started):
    loop = started(FakeEngine())
    results = loop.generate([make_request(max_new_tokens=n) for n in (1, 3, 7)])
    assert ["".join(o.text for o in outs) for outs in results] == [expected_text(n) for n in (1, 3, 7)]
    assert all(outs[-1].finished and sum(o.finished for o in outs) == 1 for outs in results)


def test_idle_loop_waits_instead_of_stepping(started):
    engine = FakeEngine()
    started(engine)
    time.sleep(0.2)
    assert engine.steps == 0


def test_cancel_frees_the_batch_slot_within_a_step(started):
    engine = FakeEngine(max_batch=1, step_delay=0.005)
    loop = started(engine)
    long, short = make_request(max_new_tokens=3000), make_request(max_new_tokens=3)
    long_sink, short_sink = Recorder(engine), Recorder(engine)
    loop.submit(long, long_sink)
    loop.submit(short, short_sink)
    wait_until(lambda: len(long_sink.outputs) >= 3)
    assert engine.running_ids == [long.request_id] and not short_sink.outputs  # the slot is taken

    steps_at_cancel = engine.steps
    loop.cancel(long.request_id)
    assert long_sink.final.finish_reason is FinishReason.CANCELLED
    wait_until(lambda: bool(short_sink.outputs))
    # The cancel is applied before the next step, and that step admits the waiting request (one more step
    # of slack: the step running while cancel() was called finishes first).
    assert short_sink.steps[0] - steps_at_cancel <= 2
    assert engine.cancelled == [long.request_id]
    assert short_sink.final.finish_reason is FinishReason.LENGTH


def test_closing_the_async_stream_cancels_the_request(started):
    engine = FakeEngine(step_delay=0.005)
    loop = started(engine)
    request = make_request(max_new_tokens=3000)

    async def client_goes_away() -> None:
        stream = loop.stream(request)

        async def consume() -> None:
            async for _ in stream:
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        task.cancel()  # what a client disconnect does to the handler
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(client_goes_away())
    wait_until(lambda: engine.cancelled == [request.request_id])
    wait_until(lambda: loop.stats().admitted == 0)


def test_engine_crash_fails_every_request_and_marks_the_loop_unhealthy(started, caplog):
    engine = FakeEngine(fail_at_step=3, step_delay=0.002)
    loop = started(engine)
    sinks = [Recorder() for _ in range(3)]
    with caplog.at_level(logging.ERROR, logger="lmi.engine_loop"):
        for sink in sinks:
            loop.submit(make_request(max_new_tokens=100), sink)
        finals = [sink.final for sink in sinks]
    for final in finals:
        assert error_kind(final) is ErrorKind.ENGINE_FAILED
        assert final.finish_reason is FinishReason.ERROR
        assert "fake engine crashed at step 3" in final.error
    health = loop.health()
    assert not health.healthy and "fake engine crashed at step 3" in health.detail
    with pytest.raises(EngineUnavailable, match="engine failed"):
        loop.submit(make_request(), Recorder())
    tracebacks = [r for r in caplog.records if r.name == "lmi.engine_loop" and r.exc_info]
    assert len(tracebacks) == 1  # logged once, not once per request
    assert loop.stats().admitted == 0


def test_out_of_memory_fails_the_active_requests_with_their_own_kind(started):
    engine = FakeEngine(oom_at_step=2)
    loop = started(engine)
    sinks = [Recorder() for _ in range(2)]
    loop.submit_many([(make_request(max_new_tokens=50), sink) for sink in sinks])
    for sink in sinks:
        assert error_kind(sink.final) is ErrorKind.OUT_OF_MEMORY
        assert "out of memory" in sink.final.error
    # OOM is not a crash: the loop keeps serving.
    assert loop.health().healthy
    assert loop.generate([make_request(max_new_tokens=2)])[0][-1].finish_reason is FinishReason.LENGTH


def test_out_of_memory_naming_requests_spares_the_others(started):
    engine = FakeEngine()
    loop = started(engine)
    victim, bystander = Recorder(), Recorder()
    loop.submit(make_request("[oom] big", max_new_tokens=5), victim)
    loop.submit(make_request("small", max_new_tokens=5), bystander)
    assert error_kind(victim.final) is ErrorKind.OUT_OF_MEMORY
    assert bystander.final.finish_reason is FinishReason.LENGTH and bystander.text == expected_text(5)


def test_admission_limit_raises_queue_full(started):
    engine = FakeEngine(step_delay=0.005)
    loop = started(engine, job_queue_size=2)
    held = [make_request(max_new_tokens=3000) for _ in range(2)]
    loop.submit_many([(request, Recorder()) for request in held])
    with pytest.raises(QueueFull) as raised:
        loop.submit(make_request(), Recorder())
    assert raised.value.retry_after > 0 and "job_queue_size=2" in str(raised.value)
    assert loop.stats().admitted == 2
    for request in held:
        loop.cancel(request.request_id)
    wait_until(lambda: loop.stats().admitted == 0)
    loop.submit(make_request(max_new_tokens=1), Recorder())  # room again


def test_a_batch_is_admitted_all_or_none(started):
    loop = started(FakeEngine(step_delay=0.005), job_queue_size=2)
    with pytest.raises(QueueFull):
        loop.submit_many([(make_request(), Recorder()) for _ in range(3)])
    assert loop.stats().admitted == 0


def test_capacity_returns_after_requests_finish(started):
    loop = started(FakeEngine(), job_queue_size=1)
    for _ in range(3):  # one at a time always fits
        assert loop.generate([make_request(max_new_tokens=2)])[0][-1].finished
    assert loop.stats().admitted == 0


def test_predict_timeout_cancels_with_an_error(started):
    engine = FakeEngine(step_delay=0.005)
    loop = started(engine, predict_timeout=0.1)
    sink = Recorder()
    request = make_request(max_new_tokens=3000)
    started_at = time.monotonic()
    loop.submit(request, sink)
    final = sink.final
    assert time.monotonic() - started_at < 2
    assert error_kind(final) is ErrorKind.TIMEOUT and final.finish_reason is FinishReason.CANCELLED
    assert "predict_timeout=0.1 s" in final.error
    assert engine.cancelled == [request.request_id]
    assert loop.health().healthy


def test_invalid_request_reaching_the_engine_fails_only_itself(started):
    loop = started(FakeEngine(max_total_tokens=16))
    bad, good = Recorder(), Recorder()
    loop.submit(make_request("x" * 20, max_new_tokens=1), bad)  # skipped validation on purpose
    loop.submit(make_request(max_new_tokens=2), good)
    assert error_kind(bad.final) is ErrorKind.INVALID and "exceeds the limit of 16 tokens" in bad.final.error
    assert good.final.finish_reason is FinishReason.LENGTH


def test_a_failing_sink_does_not_stop_the_loop(started):
    engine = FakeEngine()
    loop = started(engine)

    def broken(output: RequestOutput) -> None:
        raise RuntimeError("consumer bug")

    request = make_request(max_new_tokens=100)
    loop.submit(request, broken)
    wait_until(lambda: engine.cancelled == [request.request_id])
    assert loop.generate([make_request(max_new_tokens=2)])[0][-1].finish_reason is FinishReason.LENGTH
    assert loop.stats().admitted == 0


def test_stop_finishes_active_requests_and_shuts_the_engine_down():
    engine = FakeEngine(step_delay=0.005)
    loop = EngineLoop(engine).start()
    sink = Recorder()
    loop.submit(make_request(max_new_tokens=3000), sink)
    wait_until(lambda: bool(sink.outputs))
    loop.stop()
    assert error_kind(sink.final) is ErrorKind.SHUTDOWN and sink.final.error == "server shutting down"
    assert engine.shut_down
    assert not loop.running
    with pytest.raises(EngineUnavailable, match="shutting down"):
        loop.submit(make_request(), Recorder())


def test_submit_before_start_is_refused():
    loop = EngineLoop(FakeEngine())
    with pytest.raises(EngineUnavailable, match="not started"):
        loop.submit(make_request(), Recorder())
    assert not loop.health().healthy


def test_engine_out_of_memory_at_admission(started):
    class OomOnAdd(FakeEngine):
        def add_request(self, request):
            raise EngineOutOfMemory("no room for the prompt")

    loop = started(OomOnAdd())
    sink = Recorder()
    loop.submit(make_request(), sink)
    assert error_kind(sink.final) is ErrorKind.OUT_OF_MEMORY and "no room" in sink.final.error


def test_unexpected_engine_error_outside_step_still_finishes_every_request(started):
    class BrokenAdd(FakeEngine):
        def add_request(self, request):
            raise RuntimeError("engine bug in add_request")

    loop = started(BrokenAdd())
    sinks = [Recorder() for _ in range(3)]
    loop.submit_many([(make_request(), sink) for sink in sinks])  # one command batch: two wait in the inbox
    for sink in sinks:
        assert error_kind(sink.final) is ErrorKind.ENGINE_FAILED and "engine bug in add_request" in sink.final.error
    assert not loop.health().healthy
    assert loop.stats().admitted == 0


def test_stats_report_admission_and_the_engine_batch(started):
    engine = FakeEngine(max_batch=1, step_delay=0.005)
    loop = started(engine)
    held = [make_request(max_new_tokens=3000) for _ in range(2)]
    loop.submit_many([(request, Recorder()) for request in held])
    wait_until(lambda: loop.stats().running == 1 and loop.stats().waiting == 1)
    stats = loop.stats()
    assert stats.admitted == 2 and stats.active == 2 and stats.healthy and stats.steps > 0
