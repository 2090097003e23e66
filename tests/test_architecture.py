"""The layers of docs/ARCHITECTURE.md: imports go downward only and never form a cycle.

Every module of the package (kernels/ included, as sr3_engine.kernels) is parsed, and every
import in it counts, also those inside functions. A package's own __init__ running before its
submodules is Python's import order, not a dependency, so it is not an edge.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"sr3_engine": ROOT / "sr3_engine", "sr3_engine.kernels": ROOT / "kernels"}

# Lowest first. A module may import its own layer and the layers below it, nothing above.
LAYERS = [
    ("foundation", ("config", "io", "resize", "metrics", "ops")),
    ("op backends", ("_ext", "kernels", "op_backends")),
    ("model", ("unet",)),
    ("diffusion math", ("schedules", "diffusion", "samplers", "distillation")),
    ("runtime", ("runtime",)),
    ("training", ("training",)),
    ("serving", ("serving",)),
    ("commands", ("cli", "__main__", "train", "evaluate", "export", "demo")),
    ("package", ("",)),
]


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its body."""
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from X import Y` imports the module X.Y when there is one, else a name from X.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        edges.update(t for t in targets if t in modules and t != name)
    return edges


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(name: str) -> int:
    relative = name.removeprefix("sr3_engine").removeprefix(".")
    top = relative.split(".")[0]
    for index, (_, members) in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{name} is in no layer of LAYERS: add it where docs/ARCHITECTURE.md puts it")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
    return found


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_layers_import_downward_only():
    upward = [f"{source} ({LAYERS[_layer(source)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
              for source, targets in _graph().items() for target in targets if _layer(target) > _layer(source)]
    assert upward == []


@pytest.mark.parametrize("source, expected", [
    ("import sr3_engine.samplers\nfrom .ops import dispatch\n", {"sr3_engine.samplers", "sr3_engine.ops.dispatch"}),
    ("def f():\n    from . import ops\n", {"sr3_engine.ops"}),
])
def test_the_parser_sees_every_kind_of_import(tmp_path, source, expected):
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    modules = {**_modules(), "sr3_engine.probe": probe}
    assert _imports("sr3_engine.probe", probe, modules) == expected


def test_a_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
