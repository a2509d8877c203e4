"""`entrypoint.djl_handler.handle()` on the real engine and the embedded SmolLM2-135M-Instruct, driven the way
DJL Serving's Python engine drives it: one initialization call with the model's properties, then batches
laid out as DJL's Java side lays them out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from entrypoint.property_sources import COMPAT_ENV, LMI_ENV
from entrypoint import djl_handler as deepspeed
from entrypoint.djl_io import Input, Output, PairList, encode_batch, split_batch_output

pytestmark = pytest.mark.slow

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
FRANCE = {"inputs": CHAT.format("What is the capital of France?"), "parameters": {"max_new_tokens": 24}}
COLORS = {"inputs": CHAT.format("Name three colors."), "parameters": {"max_new_tokens": 24, "details": True}}


def request(body: dict | bytes) -> Input:
    content = PairList()
    content.add("data", body if isinstance(body, bytes) else json.dumps(body).encode())
    return Input({"Content-Type": "application/json"}, content)


@pytest.fixture(scope="module")
def handler(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    saved = {name: os.environ.pop(name) for name in list(os.environ)
             if name.startswith("OPTION_") or name in LMI_ENV or name in COMPAT_ENV}
    deepspeed.set_engine_factory(None)  # the real engine
    properties = {"entryPoint": "djl_python.deepspeed", "model_id": str(embedded_model_dir),
                  "max_rolling_batch_size": "4", "max_tokens": "512", "device_id": "-1",
                  "model_dir": str(tmp_path_factory.mktemp("djl-model-dir")), "tensor_parallel_degree": "1"}
    try:
        assert deepspeed.handle(Input(properties)) is None
        yield deepspeed
    finally:
        deepspeed.shutdown()
        os.environ.update(saved)


def test_empty_input_after_initialization_is_none(handler):
    assert handler.handle(Input({"device_id": "-1"})) is None


def test_batch_of_two_answers_and_matches_each_request_alone(handler):
    output = handler.handle(encode_batch([request(FRANCE), request(COLORS)]))
    assert output.get_code() == 200
    france, colors = split_batch_output(output, 2)
    assert france.get_code() == 200 and colors.get_code() == 200
    answer = france.get_as_json()["generated_text"]
    assert "Paris" in answer, answer
    assert colors.get_as_json()["generated_text"].strip()
    assert colors.get_as_json()["details"]["generated_tokens"] > 0

    alone = [handler.handle(request(body)) for body in (FRANCE, COLORS)]
    assert [out.get_code() for out in alone] == [200, 200]
    assert alone[0].get_as_json() == france.get_as_json()
    # Greedy: the same text and tokens; log-probabilities only up to float rounding of batched vs single math.
    single, batched = alone[1].get_as_json(), colors.get_as_json()
    assert single["generated_text"] == batched["generated_text"]
    assert {**single["details"], "tokens": None} == {**batched["details"], "tokens": None}
    assert [(t["id"], t["text"], t.get("special_token", False)) for t in single["details"]["tokens"]] == \
        [(t["id"], t["text"], t.get("special_token", False)) for t in batched["details"]["tokens"]]
    assert [t["log_prob"] for t in single["details"]["tokens"]] == \
        pytest.approx([t["log_prob"] for t in batched["details"]["tokens"]], abs=1e-3)


def test_a_bad_item_fails_alone(handler):
    too_long = {"inputs": "word " * 600, "parameters": {"max_new_tokens": 8}}
    output = handler.handle(encode_batch([request(FRANCE), request(too_long), request(b"not json")]))
    good, long_prompt, not_json = split_batch_output(output, 3)
    assert good.get_code() == 200 and "Paris" in good.get_as_json()["generated_text"]
    assert long_prompt.get_code() == 400 and "exceeds the limit" in long_prompt.get_as_json()["message"]
    assert not_json.get_code() == 400 and "not valid JSON" in not_json.get_as_json()["message"]
    assert isinstance(output, Output) and output.get_code() == 200
