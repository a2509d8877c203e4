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

LMI's own keys that are no property here (`option.max_model_len`, `option.enable_prefix_caching`, `minWorkers`,
...) are read through the table in `entrypoint.lmi_keys`: mapped onto a property, or accepted and named in
one start-up warning. A value set through an LMI key ranks as its source does, just below the property's own
name from the same source.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from entrypoint import lmi_keys
from entrypoint.lmi_keys import LmiKey, normalize_key
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
    via_lmi_key: bool = False  # set through an LMI key of another name (option.max_model_len -> max_tokens)

    @property
    def where(self) -> str:
        return f"{self.source} ({self.source.key})" if self.via_lmi_key else str(self.source)


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

# Keys DJL Serving's Python engine adds to the properties it hands `handle()` (see `collect_djl`); they
# describe DJL's own worker process, not the model, so they are skipped without a note. (`content-type`:
# a first call that carries a request, as djl_python's test_model sends, has the request's header too.)
DJL_RUNTIME_KEYS = frozenset({
    "model_dir", "device_id", "handler", "pythonexecutable", "env", "mpi_mode", "enable_venv",
    "parallel_loading", "async_mode", "input_formatter", "recommended_entry_point", "content-type",
})
@dataclass(frozen=True)
class UnknownKey:
    key: str
    source: Source
    suggestion: str | None


@dataclass(frozen=True)
class BadValue:
    """A known LMI key whose value has no meaning here (`option.load_in_8bit=true`)."""

    key: str
    source: Source
    value: str
    message: str


@dataclass
class Collected:
    """Everything read from one or more sources, before precedence is applied."""

    values: list[RawValue] = field(default_factory=list)
    unknown: list[UnknownKey] = field(default_factory=list)
    bad_values: list[BadValue] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ignored: list[tuple[LmiKey, Source]] = field(default_factory=list)  # LMI keys with no effect here

    def __add__(self, other: "Collected") -> "Collected":
        return Collected(self.values + other.values, self.unknown + other.unknown, self.bad_values + other.bad_values,
                         self.notes + other.notes, self.ignored + other.ignored)

    def add_lmi_key(self, entry: LmiKey, value: str, source: Source, rank: int) -> None:
        """Apply one row of the LMI key table (`entrypoint.lmi_keys`) to a key found in a source."""
        if entry.kind == lmi_keys.IGNORED:
            self.ignored.append((entry, source))
            return
        try:
            converted = entry.convert(value) if entry.convert is not None else value
        except ValueError as error:
            self.bad_values.append(BadValue(source.key, source, value, str(error)))
            return
        if entry.kind == lmi_keys.MAPPED and converted is not None:
            assert entry.target is not None
            self.values.append(RawValue(entry.target, converted, source, rank, via_lmi_key=True))
            self.notes.append(f"{source}: {source.key} is LMI's key for {entry.target} here: {entry.meaning}")


def known_names() -> list[str]:
    return property_names()


def canonical_name(normalized: str) -> str | None:
    if normalized in KEY_ALIASES:
        return KEY_ALIASES[normalized]
    return normalized if normalized in property_names() else None


def suggest(normalized: str) -> str | None:
    # LMI's option keys are candidates too: `max_model_length` is a typo of an accepted key.
    candidates = property_names() + list(KEY_ALIASES) + list(lmi_keys.OPTION_KEYS)
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


def collect(properties_file: Path | None, environ: Mapping[str, str]) -> Collected:
    """Gather every raw value with its source from serving.properties and the environment."""
    found = Collected()

    if properties_file is not None and properties_file.is_file():
        for line_no, key, value in parse_properties_text(properties_file.read_text(encoding="utf-8")):
            source = Source("serving.properties", f"{properties_file}:{line_no}", key)
            lowered = key.lower()
            if lowered.startswith("option."):
                normalized = normalize_key(key[len("option."):])
                name = canonical_name(normalized)
                entry = lmi_keys.option_key(normalized) if name is None else None
                if name is not None:
                    found.values.append(RawValue(name, value, source, RANK_FILE))
                elif entry is not None:
                    found.add_lmi_key(entry, value, source, RANK_FILE)
                else:
                    hint = suggest(normalized)
                    found.unknown.append(UnknownKey(key, source, f"option.{hint}" if hint else None))
            elif lowered in TOP_LEVEL_KEYS:
                found.values.append(RawValue(TOP_LEVEL_KEYS[lowered], value, source, RANK_FILE))
            elif (entry := lmi_keys.top_level_key(key)) is not None:
                found.add_lmi_key(entry, value, source, RANK_FILE)
            else:
                normalized = normalize_key(key)
                hint = canonical_name(normalized) or suggest(normalized)
                found.unknown.append(UnknownKey(key, source, f"option.{hint}" if hint else None))

    for variable in sorted(environ):
        value = environ[variable]
        if variable.startswith("OPTION_"):
            source = Source("env", variable, variable)
            normalized = normalize_key(variable[len("OPTION_"):])
            name = canonical_name(normalized)
            entry = lmi_keys.option_key(normalized) if name is None else None
            if name is not None:
                found.values.append(RawValue(name, value, source, RANK_OPTION_ENV))
            elif entry is not None:
                found.add_lmi_key(entry, value, source, RANK_OPTION_ENV)
            else:
                found.unknown.append(UnknownKey(variable, source, suggest(normalized)))
        elif variable in LMI_ENV:
            found.values.append(RawValue(LMI_ENV[variable], value, Source("env", variable, variable), RANK_LMI_ENV))
        elif variable in COMPAT_ENV:
            found.values.append(RawValue(COMPAT_ENV[variable], value, Source("env", variable, variable),
                                         RANK_COMPAT_ENV))
        elif variable == "SAGEMAKER_BIND_TO_PORT":
            found.values.append(RawValue("port", value, Source("env", variable, variable), RANK_SAGEMAKER_PORT))
    return found


def collect_djl(properties: Mapping[str, object]) -> Collected:
    """Raw values from the properties DJL Serving passes to `handle()` on its first (initialization) call:
    serving.properties' `option.*` keys without the prefix (`model_id`, `entryPoint`, ...), which rank as
    serving.properties values, plus keys DJL adds for its worker (`DJL_RUNTIME_KEYS`, skipped)."""
    found = Collected()
    for key, raw in properties.items():
        value = "" if raw is None else str(raw)
        source = Source("djl", "DJL properties", key)
        bare = key[len("option."):] if key.lower().startswith("option.") else key
        lowered = bare.lower()
        if lowered in DJL_RUNTIME_KEYS:
            continue
        normalized = normalize_key(bare)
        name = canonical_name(normalized)
        entry = None if name is not None else (lmi_keys.option_key(normalized) or lmi_keys.top_level_key(bare))
        if name is not None:
            found.values.append(RawValue(name, value, source, RANK_FILE))
        elif entry is not None:
            found.add_lmi_key(entry, value, source, RANK_FILE)
        else:
            found.unknown.append(UnknownKey(key, source, suggest(normalized)))
    return found


#: properties whose values are never printed (plan, notes, logs)
SECRET_PROPERTIES = frozenset({"api_key"})


def resolve(values: list[RawValue]) -> tuple[dict[str, str], dict[str, Source], list[str]]:
    """Pick the winning value per property. Returns (raw values, their sources, notes on overridden values)."""
    winners: dict[str, RawValue] = {}
    notes: list[str] = []
    # Within one rank a property's own name wins over an LMI key that sets it (max_tokens over max_model_len).
    for raw in sorted(values, key=lambda r: (r.rank, r.via_lmi_key)):
        current = winners.get(raw.name)
        if current is None:
            winners[raw.name] = raw
        elif current.value.strip() != raw.value.strip():
            if raw.name in SECRET_PROPERTIES:  # notes are printed and logged: never the secret itself
                notes.append(f"{raw.name}: {current.where} overrides {raw.where}")
            else:
                notes.append(f"{raw.name}: {current.where} ({current.value!r}) overrides {raw.where} ({raw.value!r})")
    return ({name: raw.value for name, raw in winners.items()},
            {name: raw.source for name, raw in winners.items()}, notes)
