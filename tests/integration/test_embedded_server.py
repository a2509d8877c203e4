"""The real server (`python -m entrypoint serve`, a subprocess) on the embedded SmolLM2-135M-Instruct:
health while loading, the LMI schema in JSON and both streaming formats, the error table, and 16
simultaneous greedy requests that each match the same request sent alone."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest

pytestmark = pytest.mark.slow

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def server(embedded_server):
    """The session's real server (tests/integration/conftest.py)."""
    return embedded_server


# How long a client waits for a whole answer. Only a bound against a hung server (pytest-timeout is the
# other): on a 2-core machine that others load heavily, 16 requests decoding together took over 120 s.
CLIENT_TIMEOUT = 600


def invoke(url: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/invocations", json=body, timeout=CLIENT_TIMEOUT, **kwargs)


def test_ping_answers_quickly_while_loading_then_200(server):
    codes = server["ping_codes"]
    assert codes[-1][0] == 200
    loading = [(code, seconds) for code, seconds in codes if code != 200]
    assert loading, "the server should answer /ping while the model loads"
    assert all(code == 503 and seconds < 2.0 for code, seconds in loading)


def test_answers_the_capital_of_france(server):
    response = invoke(server["url"], {"inputs": CHAT.format("What is the capital of France?"),
                                      "parameters": {"max_new_tokens": 20, "details": True}})
    assert response.status_code == 200
    body = response.json()
    assert "Paris" in body["generated_text"]
    details = body["details"]
    assert details["finish_reason"] == "eos_token"
    assert details["generated_tokens"] == len(details["tokens"])
    assert all({"id", "text", "log_prob"} <= set(token) for token in details["tokens"])


def test_list_inputs_give_a_list_and_models_names_the_embedded_model(server):
    response = invoke(server["url"], {"inputs": ["The capital of France is", "One, two,"],
                                      "parameters": {"max_new_tokens": 4}})
    assert response.status_code == 200
    assert [len(item["generated_text"]) > 0 for item in response.json()] == [True, True]
    models = httpx.get(f"{server['url']}/models").json()["models"]
    assert models[0]["modelName"] == "SmolLM2-135M-Instruct" and models[0]["status"] == "READY"


def test_jsonlines_and_sse_streams_carry_the_same_text_as_json(server):
    body = {"inputs": "The history of Paris", "parameters": {"max_new_tokens": 24}}
    plain = invoke(server["url"], body).json()["generated_text"]

    lines = [json.loads(line) for line in invoke(server["url"], {**body, "stream": True}).text.splitlines() if line]
    assert "".join(line["token"]["text"] for line in lines) == plain == lines[-1]["generated_text"]

    response = invoke(server["url"], body, headers={"Accept": "text/event-stream"})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[len("data:"):]) for line in response.text.splitlines() if line.startswith("data:")]
    assert events[-1]["generated_text"] == plain
    assert len(events) == 24


def test_error_table(server):
    url = server["url"]
    bad_json = httpx.post(f"{url}/invocations", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["code"] == 400

    bad_param = invoke(url, {"inputs": "x", "parameters": {"temperature": -1}})
    assert bad_param.status_code == 400 and "temperature" in bad_param.json()["message"]

    too_long = invoke(url, {"inputs": "word " * 300, "parameters": {"max_new_tokens": 400}})
    message = too_long.json()["message"]
    assert too_long.status_code == 400 and "400" in message and "512" in message

    unknown = httpx.post(f"{url}/predictions/no-such-model", json={"inputs": "x"})
    assert unknown.status_code == 404

    huge = httpx.post(f"{url}/invocations", content=b"x" * 70000, headers={"content-type": "application/json"})
    assert huge.status_code == 413

    ok = httpx.post(f"{url}/predictions/SmolLM2-135M-Instruct", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert ok.status_code == 200


def test_sixteen_simultaneous_greedy_requests_each_match_the_request_alone(server):
    url = server["url"]
    topics = ["Paris", "the ocean", "a cat", "mathematics", "music", "the moon", "bread", "trains",
              "winter", "a library", "coffee", "rain", "chess", "a garden", "the internet", "mountains"]
    bodies = [{"inputs": CHAT.format(f"Write one sentence about {topic}." + " Please." * (i % 4)),
               # different lengths, so requests leave the batch while others keep decoding
               "parameters": {"max_new_tokens": 4 + 2 * i, "do_sample": False}}
              for i, topic in enumerate(topics)]
    alone = [invoke(url, body).json()["generated_text"] for body in bodies]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda body: invoke(url, body), bodies))
    assert all(response.status_code == 200 for response in together)
    assert [response.json()["generated_text"] for response in together] == alone
