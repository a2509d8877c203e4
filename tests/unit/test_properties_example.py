"""serving.properties.example documents every property exactly as handlers/serving_properties.py defines it, with
the environment variables and defaults docs/configuration.md gives (both from `entrypoint.reference_docs`).

Each entry in the file is three comment lines:
    # <description>
    # env: OPTION_<NAME>[, other variables, highest precedence first]
    # option.<name>=<default>          (`# engine=DeepSpeed` for the top-level engine key)
When a property is added or changed, a failure prints the entry to paste.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from entrypoint.configuration import load_configuration
from entrypoint.reference_docs import environment_variables as env_variables
from entrypoint.reference_docs import written_default
from handlers.serving_properties import ServingProperties
from entrypoint.property_sources import COMPAT_ENV, LMI_ENV

EXAMPLE = Path(__file__).resolve().parents[2] / "serving.properties.example"
KEY_LINE = re.compile(r"^# (?:option\.(?P<name>[a-z0-9_]+)|(?P<engine>engine))=(?P<value>.*)$")


def parse_example(text: str) -> dict[str, list[tuple[int, str, str, str]]]:
    """{property: [(line number, default as written, description line, env line), ...]}"""
    lines = text.splitlines()
    entries: dict[str, list[tuple[int, str, str, str]]] = {}
    for index, line in enumerate(lines):
        match = KEY_LINE.match(line)
        if not match:
            continue
        name = match.group("name") or "engine"
        description = lines[index - 2] if index >= 2 else ""
        env = lines[index - 1] if index >= 1 else ""
        entries.setdefault(name, []).append((index + 1, match.group("value"), description, env))
    return entries


def expected_entry(name: str) -> str:
    field = ServingProperties.model_fields[name]
    key = "# engine=DeepSpeed" if name == "engine" else f"# option.{name}={written_default(field.default)}"
    return f"# {field.description}\n# env: {', '.join(env_variables(name))}\n{key}"


@pytest.fixture(scope="module")
def entries():
    return parse_example(EXAMPLE.read_text(encoding="utf-8"))


def test_every_property_is_listed_exactly_once(entries):
    missing = [name for name in ServingProperties.model_fields if name not in entries]
    assert not missing, "serving.properties.example lacks these entries:\n\n" + "\n\n".join(map(expected_entry, missing))
    unknown = sorted(set(entries) - set(ServingProperties.model_fields))
    assert not unknown, f"serving.properties.example lists keys that are no property: {unknown}"
    repeated = {name: [line for line, *_ in found] for name, found in entries.items() if len(found) > 1}
    assert not repeated, f"listed more than once (lines): {repeated}"


@pytest.mark.parametrize("name", list(ServingProperties.model_fields))
def test_entry_matches_the_property(entries, name):
    if name not in entries:
        pytest.skip("reported by test_every_property_is_listed_exactly_once")
    line, value, description, env = entries[name][0]
    field = ServingProperties.model_fields[name]
    hint = f"line {line} of serving.properties.example should read:\n{expected_entry(name)}"
    assert description == f"# {field.description}", hint
    assert env == f"# env: {', '.join(env_variables(name))}", hint
    # Compare parsed values, so `DeepSpeed` matches the default `deepspeed` and `300` matches 300.0.
    assert ServingProperties(**{name: value}) == ServingProperties(), hint


def test_uncommenting_every_entry_gives_the_defaults(tmp_path):
    lines = [KEY_LINE.match(line).group(0)[2:] for line in EXAMPLE.read_text(encoding="utf-8").splitlines()
             if KEY_LINE.match(line)]
    assert len(lines) == len(ServingProperties.model_fields)
    (tmp_path / "serving.properties").write_text("\n".join(lines) + "\n")
    configuration = load_configuration(tmp_path, {})
    assert configuration.properties == ServingProperties()
    assert configuration.notes == []
    assert {source.kind for source in configuration.sources.values()} == {"serving.properties"}
    assert set(configuration.sources) == set(ServingProperties.model_fields)


def test_header_states_the_precedence():
    text = EXAMPLE.read_text(encoding="utf-8")
    for variable in [*LMI_ENV, *COMPAT_ENV, "SAGEMAKER_BIND_TO_PORT", "OPTION_<NAME>"]:
        assert variable in text
    assert all(line == "" or line.startswith("#") for line in text.splitlines()), "every line must stay commented"
