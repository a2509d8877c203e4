"""Reliability of the HTTP layer against the fake engine: requests that can never be served are 400s (not a
retryable 503), the optional API key, and slow or vanishing clients."""

from __future__ import annotations

import asyncio
import threading

import pytest

from entrypoint.protocol.tokenization import NORMALIZER_MARGIN, SHORT_PROMPT_CHARS, PromptTokenizer, max_chars_per_token
from tests.support.fake_engine import CharTokenizer, FakeEngine
from tests.unit.test_http_app import assert_error, serve  # noqa: F401 - `serve` is a fixture


def test_a_list_input_larger_than_the_queue_is_a_400_not_a_retryable_503(serve):
    served = serve(FakeEngine(), job_queue_size=2)
    response = served.post({"inputs": ["a", "b", "c"], "parameters": {"max_new_tokens": 1}})
    body = assert_error(response, 400, "InvalidRequest", "3 inputs", "job_queue_size=2")
    assert "Retry-After" not in response.headers, body
    assert served.engine.added == []  # nothing was submitted
    ok = served.post({"inputs": ["a", "b"], "parameters": {"max_new_tokens": 1}})
    assert ok.status_code == 200 and len(ok.json()) == 2


# ---- the optional API key -----------------------------------------------------------------------------
def test_api_key_is_off_by_default(serve):
    served = serve(FakeEngine())
    assert served.post({"inputs": "hi", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_api_key_guards_everything_but_ping(serve):
    served = serve(FakeEngine(), api_key="s3cret-key")
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
    assert served.request("GET", "/ping").status_code == 200  # health checks stay open
    missing = served.post(body)
    assert_error(missing, 401, "Unauthorized", "Authorization: Bearer")
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert_error(served.post(body, headers={"Authorization": "Bearer wrong"}), 401, "Unauthorized")
    assert_error(served.post(body, headers={"Authorization": "Basic s3cret-key"}), 401, "Unauthorized")
    assert served.post(body, headers={"Authorization": "Bearer s3cret-key"}).json() == {"generated_text": "ab"}
    assert served.post(body, headers={"authorization": "bearer s3cret-key"}).status_code == 200
    openai = served.request("GET", "/v1/models")
    assert openai.status_code == 401 and openai.json()["error"]["type"] == "invalid_request_error"
    assert served.request("GET", "/metrics").status_code == 401
    assert "s3cret-key" not in missing.text


# ---- prompt size and tokenization ----------------------------------------------------------------------
class VocabTokenizer(CharTokenizer):
    """One token per character, but declaring a vocabulary whose longest entry is 8 characters; records
    every text it encodes and can hold long ones until released."""

    def __init__(self) -> None:
        self.encoded: list[int] = []
        self.release = threading.Event()
        self.long_started = threading.Event()

    def __deepcopy__(self, memo: dict) -> "VocabTokenizer":
        return self  # the long lane's "copy" shares the events (a plain Python tokenizer is thread-safe)

    def get_vocab(self) -> dict[str, int]:
        return {"a": 1, "abcdefgh": 2, "<|eos|>": 0}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encoded.append(len(text))
        if len(text) > SHORT_PROMPT_CHARS:
            self.long_started.set()
            assert self.release.wait(30), "never released"
        return super().encode(text[:50])


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(serve):
    tokenizer = VocabTokenizer()
    served = serve(FakeEngine(tokenizer=tokenizer, max_total_tokens=1000))
    limit = 1000 * 8 * NORMALIZER_MARGIN  # max_total_tokens x longest vocabulary entry x margin
    response = served.post({"inputs": "x" * (limit + 1), "parameters": {"max_new_tokens": 1}})
    assert_error(response, 400, "InvalidRequest", "inputs", f"{limit + 1} characters", "1000 tokens")
    chat = served.post({"messages": [{"role": "user", "content": "x" * (limit + 1)}]}, url="/v1/chat/completions")
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    completion = served.post({"model": "fake-model", "prompt": "x" * (limit + 1)}, url="/v1/completions")
    assert completion.status_code == 400 and completion.json()["error"]["param"] == "prompt"
    assert all(size <= limit for size in tokenizer.encoded)  # none of them was tokenized


def test_a_short_prompt_is_not_held_up_by_a_long_one_being_tokenized():
    tokenizer = VocabTokenizer()
    engine = FakeEngine(tokenizer=tokenizer, max_total_tokens=100_000)
    prompts = PromptTokenizer()

    async def scenario() -> list[int]:
        long = asyncio.ensure_future(prompts.encode(engine, "y" * (SHORT_PROMPT_CHARS + 1)))
        await asyncio.get_running_loop().run_in_executor(None, tokenizer.long_started.wait, 30)
        short = await asyncio.wait_for(prompts.encode(engine, "hi"), 30)  # while the long one is still held
        assert not long.done()
        tokenizer.release.set()
        await long
        return short

    try:
        assert asyncio.run(scenario()) == [ord("h"), ord("i")]
    finally:
        tokenizer.release.set()
        prompts.close()


@pytest.mark.slow
def test_the_chars_per_token_bound_of_the_embedded_tokenizer_is_a_true_bound(embedded_model_dir):
    """The bound must never refuse a prompt that fits: every vocabulary entry decodes to at most that many
    characters (checked over the whole vocabulary of the real tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    bound = max_chars_per_token(tokenizer)
    assert bound is not None and 4 <= bound < 200
    longest = max(len(tokenizer.decode([token_id])) for token_id in range(len(tokenizer)))
    assert longest <= bound


def test_outputs_for_a_closed_event_loop_are_dropped_without_an_error():
    """After shutdown the server's event loop is closed while the engine loop still finishes what it held."""
    from handlers.engine import FinishReason, RequestOutput
    from handlers.engine_loop import EventLoopMailbox, OutputStream

    aloop = asyncio.new_event_loop()
    stream = OutputStream(None, "r-1", EventLoopMailbox(aloop))  # type: ignore[arg-type]
    aloop.close()
    stream.deliver(RequestOutput("r-1", (), "", finished=True, finish_reason=FinishReason.ERROR, error="shutting down"))
