"""docs/configuration.md and docs/lmi-migration.md are what the code says: regenerated and compared, so a
property or LMI key added, renamed or re-described without `python -m entrypoint docs` fails here; and the
keys they document are the keys the parser accepts (serving.properties.example's included)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from entrypoint import lmi_keys, reference_docs
from entrypoint.cli import main
from entrypoint.configuration import load_configuration
from handlers.serving_properties import ServingProperties

DOCS = Path(__file__).resolve().parents[2] / "docs"
EXAMPLE = Path(__file__).resolve().parents[2] / "serving.properties.example"
ROW = re.compile(r'^\| <a id="(?P<name>[a-z0-9_]+)"></a>(?P<keys>[^|]+) \| (?P<env>[^|]+) \| (?P<type>[^|]+) \| '
                 r'(?P<range>[^|]*) \| (?P<default>[^|]*) \| (?P<description>.*) \|$')


def rows() -> dict[str, dict[str, str]]:
    text = (DOCS / reference_docs.CONFIGURATION_MD).read_text(encoding="utf-8")
    return {match["name"]: match.groupdict() for match in map(ROW.match, text.splitlines()) if match}


@pytest.mark.parametrize("name", [reference_docs.CONFIGURATION_MD, reference_docs.LMI_MIGRATION_MD])
def test_generated_docs_match_the_code(name):
    path = DOCS / name
    assert path.is_file(), f"{path} is missing: run {reference_docs.REGENERATE}"
    assert path.read_text(encoding="utf-8") == reference_docs.generated()[name], \
        f"{path} is out of date: run {reference_docs.REGENERATE}"


def test_configuration_md_has_one_row_per_property_with_its_variables_and_default():
    found = rows()
    assert list(found) == list(ServingProperties.model_fields)
    max_tokens = found["max_tokens"]
    assert (max_tokens["keys"], max_tokens["env"], max_tokens["type"], max_tokens["range"], max_tokens["default"]) \
        == ("`option.max_tokens`", "`OPTION_MAX_TOKENS`", "integer", ">= 1", "`4096`")
    assert found["tensor_parallel_degree"]["env"] == \
        "`OPTION_TENSOR_PARALLEL_DEGREE`, `TENSOR_PARALLEL_DEGREE`, `SM_NUM_GPUS`"
    assert found["tensor_parallel_degree"]["type"] == "integer or max"
    assert found["port"]["env"].startswith("`SAGEMAKER_BIND_TO_PORT`")
    assert found["dtype"]["type"] == "one of auto, fp32, fp16, bf16"
    assert found["quantize"]["type"] == "one of smoothquant, dynamic_int8 (empty: unset)"
    assert found["engine"]["keys"] == "`option.engine`, `engine`"


def test_every_documented_key_and_variable_is_accepted_with_its_documented_default(tmp_path):
    """What the reference says is what the parser does: each key, written with its documented default in
    serving.properties or in its last (lowest-precedence) environment variable, loads and leaves the defaults
    unchanged."""
    lines = []
    for name, row in rows().items():
        key = row["keys"].split(", ")[-1].strip("`")  # the top-level spelling where there is one
        default = row["default"].strip("`")
        lines.append(f"{key}={default}")
        variable = row["env"].split(", ")[-1].strip("`")
        if variable != "SAGEMAKER_BIND_TO_PORT" and default:
            assert load_configuration(tmp_path / "none", {variable: default}).properties == ServingProperties(), name
    (tmp_path / "serving.properties").write_text("\n".join(lines) + "\n")
    assert load_configuration(tmp_path, {}).properties == ServingProperties()


def test_every_key_in_the_example_is_in_the_reference():
    documented = set(rows())
    example_keys = re.findall(r"^# (?:option\.)?([a-z0-9_]+)=", EXAMPLE.read_text(encoding="utf-8"), re.MULTILINE)
    assert example_keys and set(example_keys) <= documented
    assert documented <= set(example_keys)  # and the example lists them all


def test_lmi_migration_md_lists_every_lmi_key_once():
    text = (DOCS / reference_docs.LMI_MIGRATION_MD).read_text(encoding="utf-8")
    listed = re.findall(r"^\| `([^`]+)` \| (?:`OPTION_[A-Z0-9_]+`)? \|", text, re.MULTILINE)
    assert sorted(listed) == sorted(entry.key for entry in lmi_keys.LMI_KEYS)
    assert "| `option.max_model_len` | `OPTION_MAX_MODEL_LEN` | [`max_tokens`](configuration.md#max_tokens) |" in text
    assert "| `option.device_map` | `OPTION_DEVICE_MAP` | HF Accelerate | tensor_parallel_degree decides the GPUs" in text


def test_docs_command_writes_then_checks(tmp_path, capsys):
    assert main(["docs", "--check", "--docs-dir", str(tmp_path)]) == 1  # missing files are stale
    assert "configuration.md is out of date: run python -m entrypoint docs" in capsys.readouterr().err
    assert main(["docs", "--docs-dir", str(tmp_path)]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["configuration.md", "lmi-migration.md"]
    assert main(["docs", "--check", "--docs-dir", str(tmp_path)]) == 0
    (tmp_path / "lmi-migration.md").write_text("edited by hand\n")
    assert main(["docs", "--check", "--docs-dir", str(tmp_path)]) == 1
    assert "lmi-migration.md is out of date" in capsys.readouterr().err
