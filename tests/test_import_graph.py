"""The package's import graph, read from the source with `ast`: no circle, and no import from an earlier stage of the
pipeline into a later one (a back-edge). Every import counts, at module level or inside a function (a deferred
import hides a circle from Python, not from the design); imports under `if TYPE_CHECKING:` never run and are left
out."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from conftest import ROOT

PACKAGE = "sftmix_trl"

# The pipeline's layers, lowest first: a module may import its own layer and the layers before it. Each module is
# placed by the longest prefix listed; a module that matches none fails `test_every_module_has_a_layer`.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        # what every stage uses: errors, files, the parser, model and tokenizer loading, TRL's SFTTrainer as both
        # stages train through it, the perplexity engine, the run's folder and record; the package root loads its
        # public names lazily
        "foundation",
        (
            "sftmix_trl",
            "sftmix_trl.errors",
            "sftmix_trl.atomic",
            "sftmix_trl.bnb_cpu",
            "sftmix_trl.distributed",
            "sftmix_trl.sharded",
            "sftmix_trl.perplexity",
            "sftmix_trl.configs",
            "sftmix_trl.chat_templates",
            "sftmix_trl.model",
            "sftmix_trl.demo_model",
            "sftmix_trl.sft_trainer",
            "sftmix_trl.runs",
            "sftmix_trl.run_record",
            "sftmix_trl.launch_checks",
        ),
    ),
    ("data", ("sftmix_trl.data",)),
    ("stage 1", ("sftmix_trl.confidence",)),
    ("stage 2", ("sftmix_trl.sftmix",)),
    ("evaluation", ("sftmix_trl.evaluation",)),
    ("after training", ("sftmix_trl.after_training",)),
    ("entry points", ("sftmix_trl.commands", "sftmix_trl.cli")),
)


def package_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (a package by its `__init__.py`)."""
    modules = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, except the bodies of `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports. `from X import y` counts as importing X.y when that is a module,
    else X."""
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.update(
                f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target for alias in node.names
            )
    return {module for module in found if module in modules and module != name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = package_modules(root)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted; a module importing itself
    is not counted (`imported_modules` leaves it out)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def layer_of(module: str) -> int | None:
    best, best_length = None, -1
    for position, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = position, len(prefix)
    return best


def back_edges(graph: dict[str, set[str]]) -> list[str]:
    """`a (layer) -> b (later layer)` for every import of a later layer of the pipeline."""
    found = []
    for source in sorted(graph):
        for target in sorted(graph[source]):
            low, high = layer_of(source), layer_of(target)
            if low is not None and high is not None and high > low:
                found.append(f"{source} ({LAYERS[low][0]}) -> {target} ({LAYERS[high][0]})")
    return found


def describe(graph: dict[str, set[str]], component: list[str]) -> str:
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in component]
    return "circle " + ", ".join(component) + ": " + "; ".join(edges)


def test_the_checker_finds_a_circle_and_a_back_edge():
    graph = {"sftmix_trl.data.load": {"sftmix_trl.data.drops"}, "sftmix_trl.data.drops": {"sftmix_trl.data.load"}}
    assert circles(graph) == [["sftmix_trl.data.drops", "sftmix_trl.data.load"]]
    assert back_edges(
        {"sftmix_trl.data.load": {"sftmix_trl.confidence.table"}, "sftmix_trl.confidence.table": set()}
    ) == ["sftmix_trl.data.load (data) -> sftmix_trl.confidence.table (stage 1)"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_checker_reads_deferred_relative_imports_and_skips_type_checking_blocks(tmp_path):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .leaf import x\n")
    (package / "sub" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..errors import E\n"
        "def f():\n    from .. import errors\n    from ..sub import leaf\n"
    )
    graph = import_graph(tmp_path)
    assert graph["sftmix_trl.sub"] == {"sftmix_trl.sub.leaf"}
    assert graph["sftmix_trl.sub.leaf"] == {"sftmix_trl.errors"}


def test_every_module_has_a_layer():
    assert [module for module in import_graph() if layer_of(module) is None] == []


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    found = [describe(graph, component) for component in circles(graph)]
    assert not found, "\n".join(found)


def test_no_module_imports_a_later_stage_of_the_pipeline():
    found = back_edges(import_graph())
    assert not found, "\n".join(found)
