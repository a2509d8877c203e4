"""The command line: `python -m entrypoint plan|serve|docs` (console scripts `lmi-plan`, `lmi-serve`).

`plan` shows what `serve` would do — every property with its source, the resolved model, its architecture
and the engine plan — without loading weights. `serve` validates the same way, then hands over to
`entrypoint.launch`. `docs` writes docs/configuration.md and docs/lmi-migration.md from the code
(`entrypoint.reference_docs`). A user error (bad configuration, model not found, a plan that cannot work) prints its
message on stderr and exits with status 2 before anything is started; stdout carries only `plan`'s output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator, Sequence

from entrypoint.configuration import DEFAULT_MODEL_DIR, Configuration, ConfigurationError, load_configuration
from entrypoint.log_filters import quiet_third_party

EXIT_USER_ERROR = 2  # the status argparse uses for bad arguments; a bad configuration is the same kind of mistake
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PRECEDENCE = ("SAGEMAKER_BIND_TO_PORT (port) > serving.properties > OPTION_<NAME> > HF_MODEL_ID, TENSOR_PARALLEL_DEGREE, "
              "... > SM_NUM_GPUS, HF_MODEL_QUANTIZE, MAX_BATCH_SIZE, ... > default")

log = logging.getLogger("entrypoint.cli")


# ---- entry points -------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m entrypoint plan|serve ...`"""
    parser = argparse.ArgumentParser(prog="python -m entrypoint",
                                     description="LMI-style DeepSpeed serving container.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{plan,serve,docs,quality}")
    _plan_arguments(commands.add_parser("plan", help="show the resolved configuration and engine plan; loads no weights",
                                        description=_plan.__doc__))
    _serve_arguments(commands.add_parser("serve", help="load the model and serve HTTP", description=_serve.__doc__))
    _docs_arguments(commands.add_parser("docs", help="write docs/configuration.md and docs/lmi-migration.md from the "
                                                     "code", description=_docs.__doc__))
    commands.add_parser("quality", help="perplexity of fp32 and the int8 paths on held-out text, one JSON object "
                        "(python -m entrypoint quality --help)")
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["quality"]:  # its own parser (entrypoint/quality.py) takes the rest
        from entrypoint.quality import main as quality_main
        return quality_main(arguments[1:])
    args = parser.parse_args(arguments)
    return {"plan": _plan, "serve": _serve, "docs": _docs}[args.command](args)


def plan_main(argv: Sequence[str] | None = None) -> int:
    """`lmi-plan [--model-dir DIR] [--json]`"""
    parser = argparse.ArgumentParser(prog="lmi-plan", description=_plan.__doc__)
    _plan_arguments(parser)
    return _plan(parser.parse_args(argv))


def serve_main(argv: Sequence[str] | None = None) -> int:
    """`lmi-serve [--model-dir DIR]`"""
    parser = argparse.ArgumentParser(prog="lmi-serve", description=_serve.__doc__)
    _serve_arguments(parser)
    return _serve(parser.parse_args(argv))


def _model_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                        help=f"directory holding serving.properties (and the model, unless option.model_id says "
                             f"otherwise); default {DEFAULT_MODEL_DIR}")


def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    _model_dir_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    _model_dir_argument(parser)


def _docs_arguments(parser: argparse.ArgumentParser) -> None:
    from entrypoint.reference_docs import DOCS_DIR

    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a generated file differs from what the code says")
    parser.add_argument("--docs-dir", type=Path, default=DOCS_DIR, help=f"where the files are; default {DOCS_DIR}")


def _docs(args: argparse.Namespace) -> int:
    """Write the configuration reference (docs/configuration.md, from ServingProperties) and the LMI migration
    table (docs/lmi-migration.md, from entrypoint/lmi_keys.py); with --check, only say whether they are current."""
    from entrypoint import reference_docs

    if args.check:
        stale = reference_docs.stale(args.docs_dir)
        for path in stale:
            print(f"{path} is out of date: run {reference_docs.REGENERATE}", file=sys.stderr)
        return 1 if stale else 0
    for path in reference_docs.write(args.docs_dir):
        print(f"wrote {path}")
    return 0


def configure_logging(level: int = logging.INFO, rank_prefix: str = "") -> None:
    """Log to stderr with time, level and logger name (and the rank, for tensor-parallel ranks), without the
    third-party lines that say nothing to a user (`log_filters`); once per process (every command calls it)."""
    root = logging.getLogger()
    if any(getattr(handler, "_lmi_cli", False) for handler in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT.replace("%(levelname)s", rank_prefix + "%(levelname)s")))
    handler._lmi_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    quiet_third_party()


# ---- serve --------------------------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    """Validate serving.properties and the environment, then load the model and serve HTTP."""
    configure_logging()
    try:
        configuration = load_configuration(args.model_dir, os.environ)
    except ConfigurationError as error:
        return report_user_error(error)
    for note in configuration.notes:
        log.info("%s", note)
    for warning in configuration.warnings:
        log.warning("%s", warning)
    _normalize_cuda_arch_list(os.environ)
    # Plan before anything starts (config.json only, no weights): a model that cannot be found or a plan
    # that cannot work (e.g. a tensor-parallel degree that does not divide the heads) exits here, before
    # the port opens.
    try:
        report = build_report(configuration)
        # A model whose weights cannot fit fails here in seconds, not by the OOM killer minutes into loading.
        from entrypoint.memory_fit import check_weights_fit
        check_weights_fit(report)
    except user_errors() as error:
        return report_user_error(error, configuration)
    plan = report["plan"]
    log.info("plan: engine %s on %s, tensor parallel %s, dtype %s, model %s", plan["engine"],
             _device_text(plan["device"]), plan["tensor_parallel_degree"], plan["dtype"],
             report["model"]["description"])
    if plan["tensor_parallel_degree"] > 1:
        from entrypoint.rank_launcher import exec_ranks
        exec_ranks(args.model_dir, plan["tensor_parallel_degree"])  # does not return
    # Imported here: the server stack (torch, deepspeed, uvicorn) is only needed once the configuration is
    # known to be good, and `plan` never needs it.
    from entrypoint import launch

    try:
        result = launch.serve(configuration, raise_load_errors=user_errors())
    except user_errors() as error:  # errors found while loading, re-raised after the server stopped
        return report_user_error(error, configuration)
    return int(result or 0)


def _normalize_cuda_arch_list(environ: Any) -> None:
    """DeepSpeed's op builder cannot parse suffixed architectures such as NVIDIA images' `9.0a`
    (handlers/cuda_arch_list.py): rewrite the variable before any op is built, here so that tensor-parallel
    ranks (exec'd below) inherit it."""
    from handlers.cuda_arch_list import normalized_arch_list

    value = environ.get("TORCH_CUDA_ARCH_LIST")
    if value is None:
        return
    normalized = normalized_arch_list(value)
    if normalized != value:
        log.info("TORCH_CUDA_ARCH_LIST=%r rewritten to %r for DeepSpeed's op builder, which cannot parse "
                 "architecture suffixes", value, normalized)
        environ["TORCH_CUDA_ARCH_LIST"] = normalized


# ---- plan ---------------------------------------------------------------------------------------------
def _plan(args: argparse.Namespace) -> int:
    """Show every resolved property with its source, the resolved model, its architecture and the engine
    plan, without loading weights."""
    configure_logging()
    configuration = None
    # Libraries that print (rather than log) while resolving the model must not corrupt `--json`.
    with _stdout_to_stderr():
        try:
            configuration = load_configuration(args.model_dir, os.environ)
            report = build_report(configuration)
        except user_errors() as error:
            return report_user_error(error, configuration)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(render_report(report))
    return 0


def build_report(configuration: Configuration) -> dict[str, Any]:
    """{"properties", "notes", "warnings", "model", "plan"} for `configuration`, reading only the model's config."""
    from entrypoint.model_resolution import read_model_config, resolve_model
    from handlers.engine_plan import ModelShape, detect_device, plan_engine

    properties = configuration.properties
    resolved = resolve_model(properties.model_id, model_dir=configuration.model_dir, revision=properties.revision,
                             cache_dir=properties.model_cache_dir, config_only=True, progress=False)
    model_config = read_model_config(resolved)
    from entrypoint.model_checks import check_model
    check_model(resolved, model_config, properties.trust_remote_code)  # faults visible without loading
    from entrypoint.engine_factory import QUANTIZERS
    from handlers import engine_registry
    plan = plan_engine(properties, model_config, detect_device(), available=engine_registry.built(),
                       quantizers=QUANTIZERS)
    shape = ModelShape.from_config(model_config)
    model = {"source": _plain(resolved.source), "description": str(resolved.description), "path": str(resolved.path)}
    model.update({key: value for key, value in shape.to_dict().items()})
    return {"properties": configuration.resolved(), "notes": list(configuration.notes),
            "warnings": list(configuration.warnings), "model": model, "plan": plan.to_dict()}


def render_report(report: dict[str, Any]) -> str:
    """The human-readable form of `build_report`'s dict: aligned sections, long lines wrapped."""
    out: list[str] = []
    properties = report["properties"]
    width = max(len(name) for name in properties)
    values = {name: _text(entry["value"]) for name, entry in properties.items()}
    value_width = min(max(len(value) for value in values.values()), 40)
    out.append("Properties (value and source; precedence: " + PRECEDENCE + ")")
    for name, entry in properties.items():
        out.append(f"  {name:<{width}}  {values[name]:<{value_width}}  {entry['source']}")
    if report["notes"]:
        out.append("")
        out.append("Configuration notes")
        out += [_wrap(note, "  - ", "    ") for note in report["notes"]]
    if report.get("warnings"):
        out.append("")
        out.append("Configuration warnings")
        for warning in report["warnings"]:  # a warning's first line heads it, each further line is one item
            first, *items = warning.split("\n")
            out.append(_wrap(first, "  ! ", "    "))
            out += [_wrap(item.strip(), "    - ", "      ") for item in items]

    model = report["model"]
    out.append("")
    out.append("Model")
    out += _fields([("source", model["source"]), ("description", model["description"]), ("path", model["path"])])
    out.append("")
    out.append("Architecture")
    kind = model["model_type"] or "(unknown)"
    if model.get("architecture") and model["architecture"] != model["model_type"]:
        kind += f" ({model['architecture']})"
    heads = "(unknown)" if model["heads"] is None else f"{model['heads']} attention, {model['kv_heads']} key/value"
    out += _fields([("model_type", kind), ("layers", _text(model["layers"])), ("heads", heads),
                    ("hidden size", _text(model["hidden_size"])),
                    ("context", "(unknown)" if model["context"] is None else f"{model['context']} tokens"),
                    ("checkpoint dtype", _text(model["checkpoint_dtype"]))])

    plan = report["plan"]
    device = plan["device"]
    out.append("")
    out.append("Engine plan")
    out += _fields([
        ("device", _device_text(device)),
        ("engine", plan["engine"]),
        ("why", plan["reason"]),
        ("tensor parallel", str(plan["tensor_parallel_degree"])),
        ("dtype", plan["dtype"]),
        ("rolling batch", "on (continuous batching)" if plan["rolling_batch"] else "off (static batches)"),
        ("quantize", _text(plan["quantize"])),
    ])
    out.append("  ruled out")
    out += [_wrap(f"{entry['engine']}: {entry['why']}", "    - ", "      ") for entry in plan["ruled_out"]]
    if plan["notes"]:
        out.append("  notes")
        out += [_wrap(note, "    - ", "      ") for note in plan["notes"]]
    return "\n".join(out)


# ---- helpers ------------------------------------------------------------------------------------------
def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the user's configuration or model is wrong" (exit 2, no traceback)."""
    from handlers.engine_plan import PlanError

    from handlers.checkpoint_files import CheckpointError

    errors: tuple[type[BaseException], ...] = (ConfigurationError, PlanError, CheckpointError)
    try:
        from entrypoint.model_resolution import ModelResolutionError
    except ImportError:  # a broken model_resolution must not turn a configuration error into a traceback
        return errors
    return errors + (ModelResolutionError,)


def report_user_error(error: BaseException, configuration: Configuration | None = None) -> int:
    describe = getattr(error, "describe", None)
    if configuration is not None and callable(describe):
        # A PlanError names properties; say where each came from, as configuration errors do.
        message = describe(lambda key: str(configuration.source_of(key)) if key in configuration.sources else None)
    else:
        message = str(error)
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout (Python prints and C-level writes to fd 1) to stderr."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no usable fd 1/2 (embedded use): Python-level redirection still protects the output
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _device_text(device: dict[str, Any]) -> str:
    return f"{device['count']} x {device['name']}" if device["kind"] == "cuda" else f"CPU ({device['name']})"


def _fields(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(label) for label, _ in rows)
    return [_wrap(str(value), f"  {label:<{width}}  ", " " * (width + 4)) for label, value in rows]


def _wrap(text: str, first: str, rest: str) -> str:
    return textwrap.fill(text, width=max(100, len(first) + 40), initial_indent=first, subsequent_indent=rest,
                         break_on_hyphens=False, break_long_words=False)


def _text(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)
