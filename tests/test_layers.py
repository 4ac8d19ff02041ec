"""The layer rule, read from the source: which part of the engine may import which.

* the core (``traboule/model.py``, ``errors.py``, ``metrics.py``, ``bus/``, ``formats/``, ``translate/``,
  ``stores/``) imports neither ``traboule.app`` nor ``traboule.channels`` nor ``traboule.adapters``;
* adapters (protocol I/O) import no channel, store, translation or application module;
* nobody imports the folders ``channels`` / ``adapters`` by their top-level name (they install as
  ``traboule.channels`` and ``traboule.adapters``);
* the sub-packages of ``traboule`` import each other without a cycle at import time.

Every ``import`` counts, in a function as well as at the top of a module, and ``if TYPE_CHECKING:`` ones too for
the rules (a type names a dependency as much as a call does); only what runs at import time makes a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT

CORE = {"model", "errors", "metrics", "channel", "tls", "audit", "bus", "formats", "translate", "stores"}
ABOVE_CORE = {"app", "channels", "adapters"}
NOT_FOR_ADAPTERS = {"app", "channels", "stores", "translate"}
SOURCES = {
    "traboule": ROOT / "traboule",
    "traboule.channels": ROOT / "channels",
    "traboule.adapters": ROOT / "adapters",
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. traboule.stores.worklist
    target: str  # the module or name imported, e.g. traboule.formats.dicom_match
    line: int
    at_import_time: bool  # at module level (not in a function, not under ``if TYPE_CHECKING:``)

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def module_name(prefix: str, root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([prefix, *parts])


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str, tree: ast.Module, *, package: bool) -> Iterator[Import]:
    """Every import in ``tree`` (relative ones resolved), ``from X import Y`` also as ``X.Y`` (Y may be a module)."""

    def visit(node: ast.AST, at_import_time: bool) -> Iterator[Import]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno, at_import_time)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if package else module.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join([*here, base] if base else here)
            yield Import(module, base, node.lineno, at_import_time)
            for alias in node.names:
                if alias.name != "*":
                    yield Import(module, f"{base}.{alias.name}", node.lineno, at_import_time)
        for child in ast.iter_child_nodes(node):
            runs_now = at_import_time and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(node, ast.If) and _is_type_checking(node) and child in node.body:
                runs_now = False
            yield from visit(child, runs_now)

    yield from visit(tree, True)


def all_imports() -> list[Import]:
    found = []
    for prefix, root in SOURCES.items():
        for path in sorted(root.rglob("*.py")):
            name = module_name(prefix, root, path)
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            found.extend(imports_of(name, tree, package=path.name == "__init__.py"))
    return found


def layer(name: str) -> str | None:
    """The sub-package (or top-level module) of ``traboule`` a dotted name belongs to; None outside traboule."""
    parts = name.split(".")
    if parts[0] != "traboule":
        return None
    return parts[1] if len(parts) > 1 else "traboule"


IMPORTS = all_imports()


def test_the_scan_sees_every_layer_and_its_known_imports() -> None:
    """A vacuous scan would pass every rule: it must see each layer and imports we know are there."""
    layers = {layer(i.module) for i in IMPORTS}
    assert layers >= CORE | ABOVE_CORE
    seen = {(i.module, i.target) for i in IMPORTS}
    assert ("traboule.channels.worklist", "traboule.adapters.dicom_mwl.WorklistSCP") in seen
    assert ("traboule.stores.worklist", "traboule.formats.worklist_item") in seen
    in_functions = [
        i for i in IMPORTS if not i.at_import_time and layer(i.module) == "app" and layer(i.target) != "app"
    ]
    assert in_functions, "imports inside functions are part of the scan"


def test_the_core_imports_neither_the_application_nor_channels_nor_adapters() -> None:
    wrong = [str(i) for i in IMPORTS if layer(i.module) in CORE and layer(i.target) in ABOVE_CORE]
    assert wrong == []


def test_adapters_import_no_channel_store_translation_or_application_module() -> None:
    wrong = [str(i) for i in IMPORTS if layer(i.module) == "adapters" and layer(i.target) in NOT_FOR_ADAPTERS]
    assert wrong == []


def test_nothing_imports_the_channels_or_adapters_folders_by_their_top_level_name() -> None:
    sources = [*SOURCES.values(), ROOT / "tests", ROOT / "bench", ROOT / "docs"]
    wrong = []
    for root in sources:
        for path in sorted(root.rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                wrong += [
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {n}"
                    for n in names
                    if n.split(".")[0] in ("channels", "adapters")
                ]
    assert wrong == []


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(edges.get(node, ())):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}}) == []


def test_the_sub_packages_import_each_other_without_a_cycle() -> None:
    """At import time: ``app`` may import anything, ``channels`` the core, adapters and the application's services,
    and the core packages form a DAG."""
    edges: dict[str, set[str]] = {}
    why: dict[tuple[str, str], str] = {}
    for i in IMPORTS:
        source, target = layer(i.module), layer(i.target)
        if i.at_import_time and source and target and source != target:
            edges.setdefault(source, set()).add(target)
            why.setdefault((source, target), str(i))
    found = cycles(edges)
    explained = [[why[(a, b)] for a in component for b in component if (a, b) in why] for component in found]
    assert explained == []


def test_imports_in_functions_relative_and_for_type_checking_are_read() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "if TYPE_CHECKING:\n"
        "    from traboule.channels.fhir import FHIRChannel\n"
        "def f():\n"
        "    import traboule.app.metrics\n"
    )
    found = list(imports_of("traboule.stores.example", ast.parse(source), package=False))
    assert ("traboule.stores.sibling", True) in {(i.target, i.at_import_time) for i in found}
    assert ("traboule.channels.fhir.FHIRChannel", False) in {(i.target, i.at_import_time) for i in found}
    assert ("traboule.app.metrics", False) in {(i.target, i.at_import_time) for i in found}
    assert [layer(i.target) for i in found if layer(i.target) in ABOVE_CORE] == ["channels", "channels", "app"]
