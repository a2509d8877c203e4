"""Drop-in compatibility of the LMI routes and their request validation,
on the fake engine: what LMI's clients send and look for, per LMI's schema documentation
(djl-serving lmi_input_output_schema.md) and its integration-test client (tests/integration/llm/client.py)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from entrypoint.protocol.validation import IGNORED_FIELDS
from handlers.engine import SamplingParams, Token
from tests.support.fake_engine import FakeEngine, expected_text
from tests.unit.test_http_app import Served, assert_error, json_lines, sse_events


@pytest.fixture
def serve():
    made: list[Served] = []

    def make(engine: FakeEngine | None = None, **properties: Any) -> Served:
        made.append(Served(engine or FakeEngine(), **properties))
        return made[-1]

    yield make
    for s in made:
        s.close()


def lmi_client_sees_a_failure(response) -> bool:
    """djl-serving's tests/integration/llm/client.py `response_checker`, which LMI users' checks follow."""
    content_type = response.headers["content-type"].split(";")[0]
    text = response.text
    if content_type == "application/json":
        output = json.loads(text.split("\n")[0])
    else:
        lines = [json.loads(line[6:] if line.startswith("data: ") else line)
                 for line in text.split("\n") if line.strip()]
        output = lines[-1]
    if isinstance(output, dict):
        if output.get("details") is not None:
            return output["details"]["finish_reason"] == "error"
        return output.get("code", 200) != 200
    return False


# ---- unknown fields --------------------------------------------------------------------------------------------
def test_fields_lmi_clients_send_are_accepted_and_ignored(serve, caplog):
    served = serve()
    body = {"inputs": "hi", "adapters": [], "client_tag": "x",
            "parameters": {"max_new_tokens": 3, "decoder_input_details": False, "n": 1, "best_of": 1, "logprobs": 1,
                           "top_k": -1, "num_beams": 1, "use_beam_search": False, "min_p": 0.0}}
    with caplog.at_level(logging.DEBUG, logger="lmi.http"):
        first = served.post(body)
        second = served.post(body)
    assert first.status_code == second.status_code == 200 and first.json() == {"generated_text": expected_text(3)}
    logged = [r.getMessage() for r in caplog.records if "ignoring the request field" in r.getMessage()]
    assert any("'client_tag'" in m for m in logged) and any("'parameters.min_p'" in m for m in logged)
    assert sum("'parameters.min_p'" in m for m in logged) <= 1  # once per name (and process)
    metrics = served.request("GET", "/metrics").text
    assert 'lmi_ignored_request_fields_total{api="lmi"} 6.0' in metrics  # 3 fields x 2 requests


def test_the_ignored_field_log_remembers_a_bounded_number_of_names():
    """Clients choose the names: a stream of new ones must not grow the server's memory."""
    IGNORED_FIELDS.note("lmi", [f"junk{i}" for i in range(IGNORED_FIELDS.MAX_REMEMBERED)])
    size = len(IGNORED_FIELDS._seen)
    IGNORED_FIELDS.note("lmi", [f"more{i}" for i in range(100)])
    assert size >= IGNORED_FIELDS.MAX_REMEMBERED and len(IGNORED_FIELDS._seen) == size


@pytest.mark.parametrize("body, fragments", [
    ({"inputs": "hi", "parameters": {"max_new_tokens": True}}, ["parameters.max_new_tokens = true", "number"]),
    ({"inputs": "hi", "parameters": {"temperature": False}}, ["parameters.temperature = false", "number"]),
    ({"inputs": "hi", "parameters": {"details": "yes"}}, ["parameters.details = \"yes\"", "true or false"]),
    ({"inputs": "hi", "parameters": {"do_sample": 1}}, ["parameters.do_sample = 1", "true or false"]),
    ({"inputs": "hi", "stream": "yes"}, ["stream = \"yes\"", "true or false"]),
    ({"inputs": "hi", "parameters": {"top_k": -2}}, ["parameters.top_k = -2", ">= -1"]),
    ({"inputs": "hi", "parameters": {"stop": "a", "stop_sequences": ["b"]}},
     ["parameters.stop and parameters.stop_sequences mean the same"]),
    ({"inputs": "hi", "parameters": {"stop": 5}}, ["parameters.stop = 5"]),
    ({"inputs": "hi", "parameters": {"n": 3, "best_of": 2}}, ["parameters.best_of = 2", "at least parameters.n"]),
    ({"inputs": "hi", "stream": True, "parameters": {"n": 2}}, ["not streamed"]),
    ({"inputs": "hi", "parameters": {"num_beams": 4}}, ["parameters.num_beams = 4", "<= 1", "beam search"]),
    ({"inputs": "hi", "parameters": {"n": 1000}}, ["parameters.n = 1000", "<= 128"]),
    ({"inputs": "hi", "adapters": ["my-lora"]}, ["adapters", "not served"]),
    ({"inputs": "hi", "parameters": []}, ["parameters", "JSON object"]),
])
def test_wrong_types_and_values_of_known_fields_stay_400_naming_the_field(serve, body, fragments):
    response = serve().post(body)
    assert_error(response, 400, "InvalidRequest", *fragments)
    if "stop" in body.get("parameters", {}):
        assert "stop_sequences and parameters.stop_sequences" not in response.json()["message"]
        assert response.json()["message"].startswith("parameters.stop")


def test_numeric_strings_stay_accepted_as_lmi_accepts_them(serve):
    assert serve().post({"inputs": "hi", "parameters": {"max_new_tokens": "3"}}).json() == {
        "generated_text": expected_text(3)}


# ---- defaults and parameter semantics ------------------------------------------------------------------------
def test_max_new_tokens_defaults_to_lmis_30(serve):
    assert serve().post({"inputs": "hi"}).json() == {"generated_text": expected_text(30)}


@pytest.mark.parametrize("parameters, sampled", [
    ({"temperature": 0.7}, True), ({"top_p": 0.9}, True), ({"top_k": 5}, True),
    ({"temperature": 0.7, "do_sample": False}, False), ({}, False), ({"top_k": -1}, False),
    ({"temperature": 0}, False), ({"do_sample": True}, True),
])
def test_sampling_parameters_turn_sampling_on_without_do_sample(serve, parameters, sampled):
    """LMI 0.32+: do_sample is inferred from the other sampling parameters (the fake engine's text shifts by
    the seed only when it samples)."""
    body = serve().post({"inputs": "hi", "parameters": {"max_new_tokens": 4, "seed": 3, **parameters}}).json()
    assert body["generated_text"] == expected_text(4, seed=3 if sampled else 0)


def test_a_tiny_temperature_decodes_greedily(serve):
    params = SamplingParams(do_sample=True, temperature=1e-300)
    assert params.greedy and not SamplingParams(do_sample=True, temperature=1e-4).greedy
    body = serve().post({"inputs": "hi", "parameters": {"max_new_tokens": 4, "seed": 3, "temperature": 1e-300,
                                                        "do_sample": True}})
    assert body.status_code == 200 and body.json()["generated_text"] == expected_text(4)


# ---- inputs ---------------------------------------------------------------------------------------------------
def test_streaming_a_one_element_list_streams_it(serve):
    lines = json_lines(serve().post({"inputs": ["hi"], "stream": True, "parameters": {"max_new_tokens": 3}}))
    assert [line["token"]["text"] for line in lines] == list(expected_text(3))
    assert lines[-1]["generated_text"] == expected_text(3)


@pytest.mark.parametrize("route, body", [
    ("/invocations", '{"inputs": "hi \\ud800 there"}'),
    ("/invocations", '{"inputs": "hi", "parameters": {"stop": ["\\udfff"]}}'),
    ("/v1/completions", '{"prompt": "hi \\ud800"}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud83d"}]}'),
])
def test_a_lone_surrogate_is_a_400_naming_where_it_is(serve, route, body):
    response = serve().request("POST", route, content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    text = json.dumps(response.json())
    assert "surrogate" in text and ("inputs" in text or "prompt" in text or "messages[0].content" in text
                                    or "parameters.stop[0]" in text)


def test_truncate_keeps_the_last_prompt_tokens(serve):
    served = serve()
    body = served.post({"inputs": "abcdef", "parameters": {"max_new_tokens": 1, "truncate": 2, "details": True,
                                                            "decoder_input_details": True}}).json()
    assert [token["text"] for token in body["details"]["prefill"]] == ["e", "f"]
    assert body["details"]["inputs"] == "abcdef"


# ---- responses ------------------------------------------------------------------------------------------------
def test_details_carry_inputs_prefill_and_special_token_as_lmi(serve):
    body = serve(FakeEngine(eos_at=3)).post(
        {"inputs": "hey", "parameters": {"details": True, "decoder_input_details": True}}).json()
    details = body["details"]
    assert details["inputs"] == "hey"
    assert details["prefill"] == [{"id": ord("h"), "text": "h", "log_prob": None},
                                  {"id": ord("e"), "text": "e", "log_prob": -1.0},
                                  {"id": ord("y"), "text": "y", "log_prob": -1.0}]
    assert details["tokens"][0] == {"id": ord("a"), "text": "a", "log_prob": -0.5}  # no "special": false
    assert details["tokens"][-1]["special_token"] is True


@pytest.mark.parametrize("stream", [False, True])
def test_tokens_join_to_generated_text_with_a_stop_sequence(serve, stream):
    body = {"inputs": "hi", "stream": stream, "parameters": {"stop": ["cd"], "details": True, "max_new_tokens": 10}}
    response = serve().post(body)
    if stream:
        lines = json_lines(response)
        texts = [line["token"]["text"] for line in lines]
        final = lines[-1]
    else:
        final = response.json()
        texts = [token["text"] for token in final["details"]["tokens"]]
    assert final["generated_text"] == "ab" and "".join(texts) == "ab"
    assert final["details"]["finish_reason"] == "stop_sequence"


def test_a_stream_line_carries_the_tokens_own_text(serve):
    """Each line's text is its token's, also while the engine holds text back for a possible stop sequence."""
    lines = json_lines(serve().post({"inputs": "hi", "stream": True,
                                     "parameters": {"stop": ["bx"], "max_new_tokens": 4}}))
    assert [line["token"]["text"] for line in lines] == ["a", "b", "c", "d"]
    assert lines[-1]["generated_text"] == "abcd"


def test_error_bodies_have_lmis_shape_and_lmi_clients_see_them(serve):
    served = serve()
    bad = served.post({"inputs": "hi", "parameters": {"top_p": 2}})
    assert bad.status_code == 400 and bad.json()["code"] == 400 and "parameters.top_p" in bad.json()["error"]
    assert lmi_client_sees_a_failure(bad)
    failed = served.post({"inputs": "[fail] x"})
    assert failed.status_code == 424 and lmi_client_sees_a_failure(failed)
    assert failed.json()["generated_text"] is None and failed.json()["details"]["finish_reason"] == "error"
    assert not lmi_client_sees_a_failure(served.post({"inputs": "ok", "parameters": {"details": True}}))


@pytest.mark.parametrize("sse", [False, True])
def test_a_failure_in_the_middle_of_a_stream_is_recognised_by_lmi_clients(serve, sse):
    headers = {"Accept": "text/event-stream"} if sse else {}
    response = serve(FakeEngine(fail_at_step=3)).post({"inputs": "hi", "stream": True}, headers=headers)
    assert response.status_code == 200
    lines = sse_events(response) if sse else json_lines(response)
    assert [line["token"]["text"] for line in lines[:2]] == ["a", "b"]
    last = lines[-1]
    assert last["token"] == {"id": -1, "text": "", "log_prob": -1, "special_token": True,
                             "error_msg": last["error"]}
    assert last["details"]["finish_reason"] == "error" and last["code"] == 424 and "crashed" in last["error"]
    if not sse:
        assert lmi_client_sees_a_failure(response)


class LaterLettersLikelier(FakeEngine):
    """Log-probabilities grow with the letter, so sequences of different seeds rank differently."""

    def _out(self, active, token, reason):  # type: ignore[override]
        if token is not None:
            token = Token(token.id, token.text, -1.0 + (token.id - ord("a")) * 0.0384, token.special, token.top_tokens)
        return super()._out(active, token, reason)


def test_n_and_best_of_return_the_best_sequence_and_the_next_ones_as_lmi(serve):
    served = serve(LaterLettersLikelier())
    body = served.post({"inputs": "hi", "parameters": {"max_new_tokens": 3, "do_sample": True, "seed": 1,
                                                        "best_of": 3, "n": 2}}).json()
    # seeds 1, 2, 3 start at b, c, d: d... is the likeliest, c... next
    assert body["generated_text"] == expected_text(3, seed=3)
    others = body["details"]["best_of_sequences"]
    assert [other["generated_text"] for other in others] == [expected_text(3, seed=2)]
    assert others[0]["finish_reason"] == "length" and len(others[0]["tokens"]) == 3
    assert len(served.engine.added) == 3
    listed = served.post({"inputs": ["x", "y"], "parameters": {"max_new_tokens": 2, "do_sample": True, "seed": 0,
                                                                "best_of": 2, "n": 1}}).json()
    assert [item["generated_text"] for item in listed] == [expected_text(2, seed=1)] * 2
    assert all("details" not in item for item in listed)  # one returned: the plain response
