"""The package layering the developers' guide asks for, read from the source (every import, including the
ones inside functions): `entrypoint/` uses `handlers/`, never the reverse, and the project's modules import
each other without cycles. No exception: the DJL handler, an edge like the HTTP server, is
`entrypoint/djl_handler.py`."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("entrypoint", "handlers", "quantization")


def _modules() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            imported = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    imported.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    imported.add(node.module)
                    imported.update(f"{node.module}.{alias.name}" for alias in node.names)
            graph[name] = imported
    return {name: {i for i in imported if i in graph and i != name} for name, imported in graph.items()}


def test_handlers_never_import_entrypoint():
    offenders = {name: sorted(i for i in imported if i.startswith("entrypoint"))
                 for name, imported in _modules().items() if name.startswith("handlers")}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_quantization_imports_neither_handlers_nor_entrypoint():
    """quantization/ is the library both use (the loaders quantize through it; `python -m entrypoint quality`
    measures it): it depends on neither."""
    offenders = {name: sorted(i for i in imported if i.startswith(("entrypoint", "handlers")))
                 for name, imported in _modules().items() if name.startswith("quantization")}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_protocol_and_the_djl_handler_do_not_depend_on_the_http_server():
    """`entrypoint/protocol/` is shared by the HTTP server and DJL's `handle()`: neither it nor the DJL handler
    imports `entrypoint.http`, and the protocol has no web framework in it."""
    offenders = {name: sorted(i for i in imported if i.startswith("entrypoint.http"))
                 for name, imported in _modules().items()
                 if name.startswith("entrypoint.protocol") or name == "entrypoint.djl_handler"}
    assert {name: found for name, found in offenders.items() if found} == {}
    frameworks = {}
    for path in (REPO / "entrypoint" / "protocol").rglob("*.py"):
        imported = {alias.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.ImportFrom) and node.module}
        found = sorted(i for i in imported if i.split(".")[0] in ("fastapi", "starlette", "uvicorn"))
        if found:
            frameworks[path.name] = found
    assert frameworks == {}


def test_no_import_cycles():
    graph = _modules()
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []
