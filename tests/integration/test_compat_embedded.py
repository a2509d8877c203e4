"""Drop-in compatibility end to end: the real server on the embedded SmolLM2-135M-Instruct (the session's,
tests/integration/conftest.py) with what LMI and OpenAI clients send, prompt log-probabilities included
(the engine's prompt_logprobs and max_new_tokens 0)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def url(embedded_server) -> str:
    return embedded_server["url"]


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


def post(url: str, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120, **kwargs)


def test_lmi_client_fields_are_accepted_and_tokens_join_to_the_text(url):
    body = {"inputs": PROMPT, "adapters": [],
            "parameters": {"max_new_tokens": 12, "details": True, "n": 1, "top_k": -1, "min_p": 0.0,
                           "stop": [" and", "."]}}
    response = post(url, "/invocations", body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["details"]["inputs"] == PROMPT
    assert "".join(token["text"] for token in result["details"]["tokens"]) == result["generated_text"]
    assert all("special" not in token for token in result["details"]["tokens"])
    streamed = [json.loads(line) for line in post(url, "/invocations", {**body, "stream": True}).text.splitlines()]
    assert "".join(line["token"]["text"] for line in streamed) == streamed[-1]["generated_text"] \
        == result["generated_text"]


def test_a_tiny_temperature_decodes_greedily_instead_of_failing(url):
    greedy = post(url, "/invocations", {"inputs": PROMPT, "parameters": {"max_new_tokens": 6}})
    tiny = post(url, "/invocations", {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "do_sample": True,
                                                                      "temperature": 1e-300}})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json() == greedy.json()
    chat = post(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 1e-300})
    assert chat.status_code == 200 and chat.json()["choices"][0]["text"] == greedy.json()["generated_text"]


@pytest.mark.parametrize("path, body", [
    ("/invocations", '{"inputs": "hi \\ud800"}'),
    ("/v1/completions", '{"prompt": "hi \\ud800", "max_tokens": 2}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 2}'),
])
def test_a_lone_surrogate_is_a_400_on_every_generation_route(url, path, body):
    response = httpx.post(f"{url}{path}", content=body.encode(), headers={"content-type": "application/json"},
                          timeout=60)
    assert response.status_code == 400 and "surrogate" in response.text


def test_openapi_document_is_served(url):
    document = httpx.get(f"{url}/openapi.json", timeout=30).json()
    assert "/invocations" in document["paths"] and "/v1/chat/completions" in document["paths"]


def test_decoder_input_details_return_the_prompts_log_probabilities(url, tokenizer):
    body = post(url, "/invocations", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "details": True,
                                                                       "decoder_input_details": True}}).json()
    prefill = body["details"]["prefill"]
    assert [token["id"] for token in prefill] == tokenizer.encode(PROMPT)
    assert prefill[0]["log_prob"] is None and all(token["log_prob"] <= 0 for token in prefill[1:])


def test_echo_and_max_tokens_0_score_the_prompt_as_evaluation_harnesses_do(url, tokenizer):
    body = post(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1}).json()
    choice = body["choices"][0]
    assert choice["text"] == PROMPT
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(tokenizer.encode(PROMPT)) and logprobs["token_logprobs"][0] is None
    assert all(value <= 0 and math.isfinite(value) for value in logprobs["token_logprobs"][1:])
    with_tokens = post(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "echo": True,
                                                "logprobs": 1}).json()["choices"][0]["logprobs"]
    prompt_length = len(logprobs["tokens"])  # the prompt scores the same whatever follows it
    assert with_tokens["token_logprobs"][1:prompt_length] == pytest.approx(logprobs["token_logprobs"][1:], abs=1e-3)
