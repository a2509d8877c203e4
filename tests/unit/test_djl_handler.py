"""`entrypoint.djl_handler.handle()` driven the way DJL Serving's Python engine drives it, on the fake engine:
an empty initialization call with the model's properties, single requests, batches laid out as DJL's Java
side lays them out (`batch_NNN.` prefixes), and the answers compared with what /invocations returns."""

from __future__ import annotations

import asyncio
import sys
import types
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from entrypoint.configuration import Configuration, load_configuration_from_properties
from entrypoint.http.app import create_app
from entrypoint.http.state import ServerState
from handlers.serving_properties import ServingProperties
from entrypoint.property_sources import COMPAT_ENV, LMI_ENV
from entrypoint import djl_handler as deepspeed
from entrypoint.djl_io import Input, Output, PairList, encode_batch, encode_json, split_batch_output
from handlers.engine_loop import EngineLoop
from tests.support.fake_engine import FakeEngine, expected_text


class Harness:
    """The handler with an injected fake engine factory; `engines` are the engines it built."""

    def __init__(self, tmp_path: Path):
        self.model_dir = tmp_path
        self.engine_kwargs: dict[str, Any] = {}
        self.built: list[tuple[Configuration, FakeEngine]] = []
        self.progress: list[str] = []

    def factory(self, configuration: Configuration, progress) -> FakeEngine:
        progress("loading fake weights")
        self.progress.append("loading fake weights")
        engine = FakeEngine(**self.engine_kwargs)
        self.built.append((configuration, engine))
        return engine

    @property
    def engine(self) -> FakeEngine:
        return self.built[-1][1]

    def init_properties(self, **extra: str) -> dict[str, str]:
        """What DJL passes on the initialization call: options without `option.`, plus its own keys."""
        return {"entryPoint": "djl_python.deepspeed", "model_id": "org/fake-model", "max_rolling_batch_size": "8",
                "model_dir": str(self.model_dir), "device_id": "-1", "tensor_parallel_degree": "1", **extra}

    def initialize(self, **extra: str) -> Output | None:
        return deepspeed.handle(Input(self.init_properties(**extra)))


@pytest.fixture
def djl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in list(os.environ):  # the configuration also reads the environment; keep the test's own
        if name.startswith("OPTION_") or name in LMI_ENV or name in COMPAT_ENV:
            monkeypatch.delenv(name)
    harness = Harness(tmp_path)
    deepspeed.set_engine_factory(harness.factory)
    yield harness
    deepspeed.shutdown()
    deepspeed.set_engine_factory(None)


def request(body: Any, **properties: str) -> Input:
    """One request as DJL sends it: headers as properties, the body under `data`."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    content = PairList()
    content.add("data", data)
    return Input({"Content-Type": "application/json", **properties}, content)


def batch(*bodies: Any) -> Input:
    # DJL's Java side puts the model's properties beside the batch's, unprefixed (djl_python's own test does)
    return encode_batch([request(body, requestId=f"r{i}") for i, body in enumerate(bodies)],
                        {"device_id": "-1", "model_dir": "/opt/ml/model"})


# ---- initialization ---------------------------------------------------------------------------------------
def test_initialization_call_configures_and_builds_the_engine_once(djl):
    assert djl.initialize() is None
    assert len(djl.built) == 1 and djl.progress == ["loading fake weights"]
    configuration, engine = djl.built[0]
    properties = configuration.properties
    assert properties.model_id == "org/fake-model" and properties.entry_point == "entrypoint.djl_handler"
    assert properties.max_rolling_batch_size == 8 and properties.tensor_parallel_degree == 1
    assert configuration.model_dir == djl.model_dir
    assert str(configuration.source_of("model_id")) == "DJL properties"
    assert deepspeed._service.initialized and deepspeed._service.loop.running
    # Later calls carry properties too (DJL adds device_id etc.); nothing initializes again.
    assert deepspeed.handle(Input(djl.init_properties(max_rolling_batch_size="2"))) is None
    assert len(djl.built) == 1 and engine.steps == 0


def test_empty_input_after_initialization_is_none(djl):
    djl.initialize()
    assert deepspeed.handle(Input()) is None
    assert deepspeed.handle(Input({"device_id": "-1"})) is None
    assert djl.engine.added == []


def test_bad_initialization_names_the_key_and_stays_uninitialized(djl):
    output = djl.initialize(max_rolling_batch_size="lots", max_new_token="5")
    assert isinstance(output, Output) and output.get_code() == 400
    message = output.get_message()
    assert "max_rolling_batch_size = 'lots' (from DJL properties): expected a whole number" in message
    assert "max_new_token (from DJL properties): unknown key" in message
    body = output.get_as_json()
    assert body == {"error": message, "message": message, "type": "ConfigurationError", "code": 400}
    assert djl.built == [] and not deepspeed._service.initialized

    # A request before a successful initialization gets that failure; its headers configure nothing.
    again = deepspeed.handle(request({"inputs": "hi"}))
    assert again.get_code() == 400 and again.get_message() == message and djl.built == []

    # DJL initializes again (a restarted worker): with good properties it works.
    assert djl.initialize() is None
    assert deepspeed.handle(request({"inputs": "hi", "parameters": {"max_new_tokens": 2}})).get_as_json() == \
        {"generated_text": expected_text(2)}


def test_bad_entry_point_value_is_rejected(djl):
    output = djl.initialize(entryPoint="djl_python.huggingface")
    assert output.get_code() == 400
    assert "entryPoint (entry_point) = 'djl_python.huggingface' (from DJL properties)" in output.get_message()


def test_engine_load_failure_is_an_error_output(djl):
    def failing(configuration, progress):
        raise RuntimeError("no weights here")

    deepspeed.set_engine_factory(failing)
    output = djl.initialize()
    assert output.get_code() == 500 and "no weights here" in output.get_message()
    assert output.get_as_json()["type"] == "ModelLoadingFailed"
    assert not deepspeed._service.initialized


def test_properties_map_like_serving_properties():
    """DJL's runtime keys are skipped, worker-pool keys warned about, others validated; the environment ranks below."""
    configuration = load_configuration_from_properties(
        {"model_id": "m", "entryPoint": "djl_python.deepspeed", "model_dir": "/models/m", "device_id": "0",
         "handler": "handle", "gpu.maxWorkers": "1", "option.dtype": "fp16", "tensor_parallel_degree": 2,
         "pipeline_parallel_degree": "1"},
        environ={"OPTION_DTYPE": "bf16", "OPTION_MAX_TOKENS": "1024"})
    assert configuration.model_dir == Path("/models/m")
    properties = configuration.properties
    assert (properties.model_id, properties.dtype.value, properties.tensor_parallel_degree, properties.max_tokens) \
        == ("m", "fp16", 2, 1024)
    assert configuration.source_of("max_tokens").kind == "env"
    assert len(configuration.warnings) == 1 and "gpu.maxWorkers (DJL properties): one process group" in \
        configuration.warnings[0]
    assert any("overrides environment variable OPTION_DTYPE" in note for note in configuration.notes)


def test_pipeline_parallelism_is_refused(djl):
    output = djl.initialize(pipeline_parallel_degree="2")
    assert output.get_code() == 400 and "pipeline_parallel_degree" in output.get_message()


# ---- single requests --------------------------------------------------------------------------------------
def test_single_request(djl):
    djl.initialize()
    output = deepspeed.handle(request({"inputs": "hello", "parameters": {"max_new_tokens": 5}}))
    assert output.get_code() == 200 and output.get_property("Content-Type") == "application/json"
    assert output.get_content().get_keys() == [None]
    assert output.get_as_json() == {"generated_text": expected_text(5)}


def test_single_bad_request_is_its_status(djl):
    djl.initialize()
    output = deepspeed.handle(request({"inputs": "hello", "parameters": {"top_p": 0}}))
    assert output.get_code() == 400
    error = output.get_as_json()
    assert error["type"] == "InvalidRequest" and "parameters.top_p = 0 is out of range" in error["message"]
    assert output.get_message() == error["message"]


def test_stream_is_refused(djl):
    djl.initialize()
    output = deepspeed.handle(request({"inputs": "hello", "stream": True}))
    assert output.get_code() == 400 and "stream" in output.get_as_json()["message"]


# ---- batches --------------------------------------------------------------------------------------------
BAD_ITEMS = {
    "bad JSON": (b'{"inputs": "x",', "the request body is not valid JSON"),
    "bad parameter": ({"inputs": "two", "parameters": {"temperature": -1}}, "parameters.temperature = -1"),
    "prompt too long": ({"inputs": "x" * 60, "parameters": {"max_new_tokens": 8}}, "exceeds the limit of 64 tokens"),
}


@pytest.mark.parametrize("bad", list(BAD_ITEMS))
def test_batch_with_a_bad_middle_item(djl, bad):
    djl.engine_kwargs = {"max_total_tokens": 64}
    djl.initialize()
    body, fragment = BAD_ITEMS[bad]
    inputs = batch({"inputs": "one", "parameters": {"max_new_tokens": 6}}, body,
                   {"inputs": "three", "parameters": {"max_new_tokens": 4, "details": True}})
    assert inputs.get_batch_size() == 3 and inputs.get_content().get_keys()[1] == "batch_001.data"

    output = deepspeed.handle(inputs)
    assert output.get_code() == 200  # a batch code >= 300 would fail every request in DJL
    assert output.get_content().get_keys() == ["batch_0.data", "batch_1.data", "batch_2.data"]
    assert [output.get_property(f"batch_{i}_code") for i in range(3)] == ["200", "400", "200"]

    first, middle, last = split_batch_output(output, 3)
    assert first.get_code() == 200 and first.get_as_json() == {"generated_text": expected_text(6)}
    assert middle.get_code() == 400
    error = middle.get_as_json()
    assert error["type"] == "InvalidRequest" and error["code"] == 400 and fragment in error["message"]
    assert last.get_code() == 200
    answer = last.get_as_json()
    assert answer["generated_text"] == expected_text(4) and answer["details"]["finish_reason"] == "length"
    # Both good requests were submitted together: they shared the engine's steps (6, not 6 + 4).
    assert len(djl.engine.added) == 2 and djl.engine.steps == 6


def test_batch_item_failing_in_the_engine_fails_alone(djl):
    djl.initialize()
    output = deepspeed.handle(batch({"inputs": "ok", "parameters": {"max_new_tokens": 3}},
                                    {"inputs": "[fail] me", "parameters": {"max_new_tokens": 3}}))
    good, failed = split_batch_output(output, 2)
    assert good.get_code() == 200 and good.get_as_json() == {"generated_text": expected_text(3)}
    assert failed.get_code() == 424
    assert failed.get_as_json() == {"error": "fake engine failed this request", "message": "fake engine failed this request",
                                    "type": "GenerationError", "code": 424, "generated_text": None,
                                    "details": {"finish_reason": "error", "generated_tokens": None, "inputs": None}}


def test_batch_of_one_and_list_inputs(djl):
    djl.initialize()
    output = deepspeed.handle(batch({"inputs": ["a", "bb"], "parameters": {"max_new_tokens": 2}}))
    (only,) = split_batch_output(output, 1)
    assert only.get_code() == 200 and only.get_as_json() == [{"generated_text": expected_text(2)}] * 2


# ---- the same answers as /invocations ----------------------------------------------------------------------
SAME_AS_HTTP = [
    {"inputs": "hello", "parameters": {"max_new_tokens": 5}},
    {"inputs": "Q:", "parameters": {"return_full_text": True, "stop": ["de"], "details": True}},
    {"inputs": ["a", "bb", "ccc"], "parameters": {"max_new_tokens": 3}},
    {"inputs": "hi", "parameters": {"max_new_tokens": 4, "do_sample": True, "seed": 3, "top_n_tokens": 0}},
    {"inputs": "hi", "parameters": {"max_new_tokens": 0}},
    {"inputs": "hi", "parameters": {"temprature": 0.5}},
    {"inputs": ["ok", "x" * 5000]},
    {"inputs": 5},
    {"prompt": "hi"},
    {"inputs": "[fail] this one"},
    {"inputs": []},
]


def invocations(bodies: list[Any]) -> list[httpx.Response]:
    """What /invocations answers for each body, on its own fake engine."""
    properties = ServingProperties(model_id="org/fake-model")
    state = ServerState("fake-model")
    loop = EngineLoop(FakeEngine(), job_queue_size=properties.job_queue_size,
                      predict_timeout=properties.predict_timeout).start()
    state.set_ready(loop)
    app = create_app(Configuration(properties=properties, sources={}, model_dir=Path("/nonexistent")), state)

    async def post_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return [await client.post("/invocations", content=encode_json(body),
                                      headers={"Content-Type": "application/json"}) for body in bodies]
    try:
        return asyncio.run(post_all())
    finally:
        loop.stop()


def test_answers_equal_what_invocations_returns(djl):
    djl.initialize()
    expected = invocations(SAME_AS_HTTP)
    singles = [deepspeed.handle(request(body)) for body in SAME_AS_HTTP]
    batched = split_batch_output(deepspeed.handle(batch(*SAME_AS_HTTP)), len(SAME_AS_HTTP))
    assert {response.status_code for response in expected} >= {200, 400, 424}
    for body, response, single, item in zip(SAME_AS_HTTP, expected, singles, batched, strict=True):
        assert single.get_code() == item.get_code() == response.status_code, body
        assert bytes(single.get_as_bytes()) == bytes(item.get_as_bytes()) == response.content, body


# ---- djl_io -----------------------------------------------------------------------------------------------
def test_input_decodes_the_batch_layout_of_djl_java():
    content = PairList()
    content.add("batch_000.data", b'{"inputs": "a"}')
    content.add("batch_001.data", b'{"inputs": "b"}')
    content.add("batch_001.seed", b"42")
    inputs = Input({"batch_size": "2", "batch_000.Content-Type": "application/json",
                    "batch_001.content-type": "text/plain", "device_id": "0"}, content)
    assert inputs.is_batch() and inputs.get_batch_size() == 2 and not inputs.is_empty()
    first, second = inputs.get_batches()
    assert first.get_properties() == {"Content-Type": "application/json"}
    assert second.get_property("CONTENT-TYPE") == "text/plain"
    assert first.get_as_json() == {"inputs": "a"}
    assert second.get_as_string() == '{"inputs": "b"}' and second.get_as_string("seed") == "42"
    assert second.contains_key("seed") and not first.contains_key("seed")
    with pytest.raises(KeyError):
        first.get_as_bytes("seed")
    single = Input({"Content-Type": "application/json"}, content)
    assert not single.is_batch() and single.get_batches() == [single]
    assert single.get_as_bytes() == b'{"inputs": "a"}'  # no "data" key: the first value
    assert Input().is_empty() and Input().get_as_bytes() is None


def test_output_keys_properties_and_error():
    output = Output().add("text", key="a").add(b"raw", batch_index=3).add_as_json({"x": 1}, key="data", batch_index=0)
    assert output.get_content().get_keys() == ["a", "batch_3.", "batch_0.data"]
    assert output.get_as_string("a") == "text" and output.get_as_json("batch_0.data") == {"x": 1}
    assert output.add_property("k", "v").get_property("k") == "v"
    failed = Output().error("boom", code=503, message="unavailable")
    assert (failed.get_code(), failed.get_message()) == (503, "unavailable")
    assert failed.get_as_json() == {"code": 503, "message": "unavailable", "error": "boom"}
    assert json.loads(str(failed))["code"] == 503
    assert Output().set_code(204).set_message("No content").get_code() == 204


# ---- inside DJL Serving: djl_python's own classes ----------------------------------------------------------------
class DjlPythonOutput:
    """A stand-in for `djl_python.outputs.Output`, written from its interface (constructor, add_property, add,
    add_as_json with key and batch_index; JSON indented by 2 as djl_python writes it): another class than ours,
    as DJL's is."""

    def __init__(self, code: int = 200, message: str = "OK"):
        self.code, self.message, self.properties, self.content = code, message, {}, PairList()

    def add_property(self, key: str, val: str) -> "DjlPythonOutput":
        self.properties[key] = val
        return self

    def add(self, value: Any, key: str | None = None, batch_index: int | None = None) -> "DjlPythonOutput":
        if batch_index is not None:
            key = f"batch_{batch_index}.{'' if key is None else key}"
        data = value.encode() if isinstance(value, str) else value if isinstance(value, (bytes, bytearray)) \
            else json.dumps(value, indent=2).encode()
        self.content.add(key, bytearray(data))
        return self

    def add_as_json(self, val: Any, key: str | None = None, batch_index: int | None = None) -> "DjlPythonOutput":
        return self.add(json.dumps(val, indent=2).encode(), key=key, batch_index=batch_index)

    def error(self, error: str, code: int = 424, message: str = "invoke handler failure") -> "DjlPythonOutput":
        self.code, self.message = code, message
        return self.add_as_json({"code": code, "message": message, "error": error})


def djl_engine_loop(handler, inputs: Input, output_class: type) -> Any:
    """DJL's Python engine loop (djl_python/python_sync_engine.py) around one call: what it does with the
    answer of `handle` before it goes back to the Java side."""
    outputs = handler(inputs)
    if outputs is None:
        return output_class(code=204, message="No content")
    if not isinstance(outputs, output_class):
        return output_class().error(f"Invalid output type: {type(outputs)}")
    return outputs


@pytest.fixture
def djl_python(monkeypatch: pytest.MonkeyPatch):
    """`djl_python` importable, as inside DJL Serving."""
    package = types.ModuleType("djl_python")
    package.__path__ = []  # a package
    outputs = types.ModuleType("djl_python.outputs")
    outputs.Output = DjlPythonOutput
    package.outputs = outputs
    monkeypatch.setitem(sys.modules, "djl_python", package)
    monkeypatch.setitem(sys.modules, "djl_python.outputs", outputs)
    return DjlPythonOutput


def test_inside_djl_serving_handle_answers_with_djl_pythons_output(djl, djl_python):
    assert djl_engine_loop(deepspeed.handle, Input(djl.init_properties()), djl_python).code == 204
    single = djl_engine_loop(deepspeed.handle, request({"inputs": "hi", "parameters": {"max_new_tokens": 3}}),
                             djl_python)
    assert single.code == 200 and json.loads(bytes(single.content.get("data") or single.content.value_at(0))) == {
        "generated_text": expected_text(3)}
    bad = djl_engine_loop(deepspeed.handle, request({"inputs": 5}), djl_python)
    assert bad.code == 400 and "inputs = 5" in json.loads(bytes(bad.content.value_at(0)))["error"]
    answer = djl_engine_loop(deepspeed.handle, batch({"inputs": "a", "parameters": {"max_new_tokens": 2}},
                                                     {"inputs": "b", "parameters": {"max_new_tokens": 1}}), djl_python)
    assert isinstance(answer, DjlPythonOutput) and answer.content.get_keys() == ["batch_0.data", "batch_1.data"]
    assert json.loads(bytes(answer.content.value_at(1))) == {"generated_text": expected_text(1)}


def test_a_failed_initialization_inside_djl_serving_is_djl_pythons_output(djl, djl_python):
    answer = djl_engine_loop(deepspeed.handle, Input(djl.init_properties(max_rolling_batch_size="lots")), djl_python)
    assert isinstance(answer, DjlPythonOutput) and answer.code == 400


def test_without_djl_python_handle_answers_with_our_compatible_output(djl):
    assert "djl_python" not in sys.modules
    djl.initialize()
    answer = djl_engine_loop(deepspeed.handle, request({"inputs": "hi", "parameters": {"max_new_tokens": 2}}), Output)
    assert answer.get_code() == 200 and answer.get_as_json() == {"generated_text": expected_text(2)}
