"""/openapi.json and /docs: the document lists every route with its request model, and real responses of
every kind (LMI JSON, list, stream lines, error bodies and error lines; OpenAI completions and chat with
logprobs, errors; ping, models) validate against the response models it names, extra fields forbidden, so
the document cannot drift from what the server writes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter

from entrypoint.http import api_schema as schema
from tests.support.fake_engine import FakeEngine
from tests.unit.test_http_app import Served, json_lines
from tests.unit.test_openai_api import RecordingEngine


@pytest.fixture
def served():
    made: list[Served] = []

    def make(engine: FakeEngine | None = None, **properties: Any) -> Served:
        made.append(Served(engine, **properties))
        return made[-1]

    yield make
    for s in made:
        s.close()


def valid(model: type[BaseModel] | Any, body: Any) -> None:
    TypeAdapter(model).validate_python(body)


def test_document_lists_every_route_with_its_request_and_response_models(served):
    s = served(FakeEngine())
    document = s.request("GET", "/openapi.json").json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    assert set(paths) >= {"/ping", "/models", "/invocations", "/predictions/{model_name}", "/v1/completions",
                          "/v1/chat/completions", "/v1/models", "/v1/models/{model_name}", "/metrics"}
    components = document["components"]["schemas"]
    for path, model in (("/invocations", "LmiInvocation"), ("/v1/completions", "CompletionRequest"),
                        ("/v1/chat/completions", "ChatCompletionRequest")):
        operation = paths[path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + model)
        assert {"200", "400", "503"} <= set(operation["responses"])
    parameters = components["LmiParameters"]["properties"]
    assert parameters["max_new_tokens"]["default"] == 30 and "decoder_input_details" in parameters
    assert components["LmiParameters"].get("additionalProperties") is not False  # unknown fields are accepted
    text = json.dumps(document)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}:
        assert ref in components, ref  # every reference resolves
    assert s.request("GET", "/docs").status_code == 200


def test_lmi_responses_match_the_documented_models(served):
    s = served(FakeEngine(eos_at=4))
    valid(schema.LmiResponse, s.post({"inputs": "hi", "parameters": {"max_new_tokens": 3}}).json())
    details = s.post({"inputs": "hi", "parameters": {"details": True, "decoder_input_details": True,
                                                      "top_n_tokens": 2}}).json()
    assert details["details"]["prefill"] and details["details"]["top_tokens"]
    valid(schema.LmiResponse, details)
    valid(list[schema.LmiResponse], s.post({"inputs": ["a", "b"], "parameters": {"max_new_tokens": 2}}).json())
    best_of = s.post({"inputs": "a", "parameters": {"max_new_tokens": 2, "n": 2, "top_n_tokens": 1}}).json()
    assert best_of["details"]["best_of_sequences"]
    valid(schema.LmiResponse, best_of)
    for line in json_lines(s.post({"inputs": "hi", "stream": True, "parameters": {"details": True}})):
        valid(schema.LmiStreamLine, line)
    valid(schema.LmiError, s.post({"inputs": 5}).json())
    valid(schema.LmiError, s.post({"inputs": "x"}, url="/predictions/nope").json())
    failed = s.post({"inputs": "[fail] x"})
    assert failed.status_code == 424 and failed.json()["details"]["finish_reason"] == "error"
    valid(schema.LmiError, failed.json())
    valid(schema.PingOk, s.request("GET", "/ping").json())
    valid(schema.Models, s.request("GET", "/models").json())


def test_a_stream_error_line_matches_the_documented_model(served):
    lines = json_lines(served(FakeEngine(fail_at_step=3)).post({"inputs": "hi", "stream": True}))
    assert lines[-1]["details"]["finish_reason"] == "error" and lines[-1]["token"]["special_token"] is True
    for line in lines:
        valid(schema.LmiStreamLine, line)


def test_ping_while_loading_matches_the_documented_model(served):
    valid(schema.PingUnavailable, served().request("GET", "/ping").json())


def test_openai_responses_match_the_documented_models(served):
    s = served(RecordingEngine())
    completion = s.post({"model": "fake-model", "prompt": "x", "max_tokens": 3, "logprobs": 2, "echo": True},
                        url="/v1/completions").json()
    valid(schema.Completion, completion)
    assert completion["choices"][0]["logprobs"]["token_logprobs"][0] is None  # the first prompt token
    chat = s.post({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                   "logprobs": True, "top_logprobs": 2}, url="/v1/chat/completions").json()
    valid(schema.ChatCompletion, chat)
    valid(schema.OpenAIError, s.post({"prompt": "x", "max_tokens": True}, url="/v1/completions").json())
    valid(schema.OpenAIError, s.post({"model": "gpt-4", "prompt": "x"}, url="/v1/completions").json())
    valid(schema.ModelList, s.request("GET", "/v1/models").json())
    valid(schema.ModelCard, s.request("GET", "/v1/models/fake-model").json())
