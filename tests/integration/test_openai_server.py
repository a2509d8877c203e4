"""The OpenAI API of the real server on the embedded SmolLM2-135M-Instruct, through the official `openai`
client; /metrics; and cancellation: a client that goes away frees its batch slot at once.

The server is the session's (tests/integration/conftest.py); token counts are compared with the model's own
tokenizer. CPU decoding is slow here, so generations stay short."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def url(embedded_server) -> str:
    return embedded_server["url"]


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    # No retries: a 5xx must fail the test, not be retried behind its back.
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics by its name and labels as written, e.g. 'lmi_requests_total{route=...}'."""
    samples = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def requests_total(samples: dict[str, float], route: str, status: int) -> float:
    return samples.get(f'lmi_requests_total{{route="{route}",status="{status}"}}', 0.0)


def test_chat_answers_the_capital_of_france_with_exact_usage(client, tokenizer):
    response = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=20,
                                              logprobs=True, top_logprobs=2)
    choice = response.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop" and response.object == "chat.completion" and response.model == MODEL
    expected_prompt = tokenizer.apply_chat_template(CAPITAL, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert response.usage.prompt_tokens == len(expected_prompt)
    # one logprobs entry per generated token (the end-of-sequence token included)
    assert response.usage.completion_tokens == len(choice.logprobs.content)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 for entry in choice.logprobs.content)


def test_streaming_delivers_the_same_text_as_non_streaming(client, tokenizer):
    messages = [{"role": "user", "content": "Name three colors."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens

    prompt = "The history of Paris"
    whole = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=10)
    pieces = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=10, stream=True))
    assert "".join(piece.choices[0].text for piece in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(tokenizer.encode(prompt)) and whole.usage.completion_tokens == 10


def test_invalid_parameters_raise_openai_errors(client):
    for bad, param in (({"temperature": 3}, "temperature"), ({"top_p": 2}, "top_p"), ({"n": 1000}, "n")):
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=2, **bad)
        assert raised.value.body["param"] == param and raised.value.body["type"] == "invalid_request_error"
        assert param in raised.value.body["message"]
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="gpt-5", prompt="hi", max_tokens=2)
    assert raised.value.body["code"] == "model_not_found" and "gpt-5" in raised.value.body["message"]
    assert [model.id for model in client.models.list()] == [MODEL]


def test_metrics_count_openai_and_lmi_requests(client, url):
    before = metrics(url)
    client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=2)
    lmi = httpx.post(f"{url}/invocations", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert lmi.status_code == 200
    after = metrics(url)
    assert requests_total(after, "/v1/chat/completions", 200) == requests_total(before, "/v1/chat/completions", 200) + 1
    assert requests_total(after, "/invocations", 200) == requests_total(before, "/invocations", 200) + 1
    assert after["lmi_generation_tokens_total"] == before["lmi_generation_tokens_total"] + 4
    assert after["lmi_prompt_tokens_total"] > before["lmi_prompt_tokens_total"]
    assert after["lmi_time_to_first_token_seconds_count"] == before["lmi_time_to_first_token_seconds_count"] + 2
    assert after["lmi_e2e_request_latency_seconds_count"] == before["lmi_e2e_request_latency_seconds_count"] + 2
    assert after["lmi_model_load_seconds"] > 0 and after["lmi_engine_healthy"] == 1


# ---- cancellation --------------------------------------------------------------------------------------------
# A request the client abandoned must stop generating at once, not run to its max_tokens for nobody. What
# shows it, whatever the machine's load: the tokens it generated before it stopped, far fewer than LONG (a
# loaded machine decodes more slowly, so it generates even fewer in the same time). How long the server takes
# to become idle is only waited for, with a bound far above what the behaviour needs.
LONG = 480  # tokens (the fixture's max_tokens is 512): tens of seconds of CPU decoding
IDLE_WITHIN = 60.0  # seconds; the wait ends as soon as the server is idle


def wait_until_idle(url: str, within: float = IDLE_WITHIN) -> float:
    """Seconds until no request is running or admitted; fails after `within` seconds."""
    started = time.monotonic()
    while True:
        samples = metrics(url)
        busy = {name: samples[name] for name in ("lmi_num_requests_running", "lmi_num_requests_active")}
        if not any(busy.values()):
            return time.monotonic() - started
        assert time.monotonic() - started < within, f"still busy after {within} s: {busy}"
        time.sleep(0.05)


def test_a_closed_stream_frees_its_batch_slot(url):
    before = metrics(url)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            assert [next(events).startswith("data: {") for _ in range(2)] == [True, True]
            assert metrics(url)["lmi_num_requests_running"] == 1
    wait_until_idle(url)
    after = metrics(url)
    assert requests_total(after, "/v1/completions", 499) == requests_total(before, "/v1/completions", 499) + 1
    assert after["lmi_generation_tokens_total"] - before["lmi_generation_tokens_total"] < LONG / 4


def test_a_client_that_times_out_frees_its_batch_slot(url):
    """A non-streaming request whose client gives up after 1 s (its own read timeout) is cancelled."""
    before = metrics(url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/invocations", timeout=1.0,
                   json={"inputs": "Once upon a time", "parameters": {"max_new_tokens": LONG, "ignore_eos": True}})
    wait_until_idle(url)
    after = metrics(url)
    assert requests_total(after, "/invocations", 499) == requests_total(before, "/invocations", 499) + 1
    # It reached the engine (only admitted requests count prompt tokens), and stopped far short of LONG.
    assert after["lmi_prompt_tokens_total"] > before["lmi_prompt_tokens_total"]
    assert after["lmi_generation_tokens_total"] - before["lmi_generation_tokens_total"] < LONG / 4
