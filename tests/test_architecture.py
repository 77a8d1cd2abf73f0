"""The house rules of the package layout, checked on the source (docs/architecture.md).

Layers, lowest first; a module imports only from its own layer or lower ones, so data flows one way:
config -> wiring (plan) -> data -> model -> assign -> loss -> engine, and entry points (cli) sit on top.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["config", "runtime", "video", "models", "method", "data", "prepare", "dali_pipelines", "train", "eval",
          "plan", "cli", "pretrain"]
# optional or expensive imports that stay inside the function that needs them
MAX_FUNCTION_LEVEL_IMPORTS = 10
MAX_PARAMETERS = 9


def _modules() -> dict[str, Path]:
    mods = {}
    for base in ("goca_fast", "dali_pipelines"):
        for path in sorted((ROOT / base).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "dali_pipelines":
        return "dali_pipelines"
    return parts[1] if len(parts) > 1 else None


def _targets(node: ast.Import | ast.ImportFrom) -> list[str]:
    """Our modules an import statement names (absolute imports only: the package uses no relative ones)."""
    assert not (isinstance(node, ast.ImportFrom) and node.level), "relative import"
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                 for a in node.names]
    out = []
    for n in names:
        while n not in MODULES and "." in n:
            n = n.rsplit(".", 1)[0]
        if n in MODULES:
            out.append(n)
    return out


def _imports(tree: ast.AST, inside_function: bool = False):
    """(import node, inside a function?) for every import statement of a module."""
    for child in ast.iter_child_nodes(tree):
        nested = inside_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, inside_function
        yield from _imports(child, nested)


def _graph() -> dict[str, set[str]]:
    return {name: {t for node, _ in _imports(tree) for t in _targets(node) if t != name}
            for name, tree in TREES.items()}


def test_every_module_sits_in_a_known_layer():
    unknown = [m for m in MODULES if m not in ("goca_fast", "goca_fast.__init__") and _layer(m) not in LAYERS]
    assert unknown == []


def test_imports_only_run_down_the_layers():
    upward = [(a, b) for a, targets in _graph().items() for b in targets
              if _layer(a) in LAYERS and _layer(b) in LAYERS and LAYERS.index(_layer(b)) > LAYERS.index(_layer(a))]
    assert upward == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every back edge of a depth-first walk, as the cycle it closes."""
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_checker_sees_cycles_and_function_level_imports():
    """The helpers above on hand-made input: a -> b -> c -> a is one cycle, a tree none; an import inside a
    function is told apart from a module-level one."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    tree = ast.parse("def f():\n    import goca_fast.eval.knn\nimport goca_fast.config\n")
    found = sorted((_targets(n), inside) for n, inside in _imports(tree))
    assert found == [(["goca_fast.config"], False), (["goca_fast.eval.knn"], True)]
    assert _layer("goca_fast.data.cpu_loader") == "data" and _layer("dali_pipelines.eval") == "dali_pipelines"


def test_entry_points_are_imported_by_no_library_module():
    offenders = [(a, b) for a, targets in _graph().items() for b in targets
                 if _layer(b) in ("cli", "pretrain") and _layer(a) not in ("cli", "pretrain")]
    assert offenders == []


def test_few_modules_at_the_package_top():
    top = [m for m in MODULES if m.count(".") == 1 and m.startswith("goca_fast.")
           and not MODULES[m].name == "__init__.py"]
    assert len(top) <= 3, top


def test_few_function_level_imports():
    inner = [f"{name}:{node.lineno}" for name, tree in TREES.items() for node, inside in _imports(tree) if inside]
    assert len(inner) <= MAX_FUNCTION_LEVEL_IMPORTS, inner


def test_no_function_takes_ten_parameters():
    long = []
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
                if params and params[0] in ("self", "cls"):
                    params = params[1:]
                if len(params) > MAX_PARAMETERS:
                    long.append(f"{name}.{node.name} ({len(params)})")
    assert long == []


def test_kernels_hold_kernel_source_only():
    """kernels/ is CUDA source and its binding; the tools that inspect it live in benchmarks/gpu/."""
    suffixes = {p.suffix for p in (ROOT / "kernels").rglob("*") if p.is_file()}
    assert ".cu" in suffixes and suffixes <= {".cpp", ".cu", ".cuh", ".h"}, suffixes


@pytest.mark.parametrize("folder", ["goca_fast", "dali_pipelines", "configs", "kernels"])
def test_product_files_name_no_tracker_items_or_shared_paths(folder):
    pattern = re.compile(r"issue #\d|\(#\d+\)|\.\./shared|notes #\d")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / folder).rglob("*") if p.is_file()
            and p.suffix in (".py", ".yaml", ".cu", ".cuh", ".h", ".cpp")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
