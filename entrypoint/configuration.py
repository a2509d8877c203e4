"""From serving.properties and the environment to one validated `Configuration`, or one clear error.

Validation happens here, once, before anything heavy is imported or any weight is read. Every problem is
reported together, each naming the key as the user wrote it, where it came from (file and line, or
environment variable), the bad value and what is allowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pydantic import ValidationError

from entrypoint import lmi_keys, property_sources
from handlers.serving_properties import CrossFieldError, RollingBatch, ServingProperties, describe_value
from entrypoint.property_sources import DEFAULT_SOURCE, Source

DEFAULT_MODEL_DIR = Path("/opt/ml/model")  # where SageMaker mounts the model artifacts
PROPERTIES_FILE = "serving.properties"


@dataclass(frozen=True)
class Problem:
    key: str  # as the user wrote it (or the property name for defaults)
    source: Source | None
    value: Any
    message: str

    def __str__(self) -> str:
        key, where = self.key, ""
        if self.source is not None and self.source.kind in ("serving.properties", "djl"):
            where = f" (from {self.source})"
        elif self.source is not None and self.source.kind == "env":
            key = f"environment variable {self.key}"
        shown = "" if self.value is _NO_VALUE else f" = {self.value!r}"
        return f"{key}{shown}{where}: {self.message}"


_NO_VALUE = object()


class ConfigurationError(ValueError):
    """The configuration is invalid; `str()` is the complete, user-facing explanation."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        count = len(problems)
        lines = [f"invalid configuration ({count} problem{'s' if count != 1 else ''}):"]
        lines += [f"  - {problem}" for problem in problems]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Configuration:
    """The validated properties, where each value came from, and notes worth showing at start-up."""

    properties: ServingProperties
    sources: dict[str, Source]
    model_dir: Path
    notes: list[str] = field(default_factory=list)
    # Worth a WARNING at start-up: the LMI keys that were accepted but have no effect here (one entry naming
    # them all, so a migrated serving.properties gets one message, not one per key).
    warnings: list[str] = field(default_factory=list)

    def source_of(self, name: str) -> Source:
        return self.sources.get(name, DEFAULT_SOURCE)

    def resolved(self) -> dict[str, dict[str, Any]]:
        """{name: {"value": ..., "source": ...}} for every property, as `plan --json` prints it."""
        return {
            name: {"value": describe_value(getattr(self.properties, name)), "source": str(self.source_of(name))}
            for name in ServingProperties.model_fields
        }


def load_configuration(model_dir: Path | str | None = None, environ: Mapping[str, str] | None = None) -> Configuration:
    """Read `<model_dir>/serving.properties` and the environment, apply LMI's precedence, validate."""
    environ = os.environ if environ is None else environ
    model_dir = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
    properties_file = model_dir / PROPERTIES_FILE

    try:
        found = property_sources.collect(properties_file, environ)
    except UnicodeDecodeError as error:  # found by fuzzing (tests/unit/test_configuration_fuzz.py)
        line = properties_file.read_bytes()[:error.start].count(b"\n") + 1
        raise ConfigurationError([Problem(f"{properties_file}:{line}", None, _NO_VALUE,
                                          f"not UTF-8 text (byte 0x{error.object[error.start]:02x}); save the file "
                                          f"as UTF-8")]) from None
    except OSError as error:
        raise ConfigurationError([Problem(str(properties_file), None, _NO_VALUE,
                                          f"cannot be read ({error.strerror})")]) from None
    return _validated(found, model_dir)


def load_configuration_from_properties(properties: Mapping[str, Any], model_dir: Path | str | None = None,
                                       environ: Mapping[str, str] | None = None) -> Configuration:
    """The configuration DJL Serving hands `handle()` on its initialization call: `properties` are the
    serving.properties options without their `option.` prefix (plus keys DJL adds, such as `model_dir`,
    which is used as the model directory unless `model_dir` is given). They rank as serving.properties
    values; the environment is read as `load_configuration` reads it; the model directory's
    serving.properties is not read again (DJL already did)."""
    environ = os.environ if environ is None else environ
    if model_dir is None:
        model_dir = properties.get("model_dir") or DEFAULT_MODEL_DIR
    found = property_sources.collect_djl(properties) + property_sources.collect(None, environ)
    return _validated(found, Path(model_dir))


def _validated(found: property_sources.Collected, model_dir: Path) -> Configuration:
    problems = [
        Problem(u.key, u.source, _NO_VALUE,
                "unknown key" + (f"; did you mean {u.suggestion}?" if u.suggestion else
                                 "; see serving.properties.example for every key (docs/lmi-migration.md for "
                                 "LMI's)"))
        for u in found.unknown
    ]
    problems += [Problem(bad.key, bad.source, bad.value, bad.message) for bad in found.bad_values]
    values, sources, override_notes = property_sources.resolve(found.values)
    notes = found.notes + override_notes
    warnings = [lmi_keys.ignored_warning([(entry, str(source)) for entry, source in found.ignored])] \
        if found.ignored else []

    try:
        properties = ServingProperties(**values)
    except ValidationError as error:
        problems += _explain(error, values, sources)
        properties = None
    if problems:
        raise ConfigurationError(problems)
    assert properties is not None
    if properties.rolling_batch is not RollingBatch.DISABLE:
        # LMI files often carry DJL's dynamic-batching keys next to the rolling batch; say they do nothing.
        notes += [f"{sources[name]}: {sources[name].key} is ignored: it configures dynamic batching, which runs only "
                  "with rolling_batch=disable (the rolling batch uses max_rolling_batch_size)"
                  for name in ("batch_size", "max_batch_delay")
                  if name in sources and getattr(properties, name) != ServingProperties.model_fields[name].default]
        properties = properties.model_copy(update={name: ServingProperties.model_fields[name].default
                                                   for name in ("batch_size", "max_batch_delay")})
    return Configuration(properties=properties, sources=sources, model_dir=model_dir, notes=notes, warnings=warnings)


def _explain(error: ValidationError, values: dict[str, str], sources: dict[str, Source]) -> list[Problem]:
    problems: list[Problem] = []
    for detail in error.errors():
        cause = (detail.get("ctx") or {}).get("error")
        if isinstance(cause, CrossFieldError):
            for fields, message in cause.problems:
                located = [f"{name} from {sources[name]}" for name in fields if name in sources]
                where = f" [{'; '.join(located)}]" if located else ""
                problems.append(Problem(" + ".join(fields), None, _NO_VALUE, message + where))
            continue
        name = str(detail["loc"][0]) if detail["loc"] else "?"
        source = sources.get(name)
        key = source.key if source is not None else name
        if key != name:
            key = f"{key} ({name})"
        problems.append(Problem(key, source, values.get(name, _NO_VALUE), _message(name, detail)))
    return problems


def _message(name: str, detail: dict[str, Any]) -> str:
    kind = detail.get("type", "")
    ctx = detail.get("ctx") or {}
    field_info = ServingProperties.model_fields[name] if name in ServingProperties.model_fields else None
    if kind == "value_error":
        return str(ctx.get("error", detail["msg"]))
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return "expected a whole number" + _bounds(field_info)
    if kind in ("float_parsing", "float_type"):
        return "expected a number" + _bounds(field_info)
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        return "out of range" + _bounds(field_info)
    return detail["msg"]


def _bounds(field_info: Any) -> str:
    if field_info is None:
        return ""
    low = high = None
    for meta in field_info.metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            bound = getattr(meta, attr, None)
            if bound is not None:
                if symbol.startswith(">"):
                    low = f"{symbol} {bound}"
                else:
                    high = f"{symbol} {bound}"
    parts = [part for part in (low, high) if part]
    return f" ({' and '.join(parts)})" if parts else ""
