"""The modules of server/model import one another one way only: no cycle, type-only imports included."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

import server.model

PACKAGE = Path(server.model.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every `server...` module `path` imports anywhere, `if TYPE_CHECKING:` blocks and function bodies included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("server"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from server.model import x`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("server"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {f"server.model.{path.stem}": path for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    return {name: _imports(path) & modules.keys() for name, path in modules.items()}


def test_server_model_imports_form_no_cycle():
    try:
        order = list(TopologicalSorter(_graph()).static_order())
    except CycleError as exc:
        raise AssertionError(f"server/model has an import cycle: {' -> '.join(exc.args[1])}") from None
    assert order.index("server.model.routing") < order.index("server.model.lora") < order.index("server.model.linear")
    assert order.index("server.model.linear") < order.index("server.model.merge")


def test_server_model_knows_nothing_of_adapters_engine_or_api():
    outside = {
        path.stem: sorted(m for m in _imports(path) if m.startswith(("server.adapters", "server.engine", "server.api")))
        for path in PACKAGE.glob("*.py")
    }
    assert {name: modules for name, modules in outside.items() if modules} == {}


def test_the_check_sees_a_cycle_held_together_by_type_hints(tmp_path):
    (tmp_path / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from server.model.b import B\n"
    )
    (tmp_path / "b.py").write_text("from server.model.a import A\n")
    graph = {f"server.model.{path.stem}": _imports(path) for path in tmp_path.glob("*.py")}
    with pytest.raises(CycleError):
        TopologicalSorter(graph).prepare()
