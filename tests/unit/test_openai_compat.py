"""Drop-in compatibility of the OpenAI routes and their strict request types, on the fake engine: what benchmark clients and evaluation harnesses send."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from tests.support.fake_engine import ALPHABET, expected_text
from tests.unit.test_openai_api import RecordingEngine, Served, openai_error


@pytest.fixture
def serve():
    made: list[Served] = []

    def make(engine: RecordingEngine | None = None, **properties: Any) -> Served:
        made.append(Served(engine or RecordingEngine(), **properties))
        return made[-1]

    yield make
    for s in made:
        if s.loop is not None:
            s.loop.stop()


class LaterLettersLikelier(RecordingEngine):
    """Each token's log-probability grows with its letter ("a" -1.0 ... "z" -0.04), so with seeds the
    sequences differ in mean log-probability and best_of has a best to find."""

    def _out(self, active, token, reason):  # type: ignore[override]
        if token is not None:
            token = dataclasses.replace(token, log_prob=-1.0 + ALPHABET.index(token.text) * 0.0384)
        return super()._out(active, token, reason)


def test_fields_benchmark_clients_send_are_accepted_and_ignored(serve):
    served = serve()
    response = served.completion(prompt="x", max_tokens=3, use_beam_search=False, best_of=1,
                                 min_tokens=0, skip_special_tokens=True, user="u")
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == expected_text(3)
    chat = served.chat(max_tokens=2, chat_template_kwargs={}, stream_options=None, metadata={"a": "b"})
    assert chat.status_code == 200
    # min_tokens, skip_special_tokens, user; chat_template_kwargs, metadata
    assert 'lmi_ignored_request_fields_total{api="openai"} 5.0' in served.request("GET", "/metrics").text
    openai_error(served.completion(prompt="x", use_beam_search=True), 400, "use_beam_search", "beam search")


@pytest.mark.parametrize("endpoint, body, param, fragments", [
    ("completions", {"prompt": "x", "max_tokens": True}, "max_tokens", ["max_tokens = true", "number"]),
    ("completions", {"prompt": "x", "stream": "yes"}, "stream", ["true or false"]),
    ("completions", {"prompt": "x", "echo": 1}, "echo", ["true or false"]),
    ("chat", {"logprobs": "yes"}, "logprobs", ["true or false"]),
    ("chat", {"temperature": True}, "temperature", ["temperature = true"]),
    ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", ["echo"]),
    ("completions", {"prompt": "x", "best_of": 2, "stream": True}, "best_of", ["stream"]),
])
def test_wrong_types_stay_400(serve, endpoint, body, param, fragments):
    served = serve()
    response = served.completion(**body) if endpoint == "completions" else served.chat(**body)
    openai_error(response, 400, param, *fragments)


def test_a_hugging_face_id_or_path_names_the_single_served_model(serve):
    served = serve()
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "/opt/ml/model", "org/fake-model"):
        assert served.completion(prompt="x", max_tokens=1, model=name).status_code == 200, name
    openai_error(served.completion(prompt="x", model="gpt-4"), 404, None, "gpt-4")


def test_echo_with_logprobs_scores_the_prompt(serve):
    body = serve().completion(prompt="xy", max_tokens=2, logprobs=1, echo=True).json()
    choice = body["choices"][0]
    assert choice["text"] == "xyab"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["x", "y", "a", "b"]
    assert logprobs["token_logprobs"] == [None, -1.0, -0.5, -0.5]  # the first prompt token has no context
    assert logprobs["top_logprobs"][0] is None and logprobs["top_logprobs"][1] == {"y": -1.0}
    assert logprobs["text_offset"] == [0, 1, 2, 3]


def test_return_tokens_as_token_ids_names_tokens_by_id(serve):
    """vLLM's extension: a client can send the generated ids back (to score them, say), which text cannot do."""
    served = serve()
    body = served.completion(prompt="xy", max_tokens=2, logprobs=1, echo=True, return_tokens_as_token_ids=True).json()
    logprobs = body["choices"][0]["logprobs"]
    ids = [f"token_id:{ord(c)}" for c in "xyab"]
    assert logprobs["tokens"] == ids and body["choices"][0]["text"] == "xyab"
    assert logprobs["top_logprobs"][1] == {ids[1]: -1.0} and set(logprobs["top_logprobs"][2]) >= {ids[2]}
    chunks = [json.loads(line[6:]) for line in served.completion(prompt="x", max_tokens=2, logprobs=0, stream=True,
                                                                 return_tokens_as_token_ids=True).text.splitlines()
              if line.startswith("data: {")]
    assert [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]] == ids[2:]
    chat = served.chat(max_tokens=1, logprobs=True, return_tokens_as_token_ids=True).json()
    assert chat["choices"][0]["logprobs"]["content"][0]["token"] == ids[2]


def test_max_tokens_0_with_echo_scores_the_prompt_only(serve):
    served = serve()
    body = served.completion(prompt="xyz", max_tokens=0, logprobs=0, echo=True).json()
    choice = body["choices"][0]
    assert choice["text"] == "xyz" and choice["logprobs"]["token_logprobs"] == [None, -1.0, -1.0]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}
    assert served.engine.requests[0].params.max_new_tokens == 0 and served.engine.requests[0].params.prompt_logprobs


def test_best_of_returns_the_n_sequences_with_the_highest_mean_log_probability(serve):
    served = serve(LaterLettersLikelier())
    body = served.completion(prompt="x", max_tokens=4, best_of=3, n=2, seed=5, temperature=1.0).json()
    # seeds 5, 6, 7 start at f, g, h: h... is the likeliest, then g...
    assert [c["text"] for c in body["choices"]] == [expected_text(4, seed=7), expected_text(4, seed=6)]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert len(served.engine.requests) == 3
    assert body["usage"]["completion_tokens"] == 12  # every generated token, as OpenAI bills best_of


@pytest.mark.parametrize("headers, properties, jsonlines", [
    ({}, {}, False), ({"Accept": "application/jsonlines"}, {}, True), ({}, {"output_formatter": "jsonlines"}, True),
])
def test_a_chat_body_on_invocations_streams_as_sse_chat_or_lmis_jsonlines_chat(serve, headers, properties, jsonlines):
    served = serve(**properties)
    response = served.post("/invocations", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                            "stream": True}, headers=headers)
    assert response.status_code == 200
    if jsonlines:
        assert response.headers["content-type"].startswith("application/jsonlines")
        chunks = [json.loads(line) for line in response.text.splitlines() if line]
    else:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [event[len("data: "):] for event in response.text.split("\n\n") if event]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks) == expected_text(3)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
