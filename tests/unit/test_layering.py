"""The layering rule: `entrypoint/` (configuration, model resolution, HTTP, the DJL edge) uses `handlers/`
(engines), never the reverse. Parsed with `ast`, so an import inside a function counts as much as one at
the top of a module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_check_sees_imports_anywhere_in_a_module():
    source = "import os\ndef f():\n    from entrypoint.http import errors\n    import entrypoint.cli\n"
    assert {"entrypoint.http", "entrypoint.cli"} <= imported_modules(source)


def test_no_module_under_handlers_imports_entrypoint():
    offenders = {}
    for path in sorted((ROOT / "handlers").rglob("*.py")):
        bad = sorted(name for name in imported_modules(path.read_text()) if name.split(".")[0] == "entrypoint")
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, f"handlers/ must not import entrypoint/: {offenders}"
