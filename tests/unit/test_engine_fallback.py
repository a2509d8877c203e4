"""The engine factory's fallback: when the planned engine finds at load time that it cannot serve the model
(FastGen: its correctness gate fails, its ops do not build, a config it cannot express), the model is planned
again without it and the next engine the policy allows serves; the log says why. An engine without a
fallback (AutoTP) fails the start-up as before."""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import pytest

from entrypoint import engine_factory
from handlers import engine_registry
from handlers.engine_plan import Device, plan_engine
from handlers.fastgen_model import FastGenUnsupported
from handlers.serving_properties import ServingProperties

GPU = Device("cuda", 1, "test GPU")
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_attention_heads": 32,
         "num_key_value_heads": 32, "hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 32000,
         "max_position_embeddings": 4096, "torch_dtype": "float16"}


@pytest.fixture
def planned_on_a_gpu(monkeypatch):
    """The factory's planning on a (pretend) GPU for a Llama config; the builders are the test's."""
    configuration = SimpleNamespace(properties=ServingProperties())
    resolved = SimpleNamespace(path="/models/llama", description="test llama")

    def plan(configuration, resolved, failed=None):
        return plan_engine(configuration.properties, LLAMA, GPU, available=engine_registry.built(),
                           quantizers=engine_factory.QUANTIZERS, failed=failed)

    # the pretend GPU machine has deepspeed-kernels, so the plan names FastGen first (test_engine_plan.py
    # covers the machine without it)
    monkeypatch.setattr("handlers.engine_plan.module_importable", lambda name: True)
    monkeypatch.setattr("handlers.fastgen_readiness.fastgen_ops_unavailable", lambda: None)
    monkeypatch.setattr(engine_factory, "_plan", plan)
    monkeypatch.setattr(engine_factory, "resolve_and_plan",
                        lambda configuration, progress: (resolved, plan(configuration, resolved)))
    return configuration


@pytest.fixture
def loaders():
    """Replaces registered engines' loaders with the test's; the registry is as it was afterwards."""
    replaced = []

    def use(**fakes):
        for name, fake in fakes.items():
            replaced.append(engine_registry.register(dataclasses.replace(engine_registry.entry(name), loader=fake)))

    yield use
    for original in replaced:
        engine_registry.register(original)


def test_a_failed_correctness_gate_falls_back_to_autotp_and_says_why(planned_on_a_gpu, loaders, caplog):
    built = []

    def fastgen(properties, plan, path, progress, description):
        built.append(plan.engine)
        raise FastGenUnsupported("correctness gate FAILED (tolerance 2x): 600 positions: 11.20x")

    def autotp(properties, plan, path, progress, description):
        built.append(plan.engine)
        return SimpleNamespace(name="autotp", plan=plan)

    loaders(fastgen=fastgen, autotp=autotp)
    with caplog.at_level(logging.INFO):
        engine = engine_factory.build_engine(planned_on_a_gpu, lambda text: None)
    assert built == ["fastgen", "autotp"] and engine.name == "autotp"
    assert dict(engine.plan.ruled_out)["fastgen"] == ("tried first and could not serve this model: correctness gate "
                                                      "FAILED (tolerance 2x): 600 positions: 11.20x")
    assert "the fastgen engine cannot serve this model" in caplog.text and "11.20x" in caplog.text
    assert "Traceback" not in caplog.text  # an expected refusal is one line, not a stack trace


def test_an_unexpected_fastgen_error_also_falls_back_with_its_traceback(planned_on_a_gpu, loaders, caplog):
    def fastgen(*_):
        raise RuntimeError("Error building extension 'ragged_device_ops'")

    loaders(fastgen=fastgen, autotp=lambda *args: SimpleNamespace(name="autotp"))
    with caplog.at_level(logging.INFO):
        assert engine_factory.build_engine(planned_on_a_gpu, lambda text: None).name == "autotp"
    assert "ragged_device_ops" in caplog.text
    assert any(record.exc_info for record in caplog.records)


def test_autotp_has_no_fallback_its_error_ends_the_start_up(planned_on_a_gpu, loaders):
    def fastgen(*_):
        raise FastGenUnsupported("sliding_window=4096 is shorter than max_tokens=8192")

    def autotp(*_):
        raise MemoryError("no memory is left for the KV cache")

    loaders(fastgen=fastgen, autotp=autotp)
    with pytest.raises(MemoryError, match="KV cache"):
        engine_factory.build_engine(planned_on_a_gpu, lambda text: None)


def test_int8_that_fastgen_cannot_serve_is_served_by_autotps_int8_layers(planned_on_a_gpu, loaders):
    planned_on_a_gpu.properties = ServingProperties(quantize="dynamic_int8")
    seen = []

    def fastgen(properties, plan, path, progress, description):
        seen.append((plan.engine, plan.quantize))
        raise FastGenUnsupported("correctness gate FAILED (tolerance 2x): 48 positions: 3.10x")

    def autotp(properties, plan, path, progress, description):
        seen.append((plan.engine, plan.quantize))
        return SimpleNamespace(name="autotp", plan=plan)

    loaders(fastgen=fastgen, autotp=autotp)
    engine = engine_factory.build_engine(planned_on_a_gpu, lambda text: None)
    assert seen == [("fastgen", "dynamic_int8"), ("autotp", "dynamic_int8")] and engine.name == "autotp"
