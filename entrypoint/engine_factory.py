"""From a validated configuration to a running engine: resolve the model, plan, build the planned engine."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable

from handlers import engine_registry

logger = logging.getLogger(__name__)


def build_engine(configuration: Any, progress: Callable[[str], None]) -> Any:
    """Resolve the model (downloading or converting it if needed), plan the engine and load it.

    An engine that finds at load time that it cannot serve this model correctly (FastGen: its ops do not
    build, its correctness gate fails, a config it cannot express) is dropped, and the model is planned again
    without it: the next engine the policy allows serves instead, and the log says why."""
    resolved, plan = resolve_and_plan(configuration, progress)
    failed: dict[str, str] = {}
    while True:
        entry = engine_registry.entry(plan.engine)
        if entry.loader is None:
            raise RuntimeError(f"the plan chose engine {plan.engine!r}, which this build cannot start; "
                               f"available: {', '.join(sorted(engine_registry.built()))}")
        progress(f"starting the {plan.engine} engine (importing torch, transformers and DeepSpeed)")
        try:
            return entry.loader(configuration.properties, plan, str(resolved.path), progress, resolved.description)
        except Exception as error:  # noqa: BLE001 - only engines with a fallback are retried, see below
            if not entry.falls_back:
                raise
            logger.error("the %s engine cannot serve this model, planning again without it: %s",
                         plan.engine, error, exc_info=not entry.refused(error))
            failed[plan.engine] = str(error)
            plan = _plan(configuration, resolved, failed)
            logger.info("engine %s instead: %s", plan.engine, plan.reason)


def _plan(configuration: Any, resolved: Any, failed: Any = None) -> Any:
    from entrypoint.model_resolution import read_model_config
    from handlers.engine_plan import detect_device, plan_engine

    return plan_engine(configuration.properties, read_model_config(resolved), detect_device(),
                       available=engine_registry.built(), quantizers=QUANTIZERS, failed=failed)


def resolve_and_plan(configuration: Any, progress: Callable[[str], None]) -> tuple[Any, Any]:
    """The model on local disk (downloaded or converted if needed) and the engine plan for it."""
    from entrypoint.model_resolution import default_cache_dir, resolve_model

    properties = configuration.properties
    cache_dir = Path(properties.model_cache_dir) if properties.model_cache_dir else default_cache_dir()
    progress("resolving the model")
    resolved = resolve_model(properties.model_id, model_dir=configuration.model_dir, revision=properties.revision,
                             # progress bars only on a terminal: in a log they are carriage-return noise,
                             # and `report` already logs each phase
                             cache_dir=cache_dir, progress=sys.stderr.isatty(), report=progress)
    progress(f"model: {resolved.description}")
    return resolved, _plan(configuration, resolved)


# quantization methods this build applies (quantization.quantizer; on the autotp engine, as the policy says)
QUANTIZERS: frozenset[str] = frozenset({"smoothquant", "dynamic_int8"})
