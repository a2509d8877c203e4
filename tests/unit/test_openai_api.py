"""The OpenAI-compatible routes and /metrics against the fake engine: response and chunk shapes, usage,
n, logprobs, validation errors in OpenAI's shape, chat bodies on /invocations, and cancellation."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.live_app import uvicorn_serving, wait_for

from entrypoint.configuration import Configuration
from entrypoint.http.app import create_app
from entrypoint.http.state import ServerState
from handlers.serving_properties import ServingProperties
from handlers.engine import GenerationRequest, InvalidRequest, Token
from handlers.engine_loop import EngineLoop
from tests.support.fake_engine import ALPHABET, CharTokenizer, FakeEngine, expected_text


class ChatTokenizer(CharTokenizer):
    """The fake's one-token-per-character tokenizer with a trivial chat template."""

    chat_template = "<role>content\\n per message, then <assistant>"

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


def chat_prompt(*messages: dict) -> str:
    return ChatTokenizer().apply_chat_template(list(messages), add_generation_prompt=True)


class RecordingEngine(FakeEngine):
    """FakeEngine that keeps every request it was given and reports top_n_tokens alternatives per token."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("tokenizer", ChatTokenizer())
        super().__init__(**kwargs)
        self.requests: list[GenerationRequest] = []

    def add_request(self, request: GenerationRequest) -> None:
        super().add_request(request)
        self.requests.append(request)

    def _out(self, active, token, reason):  # type: ignore[override]
        n = active.request.params.top_n_tokens
        alternatives = tuple(Token(ord(ALPHABET[k]), ALPHABET[k], -1.0 - k) for k in range(n))
        return super()._out(active, token and dataclasses.replace(token, top_tokens=alternatives), reason)


class Served:
    def __init__(self, engine: FakeEngine | None = None, **properties: Any):
        self.properties = ServingProperties(model_id="org/fake-model", **properties)
        self.state = ServerState("fake-model", ("org/fake-model",))
        self.app = create_app(Configuration(properties=self.properties, sources={}, model_dir=Path("/nonexistent")),
                              self.state)
        self.engine = engine
        self.loop = None
        if engine is not None:
            self.loop = EngineLoop(engine, job_queue_size=self.properties.job_queue_size).start()
            self.state.set_ready(self.loop)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def call() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t") as client:
                return await client.request(method, url, **kwargs)
        return asyncio.run(call())

    def post(self, url: str, body: Any, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, json=body, **kwargs)

    def completion(self, **body: Any) -> httpx.Response:
        return self.post("/v1/completions", {"model": "fake-model", **body})

    def chat(self, **body: Any) -> httpx.Response:
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
        return self.post("/v1/chat/completions", {"model": "fake-model", **body})


@pytest.fixture
def serve():
    served: list[Served] = []

    def make(engine: FakeEngine | None = None, **properties: Any) -> Served:
        served.append(Served(engine, **properties))
        return served[-1]

    yield make
    for s in served:
        if s.loop is not None:
            s.loop.stop()


def openai_error(response: httpx.Response, status: int, param: str | None, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["param"] == param and isinstance(error["code"], str)
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error


def sse(response: httpx.Response) -> list[Any]:
    """The data of every event; the last must be [DONE]."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [chunk for chunk in response.text.split("\n\n") if chunk]
    assert all(event.startswith("data: ") for event in events), response.text
    assert events[-1] == "data: [DONE]"
    return [json.loads(event[len("data: "):]) for event in events[:-1]]


# ---- completions ------------------------------------------------------------------------------------------
def test_completion_shape_usage_and_default_max_tokens(serve):
    response = serve(RecordingEngine()).completion(prompt="hello")
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == "fake-model"
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": expected_text(16), "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21}


def test_completion_prompt_list_token_ids_echo_and_stop(serve):
    served = serve(RecordingEngine())
    body = served.completion(prompt=["a", "bb"], max_tokens=3).json()
    assert [c["text"] for c in body["choices"]] == [expected_text(3)] * 2
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    ids = served.completion(prompt=[ord("h"), ord("i")], max_tokens=2, echo=True).json()
    assert ids["choices"][0]["text"] == "hi" + expected_text(2) and ids["usage"]["prompt_tokens"] == 2
    stopped = served.completion(prompt="x", stop=["cd", "zz"]).json()["choices"][0]
    assert stopped["text"] == "ab" and stopped["finish_reason"] == "stop"


def test_sampling_defaults_follow_openai(serve):
    served = serve(RecordingEngine())
    served.completion(prompt="x", max_tokens=2)
    served.completion(prompt="x", max_tokens=2, temperature=0)
    served.chat(temperature=0.5, top_p=0.9, stop="q", seed=7, presence_penalty=1.5, frequency_penalty=-1)
    default, greedy, chat = (r.params for r in served.engine.requests)
    assert default.do_sample and default.temperature == 1.0 and default.max_new_tokens == 2
    assert not greedy.do_sample and greedy.greedy
    assert (chat.do_sample, chat.temperature, chat.top_p, chat.stop_sequences, chat.seed) == (True, 0.5, 0.9, ("q",), 7)
    assert (chat.presence_penalty, chat.frequency_penalty) == (1.5, -1.0)


def test_n_gives_independent_choices_seeded_seed_plus_i(serve):
    served = serve(RecordingEngine())
    body = served.completion(prompt="x", max_tokens=4, n=3, seed=5).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [expected_text(4, seed=5 + i) for i in range(3)]
    assert [r.params.seed for r in served.engine.requests] == [5, 6, 7]
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 12, "total_tokens": 13}  # prompt counted once
    alone = served.completion(prompt="x", max_tokens=4, seed=6).json()["choices"][0]["text"]
    assert alone == body["choices"][1]["text"]


def test_n_beyond_what_the_server_admits_is_400(serve):
    served = serve(RecordingEngine(), job_queue_size=4)
    openai_error(served.completion(prompt=["a", "b"], n=3), 400, "n", "job_queue_size=4")
    assert served.engine.requests == []


def test_completion_logprobs_shape(serve):
    body = serve(RecordingEngine()).completion(prompt="x", max_tokens=3, logprobs=2).json()
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["a", "b", "c"] and logprobs["token_logprobs"] == [-0.5] * 3
    # the chosen token is always in top_logprobs, as OpenAI and vLLM answer ("c" is not among the 2 most likely)
    assert logprobs["top_logprobs"] == [{"a": -1.0, "b": -2.0}] * 2 + [{"a": -1.0, "b": -2.0, "c": -0.5}]
    assert logprobs["text_offset"] == [0, 1, 2]
    assert len(logprobs["tokens"]) == body["usage"]["completion_tokens"]


# ---- chat -------------------------------------------------------------------------------------------------
def test_chat_shape_template_usage_and_default_max_tokens(serve):
    served = serve(RecordingEngine(max_total_tokens=80))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [
        {"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]}]
    body = served.chat(messages=messages).json()
    prompt = chat_prompt({"role": "system", "content": "be brief"}, {"role": "user", "content": "hello\nthere"})
    assert served.engine.requests[0].prompt == prompt
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert body["usage"]["completion_tokens"] == 80 - len(prompt)  # the rest of the context
    assert choice["message"]["content"] == expected_text(80 - len(prompt))


def test_chat_eos_is_stop_and_logprobs_count_every_generated_token(serve):
    body = serve(RecordingEngine(eos_at=4)).chat(logprobs=True, top_logprobs=2, max_completion_tokens=10).json()
    choice = body["choices"][0]
    assert choice["message"]["content"] == expected_text(3) and choice["finish_reason"] == "stop"
    content = choice["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 4
    assert content[0] == {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [
        {"token": "a", "logprob": -1.0, "bytes": [97]}, {"token": "b", "logprob": -2.0, "bytes": [98]}]}
    assert "".join(entry["token"] for entry in content) == choice["message"]["content"]


def test_chat_without_a_chat_template_is_a_clear_400(serve):
    served = serve(FakeEngine())  # CharTokenizer: no chat template
    openai_error(served.chat(), 400, "messages", "no chat template", "/v1/completions")


def test_messages_posted_to_invocations_get_the_chat_response(serve):
    served = serve(RecordingEngine())
    body = served.post("/invocations", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                        "model": "whatever"}).json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == expected_text(3)
    assert body["model"] == "fake-model"  # /invocations serves this model whatever the body names
    bad = served.post("/invocations", {"messages": [{"role": "tool", "content": "x"}]})
    assert bad.status_code == 400 and bad.json()["code"] == 400  # /invocations keeps LMI's error shape


# ---- streaming --------------------------------------------------------------------------------------------
def test_chat_stream_chunks_match_the_response_and_end_with_done(serve):
    served = serve(RecordingEngine(eos_at=6))
    plain = served.chat(temperature=0).json()["choices"][0]["message"]["content"]
    chunks = sse(served.chat(temperature=0, stream=True))
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
    assert "".join(d.get("content", "") for d in deltas) == plain == expected_text(5)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]


def test_stream_include_usage_adds_a_final_usage_chunk(serve):
    chunks = sse(serve(RecordingEngine()).chat(stream=True, max_tokens=3, stream_options={"include_usage": True}))
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": len(chat_prompt({"role": "user", "content": "hi"})),
                                   "completion_tokens": 3, "total_tokens": len(chat_prompt(
                                       {"role": "user", "content": "hi"})) + 3}


def test_completion_stream_with_n_and_logprobs(serve):
    chunks = sse(serve(RecordingEngine()).completion(prompt=["a", "b"], n=2, max_tokens=3, seed=1, stream=True,
                                                     logprobs=1))
    texts: dict[int, str] = {}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        assert choice["logprobs"]["tokens"] == [choice["text"]]
    assert texts == {0: expected_text(3, 1), 1: expected_text(3, 2), 2: expected_text(3, 1), 3: expected_text(3, 2)}


def test_stream_error_after_headers_is_an_openai_error_event_then_done(serve):
    chunks = sse(serve(RecordingEngine(oom_at_step=3)).completion(prompt="x", max_tokens=10, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "ab"
    assert chunks[-1]["error"]["type"] == "server_error" and chunks[-1]["error"]["code"] == "out_of_memory"


# ---- validation and errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("route, body, param, fragments", [
    ("completions", {"prompt": "x", "temperature": 3}, "temperature", ["temperature = 3", "<= 2"]),
    ("chat", {"top_p": 2}, "top_p", ["top_p = 2", "<= 1"]),
    ("chat", {"n": 0}, "n", [">= 1"]),
    ("chat", {"n": 1000}, "n", ["<= 128"]),
    ("chat", {"presence_penalty": -3}, "presence_penalty", [">= -2"]),
    ("chat", {"frequency_penalty": "a"}, "frequency_penalty", ["expected a number"]),
    ("chat", {"max_tokens": 0}, "max_tokens", [">= 1"]),
    ("chat", {"stop": ["a", "b", "c", "d", "e"]}, "stop", ["at most 4"]),
    ("chat", {"top_logprobs": 3}, "top_logprobs", ["logprobs set to true"]),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", ["<= 20"]),
    ("completions", {"prompt": "x", "logprobs": 6}, "logprobs", ["<= 5"]),
    ("completions", {}, "prompt", ["missing"]),
    ("completions", {"prompt": [1, "a"]}, "prompt", ["token ids"]),
    ("completions", {"prompt": "x", "n": 3, "best_of": 2}, "best_of", ["best_of = 2", "at least n = 3"]),
    ("chat", {"logprobs": "yes"}, "logprobs", ["logprobs", "true or false"]),
    ("chat", {"tools": [{"type": "function"}]}, "tools", ["not supported"]),
    ("chat", {"logit_bias": {"1": 5}}, "logit_bias", ["not supported"]),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options", ["stream is true"]),
    ("chat", {"messages": []}, "messages", ["non-empty list"]),
    ("chat", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", ["'tool'"]),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]",
     ["text parts"]),
    ("completions", {"prompt": "x" * 30, "max_tokens": 20}, "max_tokens", ["maximum context length is 40", "50"]),
    ("chat", {"messages": [{"role": "user", "content": "x" * 40}]}, "messages", ["maximum context length"]),
])
def test_invalid_parameters_are_400_in_openai_shape(serve, route, body, param, fragments):
    served = serve(RecordingEngine(max_total_tokens=40))
    response = served.completion(**body) if route == "completions" else served.chat(**body)
    error = openai_error(response, 400, param, *fragments)
    assert error["code"] == "invalid_request"
    assert served.engine.requests == []  # refused before the batch


def test_invalid_json_and_unknown_model_and_route(serve):
    served = serve(RecordingEngine())
    bad_json = served.request("POST", "/v1/chat/completions", content=b"{",
                              headers={"content-type": "application/json"})
    openai_error(bad_json, 400, None, "not valid JSON")
    error = openai_error(served.completion(prompt="x", model="gpt-4"), 404, None, "gpt-4", "fake-model")
    assert error["code"] == "model_not_found"
    openai_error(served.chat(model="gpt-4"), 404, None, "gpt-4")
    assert served.completion(prompt="x", model="org/fake-model", max_tokens=1).status_code == 200  # an alias
    no_model = served.post("/v1/completions", {"prompt": "x", "max_tokens": 1}).json()
    assert no_model["model"] == "fake-model"
    openai_error(served.request("GET", "/v1/nope"), 404, None, "no route")
    lmi = served.request("GET", "/nope").json()
    assert lmi["code"] == 404 and "param" not in lmi  # LMI routes keep their shape


def test_loading_is_503_server_error(serve):
    response = serve().completion(prompt="x")
    openai_error(response, 503, None, "still loading")
    assert response.headers["Retry-After"]


def test_models(serve):
    served = serve(RecordingEngine())
    body = served.request("GET", "/v1/models").json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == "fake-model" and card["object"] == "model" and card["owned_by"] == "lmi"
    assert card["max_model_len"] == 4096 and isinstance(card["created"], int)
    assert served.request("GET", "/v1/models/fake-model").json()["id"] == "fake-model"
    openai_error(served.request("GET", "/v1/models/other"), 404, None, "other")


# ---- metrics ----------------------------------------------------------------------------------------------
def metric(served: Served, name: str, **labels: str) -> float:
    text = served.request("GET", "/metrics").text
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_count_every_route_and_engine_state(serve):
    served = serve(RecordingEngine())
    response = served.request("GET", "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    served.post("/invocations", {"inputs": "hello", "parameters": {"max_new_tokens": 3}})
    served.post("/predictions/fake-model", {"inputs": "hello", "parameters": {"max_new_tokens": 3}})
    served.completion(prompt="abc", max_tokens=4)
    served.chat(max_tokens=2, stream=True)
    served.completion(prompt="x", temperature=9)
    assert metric(served, "lmi_requests_total", route="/invocations", status="200") == 1
    assert metric(served, "lmi_requests_total", route="/predictions/{model_name}", status="200") == 1
    assert metric(served, "lmi_requests_total", route="/v1/completions", status="200") == 1
    assert metric(served, "lmi_requests_total", route="/v1/completions", status="400") == 1
    assert metric(served, "lmi_requests_total", route="/v1/chat/completions", status="200") == 1
    chat_prompt_tokens = len(chat_prompt({"role": "user", "content": "hi"}))
    assert metric(served, "lmi_prompt_tokens_total") == 5 + 5 + 3 + chat_prompt_tokens
    assert metric(served, "lmi_generation_tokens_total") == 3 + 3 + 4 + 2
    assert metric(served, "lmi_time_to_first_token_seconds_count") == 4
    assert metric(served, "lmi_inter_token_latency_seconds_count") == 2 + 2 + 3 + 1
    assert metric(served, "lmi_e2e_request_latency_seconds_count") == 4
    assert metric(served, "lmi_num_requests_running") == 0 and metric(served, "lmi_engine_healthy") == 1
    assert metric(served, "lmi_model_load_seconds") >= 0 and metric(served, "lmi_engine_steps_total") > 0


def test_each_app_has_its_own_registry(serve):
    first, second = serve(RecordingEngine()), serve()
    first.completion(prompt="x", max_tokens=1)
    assert metric(first, "lmi_requests_total", route="/v1/completions", status="200") == 1
    assert metric(second, "lmi_requests_total", route="/v1/completions", status="200") == 0
    assert "lmi_model_load_seconds" not in second.request("GET", "/metrics").text  # still loading


# ---- client disconnects, against a real uvicorn -----------------------------------------------------------
@pytest.fixture
def live(serve):
    served = serve(RecordingEngine(step_delay=0.005))
    with uvicorn_serving(served.app) as url:
        yield served, url


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 3000, "n": 2}),
])
def test_streaming_disconnect_cancels_every_choice(live, path, body):
    served, url = live
    with httpx.Client(base_url=url) as client:
        with client.stream("POST", path, json={**body, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
    wait_for(lambda: served.loop.stats().admitted == 0)
    assert len(served.engine.cancelled) == body.get("n", 1)
    wait_for(lambda: metric(served, "lmi_requests_total", route=path, status="499") == 1)


def test_non_streaming_client_timeout_cancels_the_request(live):
    served, url = live
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 3000}, timeout=0.3)
    wait_for(lambda: served.loop.stats().admitted == 0)
    assert len(served.engine.cancelled) == 1
    assert metric(served, "lmi_num_requests_active") == 0


class RefusingEngine(RecordingEngine):
    """Refuses every request when it is added (after the server's own checks passed), naming a field."""

    def add_request(self, request: GenerationRequest) -> None:
        raise InvalidRequest("max_new_tokens is more than this engine's scheduler takes", "max_new_tokens")


def test_a_refusal_from_the_engine_keeps_its_field_in_the_api_s_name(serve):
    served = serve(RefusingEngine())
    openai_error(served.completion(prompt="x", max_tokens=3), 400, "max_tokens", "scheduler")  # engine: max_new_tokens
    chat = served.post("/v1/chat/completions", {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
                                                "max_completion_tokens": 3, "stream": True})
    openai_error(chat, 400, "max_completion_tokens", "scheduler")
    lmi = served.post("/invocations", {"inputs": "x", "parameters": {"max_new_tokens": 3}})
    assert lmi.status_code == 400 and "scheduler" in lmi.json()["message"]
