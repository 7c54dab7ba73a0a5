"""The package's layering (docs/dev/architecture.md): no module imports a layer above its own, and no
import cycle, lazy (function-level) imports included: read from the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import bids_cl

PACKAGE = Path(bids_cl.__file__).parent

# Lowest first. A module may import its own layer or any layer below.
LAYERS: list[tuple[str, ...]] = [
    ("bids_cl", "bids_cl._version", "bids_cl.errors", "bids_cl.derivatives", "bids_cl.derivatives.spec",
     "bids_cl.derivatives.records"),
    ("bids_cl.utils",),
    ("bids_cl.engine", "bids_cl.preproc", "bids_cl.synth", "bids_cl.longitudinal"),
    ("bids_cl.config", "bids_cl.evaluation", "bids_cl.train", "bids_cl.derivatives.writer",
     "bids_cl.derivatives.reader"),
    ("bids_cl.interfaces",),
    ("bids_cl.workflows",),
    ("bids_cl.reports",),
    ("bids_cl.group",),
    ("bids_cl.cli", "bids_cl.__main__"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    best, level = -1, None
    for index, names in enumerate(LAYERS):
        for name in names:
            # The package itself ("bids_cl") is its own __init__ only, not a prefix of everything.
            inside = module.startswith(name + ".") and name != "bids_cl"
            if (module == name or inside) and len(name) > best:
                best, level = len(name), index
    assert level is not None, f"{module} is in no layer: add it to LAYERS and the architecture page"
    return level


def _imports(path: Path, module: str, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # `if TYPE_CHECKING:` blocks run no import
        nodes = [n for n in nodes if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    known = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in known and name != module}


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_imports_a_layer_above_it() -> None:
    upward = []
    for module, path in _modules().items():
        for imported in _imports(path, module, top_level_only=False):
            if _layer(imported) > _layer(module):
                upward.append(f"{module} (layer {_layer(module)}) imports {imported} "
                              f"(layer {_layer(imported)})")
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    graph = {m: _imports(p, m, top_level_only=False) for m, p in _modules().items()}
    # A package's __init__ importing its own submodules is how Python packages work, not a cycle.
    for module, deps in graph.items():
        graph[module] = {d for d in deps if not module.startswith(d + ".")}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*stack[stack.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)
