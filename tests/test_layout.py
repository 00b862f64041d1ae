"""The package's shape, read from its source with `ast` (no import runs): no import circles, nothing imports a
layer above its own, and no file or function outgrows what a reader can hold.

The layers, bottom to top, are in `LAYERS`; a module belongs to the layer of the longest prefix that names it.
A module may import its own layer and those below. `KNOWN_UPWARD` and `KNOWN_CIRCLES` list what is still to be
moved (issue 35); the tests fail on a new one *and* on a listed one that is gone, so the lists only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "gd_hf"

# Bottom to top. Leaves first; the commands (`python -m gd_hf.x`) last.
LAYERS: list[tuple[str, ...]] = [
    ("gd_hf.files", "gd_hf.weights", "gd_hf.pictures", "gd_hf.curves"),
    ("gd_hf.config",),
    ("gd_hf.data",),
    ("gd_hf.models",),
    ("gd_hf.method",),
    ("gd_hf.evaluation",),
    ("gd_hf.hub",),
    ("gd_hf.labelling",),
    ("gd_hf.run",),
    # The commands (`gd_hf.hub.space_app` is one: the Space's app.py).
    ("gd_hf.train", "gd_hf.evaluate", "gd_hf.predict", "gd_hf.push", "gd_hf.space", "gd_hf.label_next",
     "gd_hf.hub.space_app", "gd_hf"),
]  # fmt: skip

# (importer, imported): still to move.
KNOWN_UPWARD: set[tuple[str, str]] = set()
# Each circle as the sorted tuple of its modules.
KNOWN_CIRCLES: set[tuple[str, ...]] = set()

MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80
# path relative to gd_hf/ -> lines today (at most); (path, qualified function) -> the same. Still to split (issue 35).
KNOWN_LONG_FILES: dict[str, int] = {}
KNOWN_LONG_FUNCTIONS: dict[tuple[str, str], int] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str], module: str = "") -> set[str]:
    """The gd_hf modules `path` (the module `module`) imports, at any depth (function-level and `TYPE_CHECKING`
    imports count too: a circle through them is still a circle for the reader); relative ones resolved."""
    found: set[str] = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:  # `from .x import y`: absolute from here on
            base = package[: len(package) - (node.level - 1)]
            node = ast.ImportFrom(".".join(base + ([node.module] if node.module else [])), node.names, 0)
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from gd_hf.data import loading` reaches the module gd_hf.data.loading (the package's __init__ is
            # a docstring); `from gd_hf.config import Recipe` reaches gd_hf.config.
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [s for s in subs if s in known] or [node.module]
        else:
            continue
        found.update(n for n in names if n in known)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods), name) - {name} for name, path in mods.items()}


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            # (the bare package `gd_hf` is its __init__ only: a new module must be given its layer)
            inside = module.startswith(prefix + ".") and prefix != "gd_hf"
            if (module == prefix or inside) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer of tests/test_layout.py: add it to LAYERS"
    return best


def circles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[tuple[str, ...]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(tuple(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_new_import_circles():
    found = circles(import_graph())
    assert found - KNOWN_CIRCLES == set(), f"new import circles: {sorted(found - KNOWN_CIRCLES)}"
    assert KNOWN_CIRCLES - found == set(), f"gone (remove from KNOWN_CIRCLES): {sorted(KNOWN_CIRCLES - found)}"


def test_nothing_imports_a_layer_above_its_own():
    graph = import_graph()
    upward = {(a, b) for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a)}
    # `gd_hf.x` imports its own package `gd_hf` only to reach the package itself (its __init__), listed above.
    assert upward - KNOWN_UPWARD == set(), f"new upward imports: {sorted(upward - KNOWN_UPWARD)}"
    assert KNOWN_UPWARD - upward == set(), f"gone (remove from KNOWN_UPWARD): {sorted(KNOWN_UPWARD - upward)}"


def test_files_and_functions_stay_readable():
    long_files, long_functions = {}, {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        source = path.read_text()
        if (n := len(source.splitlines())) > MAX_FILE_LINES:
            long_files[rel] = n
        tree = ast.parse(source)
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                    child.parent_name = getattr(node, "name", "")  # type: ignore[attr-defined]
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    qual = ".".join(x for x in (getattr(node, "parent_name", ""), node.name) if x)
                    long_functions[(rel, qual)] = n
    # A listed one may shrink, not grow; one no longer long leaves the list.
    grown = {k: n for k, n in long_files.items() if n > KNOWN_LONG_FILES.get(k, MAX_FILE_LINES)}
    assert not grown, f"files over {MAX_FILE_LINES} lines (or longer than listed): {grown}"
    assert set(KNOWN_LONG_FILES) <= set(long_files), f"short now: {set(KNOWN_LONG_FILES) - set(long_files)}"
    grown = {k: n for k, n in long_functions.items() if n > KNOWN_LONG_FUNCTIONS.get(k, MAX_FUNCTION_LINES)}
    assert not grown, f"functions over {MAX_FUNCTION_LINES} lines (or longer than listed): {grown}"
    assert set(KNOWN_LONG_FUNCTIONS) <= set(long_functions), (
        f"short now: {set(KNOWN_LONG_FUNCTIONS) - set(long_functions)}"
    )


def test_the_graph_reader_sees_each_kind_of_import(tmp_path):
    """The checks above are only as good as `imports`: plain, from-module, from-package and nested imports."""
    source = tmp_path / "m.py"
    source.write_text(
        "import gd_hf.files\nfrom gd_hf.config import Recipe\nfrom gd_hf.data import loading\n"
        "def f():\n    from gd_hf import weights\nfrom . import coco\nfrom ..models import common\n"
    )
    known = {"gd_hf.files", "gd_hf.config", "gd_hf.data", "gd_hf.data.loading", "gd_hf.weights", "gd_hf",
             "gd_hf.data.coco", "gd_hf.models", "gd_hf.models.common"}  # fmt: skip
    assert imports(source, known, "gd_hf.data.m") == {"gd_hf.files", "gd_hf.config", "gd_hf.data.loading",
                                                      "gd_hf.weights", "gd_hf.data.coco", "gd_hf.models.common"}  # fmt: skip
    assert layer_of("gd_hf") == len(LAYERS) - 1
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("gd_hf.brand_new_module")  # a new module is placed, not defaulted to the top
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c")}


# The one place outside gd_hf/models/ that may spell a family's name in code: the recipe's default.
NAMES_A_FAMILY_BY_DESIGN = {"config/schema.py"}


def test_nothing_outside_a_familys_module_names_a_family():
    """The rest of the package asks `gd_hf.models` for a recipe's or an export's family: it imports no family
    module and compares with no family name (docstrings aside)."""
    family_modules = {"gd_hf.models.mask2former", "gd_hf.models.eomt", "gd_hf.models.vit_weights"}
    names = {"mask2former", "eomt"}
    graph = import_graph()
    found = []
    for module, path in modules().items():
        if module.startswith("gd_hf.models"):
            continue
        found += [f"{module} imports {m}" for m in sorted(graph[module] & family_modules)]
        rel = str(path.relative_to(PACKAGE))
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value.lower() in names and rel not in NAMES_A_FAMILY_BY_DESIGN:
                    found.append(f"{rel}:{node.lineno} spells {node.value!r}")
    assert not found, found


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "push", "space"])
def test_the_commands_keep_their_names(command, monkeypatch, capsys):
    """`python -m gd_hf.NAME` runs each command where the package moved its code (`push` and `space` live in
    `gd_hf/hub/`): its --help names the command as users type it."""
    import runpy
    import sys
    import warnings

    monkeypatch.setattr(sys, "argv", [f"gd_hf.{command}", "--help"])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules" (a test imported it)
        runpy.run_module(f"gd_hf.{command}", run_name="__main__", alter_sys=True)
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m gd_hf.{command} ")
