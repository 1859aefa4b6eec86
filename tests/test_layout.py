"""The package layout stays what the README's "Where things are" says: no import cycles between modules, the
CLI assembled in one place, the model families in their packages, and the run configuration above the models."""

from __future__ import annotations

import ast
from pathlib import Path

import typer

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "prismrec"


def module_files() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the prismrec modules it imports, lazy (function-level) imports included.

    ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``. The implicit import
    of a parent package by its submodules is not an edge: a package whose ``__init__`` re-exports its modules
    is not a cycle, a module that imports a module that imports it back is.
    """
    modules = module_files()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                resolved = resolve(target) if target.startswith("prismrec") else None
                if resolved and resolved != name:
                    graph[name].add(resolved)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_a_module_that_imports_it_back() -> None:
    graph = import_graph()
    assert len(graph) > 80  # the whole package was read
    assert cycles(graph) == []


def test_options_is_the_bottom_layer_and_models_never_import_the_run_config() -> None:
    graph = import_graph()
    assert graph["prismrec.options"] == set()
    importers = sorted(name for name, targets in graph.items() if "prismrec.config" in targets
                       and name.startswith("prismrec.models"))
    assert importers == []
    assert "prismrec.models" in graph["prismrec.config"]


def test_cli_is_one_package_assembled_by_its_app_module() -> None:
    assert not list(PACKAGE.glob("cli*.py")), "command modules live in prismrec/cli/"
    graph = import_graph()
    commands = {name for name in graph if name.startswith("prismrec.cli.")} - {"prismrec.cli.app"}
    assert {"prismrec.cli.data", "prismrec.cli.semantics", "prismrec.cli.train", "prismrec.cli.experiments",
            "prismrec.cli.serving", "prismrec.cli.llmrec", "prismrec.cli.report", "prismrec.cli.tune"} <= commands
    for name in commands | {"prismrec.cli"}:
        assert "prismrec.cli.app" not in graph[name], f"{name} imports the app back"
    assert commands - {"prismrec.cli.common"} <= graph["prismrec.cli.app"]


def test_model_families_live_in_their_packages() -> None:
    families = {
        "prismrec.models.backbones": {"sasrec", "bert4rec", "gru4rec", "layers"},
        "prismrec.models.enhancers": {"dmesr", "cpmm", "qarm", "xreflect", "adapters", "alignment", "cross_attention"},
        "prismrec.llmrec": {"causal_lm", "mllm_msr", "speeder"},
    }
    modules = module_files()
    for package, members in families.items():
        assert ast.get_docstring(ast.parse(modules[package].read_text(encoding="utf-8"))), f"{package} says what it is"
        for member in members:
            assert f"{package}.{member}" in modules, f"{package}.{member}"
    # what is left at the top of models/ is the shared interface, not a model family
    top = {path.stem for path in (PACKAGE / "models").glob("*.py")}
    assert top == {"__init__", "base", "losses", "popularity", "registry"}


def test_every_command_is_still_there() -> None:
    from prismrec.cli.app import app

    def paths(command: object, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
        sub = getattr(command, "commands", None)
        if not sub:
            return {prefix}
        return {path for name, child in sub.items() for path in paths(child, (*prefix, name))}

    found = {" ".join(path) for path in paths(typer.main.get_command(app))}
    assert found == {
        "data stats", "data download", "data fetch-images", "derive", "semantics status", "semantics show",
        "train", "evaluate", "compare", "reproduce", "tune", "export", "serve", "recommend",
        "mllm-msr train", "mllm-msr evaluate", "speeder train",
    }
