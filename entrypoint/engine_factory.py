"""From a validated configuration to a running engine: resolve the model, plan, build the planned engine."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)


def build_engine(configuration: Any, progress: Callable[[str], None]) -> Any:
    """Resolve the model (downloading or converting it if needed), plan the engine and load it."""
    resolved, plan = resolve_and_plan(configuration, progress)
    builder = ENGINE_BUILDERS.get(plan.engine)
    if builder is None:
        raise RuntimeError(f"the plan chose engine {plan.engine!r}, which this build cannot start; "
                           f"available: {', '.join(ENGINE_BUILDERS)}")
    progress(f"starting the {plan.engine} engine (importing torch, transformers and DeepSpeed)")
    return builder(configuration.properties, plan, str(resolved.path), progress, resolved.description)


def resolve_and_plan(configuration: Any, progress: Callable[[str], None]) -> tuple[Any, Any]:
    """The model on local disk (downloaded or converted if needed) and the engine plan for it."""
    from entrypoint.model_resolution import default_cache_dir, read_model_config, resolve_model
    from handlers.engine_plan import detect_device, plan_engine

    properties = configuration.properties
    cache_dir = Path(properties.model_cache_dir) if properties.model_cache_dir else default_cache_dir()
    progress("resolving the model")
    resolved = resolve_model(properties.model_id, model_dir=configuration.model_dir, revision=properties.revision,
                             # progress bars only on a terminal: in a log they are carriage-return noise,
                             # and `report` already logs each phase
                             cache_dir=cache_dir, progress=sys.stderr.isatty(), report=progress)
    progress(f"model: {resolved.description}")
    plan = plan_engine(properties, read_model_config(resolved), detect_device(), available=ENGINE_BUILDERS,
                       quantizers=QUANTIZERS)
    return resolved, plan


def _autotp(*args: Any) -> Any:
    from handlers.autotp_engine import load_autotp_engine
    return load_autotp_engine(*args)


# engine name (as the plan names it) -> builder(properties, plan, model_path, progress, description)
ENGINE_BUILDERS: dict[str, Callable[..., Any]] = {"autotp": _autotp}
# quantization methods this build applies (quantization.quantizer; on the autotp engine, as the policy says)
QUANTIZERS: frozenset[str] = frozenset({"smoothquant", "dynamic_int8"})
