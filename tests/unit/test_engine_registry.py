"""Adding an engine is this module and one registry entry: a stand-in engine, registered here and nowhere
else, is planned, built by the engine factory (and falls back when it refuses) and loaded on the ranks
above 0, with no other change to the planner, the factory or the rank launcher."""

from __future__ import annotations

import dataclasses
import logging
from types import MappingProxyType, SimpleNamespace

import pytest

from entrypoint import engine_factory, rank
from handlers import engine_registry
from handlers.engine_plan import Device, plan_engine
from handlers.engine_policy import AUTOTP, EnginePolicy, works
from handlers.engine_registry import EngineEntry
from handlers.serving_properties import ServingProperties

STAND_IN = "stand_in"
CPU = Device("cpu", 1, "test CPU")
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_attention_heads": 8,
         "num_key_value_heads": 8, "hidden_size": 64, "num_hidden_layers": 2, "max_position_embeddings": 512}
loaded: list[tuple[str, object]] = []


class StandInRefuses(Exception):
    """The stand-in engine checked the model and cannot serve it."""


def load_stand_in(properties, plan, model_path, progress, description=""):
    loaded.append(("engine", plan))
    if properties.model_id == "refused":
        raise StandInRefuses("the stand-in cannot serve this model")
    return SimpleNamespace(name=STAND_IN, plan=plan)


def load_stand_in_rank(properties, plan, model_path, progress):
    loaded.append(("rank", plan))
    return SimpleNamespace(runner="stand-in runner", groups="stand-in groups", weights_bytes=123)


ENTRY = EngineEntry(
    name=STAND_IN,
    title="the stand-in",
    summary="a stand-in engine that serves any model on CPU",
    devices=frozenset({"cpu"}),
    dtypes=frozenset({"fp32"}),
    dtype_reason="it computes in fp32 only",
    continuous_batching=True,
    batching_reason="it batches continuously",
    policy=EnginePolicy(preference_reason="the stand-in is preferred in this test",
                        unknown=works("the stand-in serves any architecture"),
                        quantization=MappingProxyType({})),
    loader=load_stand_in,
    rank_loader=load_stand_in_rank,
    refusal=StandInRefuses,
)


@pytest.fixture(autouse=True)
def stand_in_registered():
    loaded.clear()
    engine_registry.register(ENTRY, before=AUTOTP)
    yield
    engine_registry.unregister(STAND_IN)
    assert STAND_IN not in engine_registry.engines()


@pytest.fixture
def factory_plans_on_cpu(monkeypatch):
    """The factory's model resolution and device, pretended; its planning and loading are the real ones."""
    resolved = SimpleNamespace(path="/models/llama", description="test llama")

    def plan(configuration, resolved, failed=None):
        return plan_engine(configuration.properties, LLAMA, CPU, available=engine_registry.built(),
                           quantizers=engine_factory.QUANTIZERS, failed=failed)

    monkeypatch.setattr(engine_factory, "_plan", plan)
    monkeypatch.setattr(engine_factory, "resolve_and_plan",
                        lambda configuration, progress: (resolved, plan(configuration, resolved)))


def test_the_planner_prefers_the_stand_in_where_it_was_registered():
    assert engine_registry.preference("cpu") == (STAND_IN, AUTOTP)
    assert STAND_IN in engine_registry.built()
    plan = plan_engine(ServingProperties(), LLAMA, CPU)
    assert plan.engine == STAND_IN and plan.rolling_batch
    assert plan.reason.startswith("a stand-in engine that serves any model on CPU; the preferred engine on CPU")
    assert dict(plan.ruled_out)[AUTOTP].startswith("ranks below stand_in on CPU: AutoTP runs the HF layers")
    bf16 = plan_engine(ServingProperties(dtype="bf16"), LLAMA, CPU)
    assert bf16.engine == AUTOTP
    assert dict(bf16.ruled_out)[STAND_IN] == "dtype bf16 is not supported: it computes in fp32 only"


def test_the_engine_factory_builds_the_stand_in(factory_plans_on_cpu):
    configuration = SimpleNamespace(properties=ServingProperties())
    engine = engine_factory.build_engine(configuration, lambda text: None)
    assert engine.name == STAND_IN and [kind for kind, _ in loaded] == ["engine"]


def test_the_stand_ins_refusal_falls_back_to_the_next_engine(factory_plans_on_cpu, caplog):
    autotp = engine_registry.register(dataclasses.replace(
        engine_registry.entry(AUTOTP), loader=lambda *args: SimpleNamespace(name=AUTOTP, plan=args[1])))
    configuration = SimpleNamespace(properties=ServingProperties(model_id="refused"))
    try:
        with caplog.at_level(logging.INFO):
            engine = engine_factory.build_engine(configuration, lambda text: None)
    finally:
        engine_registry.register(autotp)
    assert engine.name == AUTOTP
    assert dict(engine.plan.ruled_out)[STAND_IN] == ("tried first and could not serve this model: the stand-in "
                                                     "cannot serve this model")
    assert "Traceback" not in caplog.text  # its own refusal is one line


def test_ranks_above_0_load_the_stand_in(monkeypatch, factory_plans_on_cpu):
    followed = []
    monkeypatch.setattr("signal.signal", lambda *args: None)  # serve_worker ignores SIGTERM; not in pytest
    monkeypatch.setattr("handlers.tensor_parallel.worker_loop",
                        lambda runner, groups: followed.append((runner, groups)))
    configuration = SimpleNamespace(properties=ServingProperties(tensor_parallel_degree=2))
    assert rank.serve_worker(configuration) == 0
    assert [(kind, plan.engine, plan.tensor_parallel_degree) for kind, plan in loaded] == [("rank", STAND_IN, 2)]
    assert followed == [("stand-in runner", "stand-in groups")]
