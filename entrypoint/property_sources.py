"""Where property values come from, and which source wins — as LMI (DJL Serving) has it.

Precedence, highest first:
  1. `SAGEMAKER_BIND_TO_PORT` for the port (SageMaker tells the container where to listen).
  2. `serving.properties` in the model directory: `option.<name>=value` (and the top-level `engine=`,
     `job_queue_size=`). LMI lets a value written in the file win over the environment. Under DJL Serving
     (`entrypoint.djl_handler.handle`), the properties DJL passes in take this place (`collect_djl`).
  3. `OPTION_<NAME>` environment variables (`OPTION_MAX_ROLLING_BATCH_SIZE` -> `max_rolling_batch_size`).
  4. LMI's own environment names: `HF_MODEL_ID`, `HF_MODEL_REVISION`, `HF_TASK`, `TENSOR_PARALLEL_DEGREE`,
     `SERVING_JOB_QUEUE_SIZE`.
  5. The SageMaker / TGI names LMI translated when the LMI name is unset: `SM_NUM_GPUS`,
     `HF_MODEL_QUANTIZE`, `HF_MODEL_TRUST_REMOTE_CODE`, `MAX_BATCH_SIZE`, `MAX_BATCH_PREFILL_TOKENS`,
     `MAX_CONCURRENT_REQUESTS`.
  6. The default in `handlers.serving_properties.ServingProperties`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from handlers.serving_properties import property_names


@dataclass(frozen=True)
class Source:
    """Where one value came from, precise enough for an error message ("serving.properties:3", "env OPTION_DTYPE")."""

    kind: str  # "serving.properties", "djl", "env", "default"
    detail: str  # file:line, "DJL properties", variable name, or "default"
    key: str  # the key as the user wrote it

    def __str__(self) -> str:
        if self.kind == "env":
            return f"environment variable {self.detail}"
        if self.kind in ("serving.properties", "djl"):
            return self.detail
        return "default"


DEFAULT_SOURCE = Source("default", "default", "")


@dataclass(frozen=True)
class RawValue:
    name: str  # canonical property name, or the normalized unknown key
    value: str
    source: Source
    rank: int  # lower wins


# Rank of each source kind (lower wins).
RANK_SAGEMAKER_PORT, RANK_FILE, RANK_OPTION_ENV, RANK_LMI_ENV, RANK_COMPAT_ENV = range(5)

LMI_ENV: dict[str, str] = {
    "HF_MODEL_ID": "model_id",
    "HF_MODEL_REVISION": "revision",
    "HF_TASK": "task",
    "TENSOR_PARALLEL_DEGREE": "tensor_parallel_degree",
    "SERVING_JOB_QUEUE_SIZE": "job_queue_size",
}

# SageMaker Hugging Face / TGI container names that LMI translated into its own when those were unset.
COMPAT_ENV: dict[str, str] = {
    "SM_NUM_GPUS": "tensor_parallel_degree",
    "HF_MODEL_QUANTIZE": "quantize",
    "HF_MODEL_TRUST_REMOTE_CODE": "trust_remote_code",
    "MAX_BATCH_SIZE": "max_rolling_batch_size",
    "MAX_BATCH_PREFILL_TOKENS": "max_rolling_batch_prefill_tokens",
    "MAX_CONCURRENT_REQUESTS": "job_queue_size",
}

# Other spellings of property names (after normalization) that LMI users write.
KEY_ALIASES: dict[str, str] = {
    "entrypoint": "entry_point",
    "entry_point": "entry_point",
    "tp_degree": "tensor_parallel_degree",
    "data_type": "dtype",
}

# Top-level (non-`option.`) keys of serving.properties.
TOP_LEVEL_KEYS: dict[str, str] = {"engine": "engine", "job_queue_size": "job_queue_size", "batch_size": "batch_size",
                                  "max_batch_delay": "max_batch_delay"}

# DJL Serving worker-pool keys that mean nothing to this single-model server; accepted with a note so that
# an LMI serving.properties keeps working, never silently.
IGNORED_DJL_KEYS: dict[str, str] = {
    "minworkers": "one worker process group serves the model",
    "maxworkers": "one worker process group serves the model",
    "gpu.minworkers": "one worker process group serves the model",
    "gpu.maxworkers": "one worker process group serves the model",
    "max_idle_time": "workers are not scaled down",
    "load_on_devices": "tensor_parallel_degree decides the devices",
    "required_memory_mb": "memory is not reserved per worker",
    "reserved_memory_mb": "memory is not reserved per worker",
}


# Keys DJL Serving's Python engine adds to the properties it hands `handle()` (see `collect_djl`); they
# describe DJL's own worker process, not the model, so they are skipped without a note. (`content-type`:
# a first call that carries a request, as djl_python's test_model sends, has the request's header too.)
DJL_RUNTIME_KEYS = frozenset({
    "model_dir", "device_id", "handler", "pythonexecutable", "env", "mpi_mode", "enable_venv",
    "parallel_loading", "async_mode", "input_formatter", "recommended_entry_point", "content-type",
})
# DJL runtime keys this container can only honour as 1 (it has no pipeline parallelism or multi-node).
DJL_MUST_BE_ONE: dict[str, str] = {"pipeline_parallel_degree": "tensor_parallel_degree",
                                   "cluster_size": "tensor_parallel_degree"}


@dataclass(frozen=True)
class UnknownKey:
    key: str
    source: Source
    suggestion: str | None


def normalize_key(key: str) -> str:
    """`entryPoint` -> `entry_point`, `MAX-TOKENS` -> `max_tokens`."""
    snake = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key.strip())
    return snake.replace("-", "_").lower()


def known_names() -> list[str]:
    return property_names()


def canonical_name(normalized: str) -> str | None:
    if normalized in KEY_ALIASES:
        return KEY_ALIASES[normalized]
    return normalized if normalized in property_names() else None


def suggest(normalized: str) -> str | None:
    candidates = property_names() + list(KEY_ALIASES)
    match = difflib.get_close_matches(normalized, candidates, n=1, cutoff=0.75)
    if not match:
        return None
    return KEY_ALIASES.get(match[0], match[0])


def parse_properties_text(text: str) -> list[tuple[int, str, str]]:
    """Parse Java `.properties` text into (line number, key, value).

    Written by hand because the format is tiny and we need line numbers for error messages, which the
    Python readers of this format (jproperties, configparser hacks) do not give. Supports `#`/`!` comments,
    `key=value`, `key: value`, `key value`, and backslash line continuation."""
    entries: list[tuple[int, str, str]] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        start = index + 1
        line = lines[index].strip()
        index += 1
        if not line or line[0] in "#!":
            continue
        while line.endswith("\\") and not line.endswith("\\\\") and index < len(lines):
            line = line[:-1] + lines[index].strip()
            index += 1
        match = re.match(r"([^=:\s]+)\s*[=:\s]\s*(.*)$", line)
        if match:
            entries.append((start, match.group(1), match.group(2).strip()))
        else:
            entries.append((start, line, ""))
    return entries


def collect(properties_file: Path | None, environ: Mapping[str, str]) -> tuple[list[RawValue], list[UnknownKey], list[str]]:
    """Gather every raw value with its source. Returns (values, unknown keys, notes)."""
    values: list[RawValue] = []
    unknown: list[UnknownKey] = []
    notes: list[str] = []

    if properties_file is not None and properties_file.is_file():
        for line_no, key, value in parse_properties_text(properties_file.read_text(encoding="utf-8")):
            source = Source("serving.properties", f"{properties_file}:{line_no}", key)
            lowered = key.lower()
            if lowered.startswith("option."):
                normalized = normalize_key(key[len("option."):])
                name = canonical_name(normalized)
                if name is None:
                    hint = suggest(normalized)
                    unknown.append(UnknownKey(key, source, f"option.{hint}" if hint else None))
                else:
                    values.append(RawValue(name, value, source, RANK_FILE))
            elif lowered in TOP_LEVEL_KEYS:
                values.append(RawValue(TOP_LEVEL_KEYS[lowered], value, source, RANK_FILE))
            elif lowered in IGNORED_DJL_KEYS:
                notes.append(f"{source}: {key} is ignored: {IGNORED_DJL_KEYS[lowered]}")
            else:
                normalized = normalize_key(key)
                hint = canonical_name(normalized) or suggest(normalized)
                unknown.append(UnknownKey(key, source, f"option.{hint}" if hint else None))

    for variable in sorted(environ):
        value = environ[variable]
        if variable.startswith("OPTION_"):
            source = Source("env", variable, variable)
            normalized = normalize_key(variable[len("OPTION_"):])
            name = canonical_name(normalized)
            if name is None:
                unknown.append(UnknownKey(variable, source, suggest(normalized)))
            else:
                values.append(RawValue(name, value, source, RANK_OPTION_ENV))
        elif variable in LMI_ENV:
            values.append(RawValue(LMI_ENV[variable], value, Source("env", variable, variable), RANK_LMI_ENV))
        elif variable in COMPAT_ENV:
            values.append(RawValue(COMPAT_ENV[variable], value, Source("env", variable, variable), RANK_COMPAT_ENV))
        elif variable == "SAGEMAKER_BIND_TO_PORT":
            values.append(RawValue("port", value, Source("env", variable, variable), RANK_SAGEMAKER_PORT))
    return values, unknown, notes


def collect_djl(properties: Mapping[str, object]) -> tuple[list[RawValue], list[UnknownKey], list[str]]:
    """Raw values from the properties DJL Serving passes to `handle()` on its first (initialization) call:
    serving.properties' `option.*` keys without the prefix (`model_id`, `entryPoint`, ...), which rank as
    serving.properties values, plus keys DJL adds for its worker (`DJL_RUNTIME_KEYS`, skipped)."""
    values: list[RawValue] = []
    unknown: list[UnknownKey] = []
    notes: list[str] = []
    for key, raw in properties.items():
        value = "" if raw is None else str(raw)
        source = Source("djl", "DJL properties", key)
        bare = key[len("option."):] if key.lower().startswith("option.") else key
        lowered = bare.lower()
        if lowered in DJL_RUNTIME_KEYS:
            continue
        if lowered in DJL_MUST_BE_ONE:
            if value.strip() not in ("", "1"):
                unknown.append(UnknownKey(key, source, DJL_MUST_BE_ONE[lowered]))
            continue
        if lowered in IGNORED_DJL_KEYS:
            notes.append(f"{source}: {key} is ignored: {IGNORED_DJL_KEYS[lowered]}")
            continue
        normalized = normalize_key(bare)
        name = canonical_name(normalized)
        if name is None:
            unknown.append(UnknownKey(key, source, suggest(normalized)))
        else:
            values.append(RawValue(name, value, source, RANK_FILE))
    return values, unknown, notes


#: properties whose values are never printed (plan, notes, logs)
SECRET_PROPERTIES = frozenset({"api_key"})


def resolve(values: list[RawValue]) -> tuple[dict[str, str], dict[str, Source], list[str]]:
    """Pick the winning value per property. Returns (raw values, their sources, notes on overridden values)."""
    winners: dict[str, RawValue] = {}
    notes: list[str] = []
    for raw in sorted(values, key=lambda r: r.rank):
        current = winners.get(raw.name)
        if current is None:
            winners[raw.name] = raw
        elif current.value.strip() != raw.value.strip():
            if raw.name in SECRET_PROPERTIES:  # notes are printed and logged: never the secret itself
                notes.append(f"{raw.name}: {current.source} overrides {raw.source}")
            else:
                notes.append(f"{raw.name}: {current.source} ({current.value!r}) overrides {raw.source} ({raw.value!r})")
    return ({name: raw.value for name, raw in winners.items()},
            {name: raw.source for name, raw in winners.items()}, notes)
