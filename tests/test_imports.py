"""The package's house rules: stage packages without import cycles, every module importable on its own in any
order, and no module much over 600 lines unless its docstring says why."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from capret_utils.common import repo_root

ROOT = repo_root()
PACKAGE = ROOT / "capret_utils"
MAX_LINES = 650  # "about 600": a module longer than this states why in its docstring ("Longer than 600 lines: ...")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports_of(name: str) -> set[str]:
    """Every capret_utils module ``name`` imports, at top level or inside functions (hidden imports count)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name and target != "capret_utils":
                found.add(target)
                # importing a.b.c first runs the package a.b's __init__ (unless the importer lives inside it)
                parent = target.rpartition(".")[0]
                while parent and parent != "capret_utils" and not name.startswith(parent + "."):
                    if parent in MODULES and parent != name:
                        found.add(parent)
                    parent = parent.rpartition(".")[0]
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_reference_cases():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a2"}, "a2": set(), "b": {"b"}}) == ["b", "b"]


def test_a_submodule_import_counts_its_package_init():
    # captions.runner imports captions.tiny; importing captions.tiny from outside runs captions/__init__
    assert "capret_utils.captions" in imports_of("capret_utils.train.model")


def test_no_import_cycles_between_modules():
    graph = {name: imports_of(name) for name in MODULES}
    assert graph["capret_utils.train.loop"] >= {"capret_utils.train.criterion", "capret_utils.evaluation.embed"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_common_imports_no_stage():
    assert imports_of("capret_utils.common") == set()


def test_data_stage_imports_no_later_stage_except_the_model_processor():
    later = ("capret_utils.captions", "capret_utils.train", "capret_utils.evaluation", "capret_utils.viz",
             "capret_utils.runs")
    for name in MODULES:
        if name.startswith("capret_utils.data"):
            bad = sorted(m for m in imports_of(name) if m.startswith(later))
            assert not bad, f"{name} imports a later stage: {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("order", ["forward", "reversed"])
def test_every_module_imports_in_a_fresh_interpreter(order):
    names = sorted(MODULES)
    if order == "reversed":
        names.reverse()
    code = "import importlib\nfor n in %r:\n    importlib.import_module(n)\n" % names
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_modules_stay_short_or_say_why():
    long = []
    for name, path in MODULES.items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if n > MAX_LINES and "Longer than 600 lines" not in doc:
            long.append(f"{name} ({n} lines)")
    assert not long, f"modules over {MAX_LINES} lines without a reason in the docstring: {long}"


def test_every_package_says_what_it_owns():
    for name, path in MODULES.items():
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc and len(doc) > 30, f"{name} has no docstring saying what it owns"
