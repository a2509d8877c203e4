"""The HTTP app against the fake engine: routes, formats, and every row of the error table."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.live_app import uvicorn_serving, wait_for

from entrypoint.configuration import Configuration
from entrypoint.http.app import create_app
from entrypoint.http.state import ServerState
from handlers.serving_properties import ServingProperties
from handlers.engine_loop import EngineLoop
from tests.support.fake_engine import FakeEngine, expected_text


class Served:
    """An app, its state and (once ready) its engine loop; `request` / `gather` call it in-process."""

    def __init__(self, engine: FakeEngine | None = None, **properties: Any):
        self.properties = ServingProperties(model_id="org/fake-model", **properties)
        configuration = Configuration(properties=self.properties, sources={}, model_dir=Path("/nonexistent"))
        self.state = ServerState("fake-model", ("org/fake-model",))
        self.app = create_app(configuration, self.state)
        self.engine = engine
        self.loop: EngineLoop | None = None
        if engine is not None:
            self.loop = EngineLoop(engine, job_queue_size=self.properties.job_queue_size,
                                   predict_timeout=self.properties.predict_timeout).start()
            self.state.set_ready(self.loop)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test")

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def call() -> httpx.Response:
            async with self.client() as client:
                return await client.request(method, url, **kwargs)
        return asyncio.run(call())

    def post(self, body: Any, url: str = "/invocations", **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, json=body, **kwargs)

    def close(self) -> None:
        if self.loop is not None:
            self.loop.stop()


@pytest.fixture
def serve():
    served: list[Served] = []

    def make(engine: FakeEngine | None = None, **properties: Any) -> Served:
        s = Served(engine, **properties)
        served.append(s)
        return s

    yield make
    for s in served:
        s.close()


def assert_error(response: httpx.Response, status: int, error_type: str, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    # LMI's error shape: {"error", "code"} as LMI's handlers answer, {"code", "type", "message"} as DJL Serving's
    assert {"error", "code", "type", "message"} <= set(body) and body["error"] == body["message"]
    assert body["type"] == error_type and body["code"] == status
    for fragment in fragments:
        assert fragment in body["message"], body["message"]
    return body


def json_lines(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines() if line]


def sse_events(response: httpx.Response) -> list[dict]:
    events = [chunk for chunk in response.text.split("\n\n") if chunk]
    assert all(event.startswith("data: ") for event in events), response.text
    return [json.loads(event[len("data: "):]) for event in events]


# ---- /ping and /models ----------------------------------------------------------------------------------
def test_ping_while_loading_is_a_fast_503_with_progress(serve):
    served = serve()
    served.state.set_progress("loading shard 2/4")
    started = time.monotonic()
    response = served.request("GET", "/ping")
    assert time.monotonic() - started < 1
    body = assert_error(response, 503, "ModelNotReady", "loading shard 2/4")
    assert body["status"] == "loading" and body["progress"] == "loading shard 2/4"
    assert response.headers["Retry-After"]
    models = served.request("GET", "/models").json()
    assert models == {"models": [{"modelName": "fake-model", "status": "LOADING", "progress": "loading shard 2/4"}]}


def test_ping_ready_and_failed(serve):
    ready = serve(FakeEngine())
    assert ready.request("GET", "/ping").json() == {"status": "healthy"}
    assert ready.request("GET", "/models").json()["models"][0]["status"] == "READY"

    failed = serve()
    failed.state.set_failed("weights not found in /opt/ml/model")
    body = assert_error(failed.request("GET", "/ping"), 503, "ModelNotReady", "weights not found")
    assert body["status"] == "failed"
    assert failed.request("GET", "/models").json()["models"][0]["status"] == "FAILED"
    assert_error(failed.post({"inputs": "hi"}), 503, "ModelNotReady", "failed to load", "weights not found")


def test_ping_reports_an_engine_crash(serve):
    served = serve(FakeEngine(fail_at_step=1))
    assert_error(served.post({"inputs": "hi"}), 424, "GenerationError", "fake engine crashed")
    body = assert_error(served.request("GET", "/ping"), 503, "EngineUnavailable", "fake engine crashed")
    assert body["status"] == "unhealthy"
    assert_error(served.post({"inputs": "hi"}), 503, "EngineUnavailable", "engine failed")


def test_invocations_while_loading_is_503(serve):
    response = serve().post({"inputs": "hi"})
    assert_error(response, 503, "ModelNotReady", "still loading")
    assert response.headers["Retry-After"]


# ---- JSON responses ---------------------------------------------------------------------------------------
def test_generated_text(serve):
    response = serve(FakeEngine()).post({"inputs": "hello", "parameters": {"max_new_tokens": 5}})
    assert response.status_code == 200
    assert response.json() == {"generated_text": expected_text(5)}
    assert response.headers["X-Request-Id"]


def test_list_inputs_give_a_list(serve):
    response = serve(FakeEngine()).post({"inputs": ["a", "bb", "ccc"], "parameters": {"max_new_tokens": 3}})
    assert response.json() == [{"generated_text": expected_text(3)}] * 3


def test_details(serve):
    body = serve(FakeEngine(eos_at=4)).post({"inputs": "hi", "parameters": {"details": True}}).json()
    assert body["generated_text"] == expected_text(3)
    details = body["details"]
    assert details["finish_reason"] == "eos_token" and details["generated_tokens"] == 4
    # LMI's Token.as_dict: special_token only when true; details.inputs is the prompt
    assert details["tokens"][0] == {"id": ord("a"), "text": "a", "log_prob": -0.5}
    assert details["tokens"][-1]["special_token"] is True and details["inputs"] == "hi"


def test_return_full_text_and_stop_alias(serve):
    served = serve(FakeEngine())
    parameters = {"return_full_text": True, "stop": ["de"], "details": True}
    body = served.post({"inputs": "Q:", "parameters": parameters}).json()
    assert body["generated_text"] == "Q:abc"
    assert body["details"]["finish_reason"] == "stop_sequence"


def test_predictions_route_by_model_name(serve):
    served = serve(FakeEngine())
    for name in ("fake-model", "org/fake-model"):
        response = served.post({"inputs": "x", "parameters": {"max_new_tokens": 2}}, url=f"/predictions/{name}")
        assert response.json() == {"generated_text": expected_text(2)}


def test_a_hugging_face_tokenizer_is_enough(serve, caplog):
    """The server needs only `tokenizer.encode(text) -> list[int]`, which transformers' tokenizers have."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2},
                                                                  unk_token="[UNK]"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")
    served = serve(FakeEngine(tokenizer=tokenizer))
    with caplog.at_level(logging.INFO, logger="lmi.access"):
        response = served.post({"inputs": "hello world again", "parameters": {"max_new_tokens": 2}})
    assert response.json() == {"generated_text": "ab"}
    access = [r.getMessage() for r in caplog.records if r.name == "lmi.access"]
    assert len(access) == 1 and "prompt_tokens=3" in access[0]


# ---- streaming --------------------------------------------------------------------------------------------
def test_stream_true_gives_json_lines(serve):
    response = serve(FakeEngine()).post({"inputs": "hi", "stream": True,
                                         "parameters": {"max_new_tokens": 4, "details": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/jsonlines")
    lines = json_lines(response)
    assert len(lines) == 4 and all("token" in line for line in lines)
    assert "".join(line["token"]["text"] for line in lines) == lines[-1]["generated_text"] == expected_text(4)
    assert lines[-1]["details"] == {"finish_reason": "length", "generated_tokens": 4, "inputs": "hi"}
    assert "generated_text" not in lines[0]


def test_accept_header_selects_sse(serve):
    response = serve(FakeEngine()).post({"inputs": "hi", "parameters": {"max_new_tokens": 3}},
                                        headers={"Accept": "text/event-stream"})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert [e["token"]["text"] for e in events] == list(expected_text(3))
    assert events[-1]["generated_text"] == expected_text(3)


def test_accept_header_selects_jsonlines(serve):
    response = serve(FakeEngine(), output_formatter="sse").post(
        {"inputs": "hi", "parameters": {"max_new_tokens": 2}}, headers={"Accept": "application/jsonlines"})
    assert len(json_lines(response)) == 2


def test_output_formatter_is_the_default_and_stream_false_overrides_it(serve):
    served = serve(FakeEngine(), output_formatter="sse")
    assert sse_events(served.post({"inputs": "hi", "parameters": {"max_new_tokens": 2}}))[-1]["generated_text"] == "ab"
    response = served.post({"inputs": "hi", "stream": False, "parameters": {"max_new_tokens": 2}})
    assert response.json() == {"generated_text": "ab"}
    jsonl = serve(FakeEngine(), output_formatter="jsonlines")
    assert json_lines(jsonl.post({"inputs": "hi", "parameters": {"max_new_tokens": 2}}))[-1]["generated_text"] == "ab"


def test_stream_holds_back_text_of_a_stop_sequence(serve):
    lines = json_lines(serve(FakeEngine()).post({"inputs": "hi", "stream": True, "parameters": {"stop": "cd"}}))
    assert "".join(line["token"]["text"] for line in lines) == lines[-1]["generated_text"] == "ab"


def test_a_list_of_inputs_streams_one_line_per_step_in_input_order(serve):
    """LMI's batch streaming: each line holds every input's next token text, in input order; an input that has
    finished gives "", so there are as many lines as the longest input's tokens, and joining each column
    gives exactly the text the same request answers without streaming."""
    served = serve(FakeEngine())
    body = {"inputs": ["hi", "hello", "hey"], "parameters": {"max_new_tokens": 4}}
    response = served.post({**body, "stream": True, "parameters": {"max_new_tokens": 4, "stop": ["c"]}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/jsonlines")
    lines = json_lines(response)
    assert lines == [{"outputs": ["a", "a", "a"]}, {"outputs": ["b", "b", "b"]}]  # the stop sequence ends all three
    lines = json_lines(served.post({**body, "stream": True}))
    texts = ["".join(line["outputs"][i] for line in lines) for i in range(3)]
    assert texts == [answer["generated_text"] for answer in served.post(body).json()] == [expected_text(4)] * 3
    events = sse_events(served.post(body, headers={"Accept": "text/event-stream"}))
    assert [event["outputs"] for event in events] == [[c, c, c] for c in expected_text(4)]


def test_a_list_stream_pads_finished_inputs_with_empty_strings():
    from entrypoint.protocol.lmi import Accumulator
    from entrypoint.protocol.streaming import BatchStreamEncoder, Format
    from handlers.engine import FinishReason, RequestOutput, SamplingParams, Token

    def out(text, finished=False):
        return RequestOutput("r", (Token(ord(text[0]), text, -0.1),), text, finished=finished,
                               finish_reason=FinishReason.LENGTH if finished else None)

    encoder = BatchStreamEncoder(Format.JSONLINES, [Accumulator("p", SamplingParams()) for _ in range(2)])
    chunks = encoder.feed(0, out("a")) + encoder.feed(0, out("b", finished=True)) + encoder.feed(1, out("x"))
    chunks += encoder.feed(1, out("y")) + encoder.feed(1, out("z", finished=True)) + encoder.end()
    assert [json.loads(chunk) for chunk in chunks] == [{"outputs": ["a", "x"]}, {"outputs": ["b", "y"]},
                                                       {"outputs": ["", "z"]}]
    lines = [json.loads(chunk) for chunk in BatchStreamEncoder(Format.JSONLINES, [Accumulator("p", SamplingParams())])
             .feed(0, RequestOutput("r", (Token(2, "", -0.1, special=True),), "", finished=True,
                                    finish_reason=FinishReason.EOS_TOKEN))]
    assert lines == []  # an end-of-sequence token alone: no line of empty texts


def test_a_list_stream_that_fails_midway_ends_with_the_error_line(serve):
    response = serve(FakeEngine(oom_at_step=3)).post({"inputs": ["a", "b"], "stream": True,
                                                      "parameters": {"max_new_tokens": 10}})
    assert response.status_code == 200
    lines = json_lines(response)
    assert all(set(line) == {"outputs"} for line in lines[:-1])  # whatever every input had, then the error
    assert lines[-1]["code"] == 507 and lines[-1]["type"] == "OutOfMemory"


def test_stream_error_before_the_first_token_gets_its_status(serve):
    assert_error(serve(FakeEngine()).post({"inputs": "[oom]", "stream": True}), 507, "OutOfMemory")


def test_stream_error_after_headers_is_the_last_line(serve):
    served = serve(FakeEngine(oom_at_step=3))
    response = served.post({"inputs": "hi", "stream": True, "parameters": {"max_new_tokens": 10}})
    assert response.status_code == 200
    lines = json_lines(response)
    assert [line["token"]["text"] for line in lines[:-1]] == ["a", "b"]
    assert lines[-1]["code"] == 507 and lines[-1]["type"] == "OutOfMemory"
    sse = served.post({"inputs": "hi", "parameters": {"max_new_tokens": 10}},
                      headers={"Accept": "text/event-stream"})
    assert sse_events(sse)[-1].get("generated_text") == expected_text(10)  # OOM was a one-off at step 3


# ---- the error table ----------------------------------------------------------------------------------------
def test_400_invalid_json(serve):
    response = serve(FakeEngine()).request("POST", "/invocations", content=b'{"inputs": "hi",',
                                           headers={"content-type": "application/json"})
    assert_error(response, 400, "InvalidRequest", "not valid JSON", "line 1")


@pytest.mark.parametrize("body, fragments", [
    ({"inputs": "hi", "parameters": {"temperature": -1}}, ["parameters.temperature", "-1", ">= 0.0 and <= 100.0"]),
    ({"inputs": "hi", "parameters": {"top_p": 1.5}}, ["parameters.top_p", "1.5", "> 0.0 and <= 1.0"]),
    ({"inputs": "hi", "parameters": {"max_new_tokens": "many"}}, ["parameters.max_new_tokens", '"many"', "integer"]),
    ({"inputs": "hi", "parameters": {"stop": "x", "stop_sequences": ["y"]}}, ["send only one"]),
    ({"parameters": {}}, ["inputs", "missing"]),
    ({"inputs": 5}, ["inputs = 5", "string or a list of strings"]),
    ({"inputs": []}, ["empty list"]),
    (["hi"], ["JSON object"]),
])
def test_400_names_field_value_and_range(serve, body, fragments):
    assert_error(serve(FakeEngine()).post(body), 400, "InvalidRequest", *fragments)


def test_400_prompt_too_long_names_both_numbers(serve):
    served = serve(FakeEngine(max_total_tokens=32))
    response = served.post({"inputs": "x" * 30, "parameters": {"max_new_tokens": 10}})
    assert_error(response, 400, "InvalidRequest", "30 tokens", "40 tokens", "limit of 32")
    assert served.engine.added == []  # rejected before it reached the batch
    response = served.post({"inputs": ["ok", "x" * 40], "parameters": {"max_new_tokens": 1}})
    assert_error(response, 400, "InvalidRequest", "inputs[1]")
    assert_error(served.post({"inputs": ""}), 400, "InvalidRequest", "empty")


def test_404_unknown_model_and_route(serve):
    served = serve(FakeEngine())
    assert_error(served.post({"inputs": "hi"}, url="/predictions/other"), 404, "ModelNotFound", "'other'", "fake-model")
    assert_error(served.request("GET", "/nope"), 404, "NotFound")
    assert_error(served.request("GET", "/invocations"), 405, "MethodNotAllowed")


def test_413_by_content_length_and_by_counting_chunked_bodies(serve):
    served = serve(FakeEngine(), max_request_size=2048)
    big = {"inputs": "x" * 4000}
    assert_error(served.post(big), 413, "RequestTooLarge", "2048 bytes", "max_request_size")

    async def chunks():
        for _ in range(10):
            yield b" " * 500

    response = served.request("POST", "/invocations", content=chunks())
    assert_error(response, 413, "RequestTooLarge", "2048 bytes")
    assert served.post({"inputs": "small", "parameters": {"max_new_tokens": 1}}).status_code == 200


def test_503_queue_full_with_retry_after(serve):
    served = serve(FakeEngine(step_delay=0.005), job_queue_size=1)

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with served.client() as client:
            body = {"inputs": "a", "parameters": {"max_new_tokens": 40}}
            slow = asyncio.ensure_future(client.post("/invocations", json=body))
            while served.loop.stats().admitted == 0:
                await asyncio.sleep(0.001)
            rejected = await client.post("/invocations", json={"inputs": "b"})
            return rejected, await slow

    rejected, slow = asyncio.run(scenario())
    assert_error(rejected, 503, "QueueFull", "job_queue_size=1")
    assert int(rejected.headers["Retry-After"]) > 0
    assert slow.json() == {"generated_text": expected_text(40)}


def test_424_generation_failure_and_507_out_of_memory(serve):
    served = serve(FakeEngine())
    assert_error(served.post({"inputs": "please [fail]"}), 424, "GenerationError", "fake engine failed")
    assert_error(served.post({"inputs": "[oom] huge"}), 507, "OutOfMemory", "out of memory")
    assert_error(served.post({"inputs": ["fine", "[fail]"]}), 424, "GenerationError")
    assert served.request("GET", "/ping").status_code == 200  # neither is an engine crash


def test_424_predict_timeout(serve):
    served = serve(FakeEngine(step_delay=0.005), predict_timeout=0.1)
    assert_error(served.post({"inputs": "hi", "parameters": {"max_new_tokens": 1000}}), 424, "PredictTimeout",
                 "predict_timeout=0.1 s")


def test_bad_requests_in_parallel_leave_good_ones_intact(serve):
    served = serve(FakeEngine(step_delay=0.002, max_total_tokens=64))
    good = [{"inputs": f"good {i}", "parameters": {"max_new_tokens": 10 + i}} for i in range(6)]
    bad = [{"inputs": "bad", "parameters": {"temperature": -5}},
           {"inputs": "x" * 70},
           {"inputs": "bad", "parameters": {"max_new_tokens": True}},
           {"inputs": "[fail] in the batch", "parameters": {"max_new_tokens": 5}}]

    async def scenario() -> list[httpx.Response]:
        async with served.client() as client:
            return await asyncio.gather(*(client.post("/invocations", json=b) for b in good + bad))

    responses = asyncio.run(scenario())
    for i, response in enumerate(responses[:len(good)]):
        assert response.json() == {"generated_text": expected_text(10 + i)}
    assert [r.status_code for r in responses[len(good):]] == [400, 400, 400, 424]
    assert len(served.engine.added) == len(good) + 1  # only the [fail] one of the bad reached the engine


def test_access_log_line(serve, caplog):
    served = serve(FakeEngine())
    with caplog.at_level(logging.INFO, logger="lmi.access"):
        served.post({"inputs": "hello", "parameters": {"max_new_tokens": 3}})
        served.post({"inputs": "hello", "parameters": {"temperature": -1}})
    ok, bad = [r.getMessage() for r in caplog.records if r.name == "lmi.access"]
    for field in ("request_id=", "route=/invocations", "status=200", "prompt_tokens=5", "generated_tokens=3",
                  "ttft_ms=", "total_ms=", "finish_reason=length"):
        assert field in ok
    assert "status=400" in bad and "error=InvalidRequest" in bad


# ---- client disconnects, against a real uvicorn ------------------------------------------------------------------
@pytest.fixture
def live(serve):
    served = serve(FakeEngine(step_delay=0.005))
    with uvicorn_serving(served.app) as url:
        yield served, url


def test_streaming_client_disconnect_cancels_the_request(live):
    served, url = live
    with httpx.Client(base_url=url) as client:
        with client.stream("POST", "/invocations", json={"inputs": "hi", "stream": True,
                                                         "parameters": {"max_new_tokens": 2000}}) as response:
            first = next(response.iter_lines())
            assert json.loads(first)["token"]["text"] == "a"
    wait_for(lambda: len(served.engine.cancelled) == 1)
    wait_for(lambda: served.loop.stats().admitted == 0)


def test_non_streaming_client_disconnect_cancels_the_request(live):
    served, url = live
    body = json.dumps({"inputs": "hi", "parameters": {"max_new_tokens": 2000}}).encode()
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: served.engine.steps > 3)
    wait_for(lambda: len(served.engine.cancelled) == 1)
    wait_for(lambda: served.loop.stats().admitted == 0)
