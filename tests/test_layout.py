"""The package's architecture, read from its source: circuits/ is subpackages whose imports run one way
(rules <- graph <- convert, phases, recording), with no import circle, none inside a function, and the
torch-free parts importable without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1] / "circuits"
LAYERS = {"errors": 0, "rules": 1, "graph": 2, "convert": 3, "phases": 3, "recording": 3}
"""A subpackage imports from its own layer's package and from lower layers only."""


def module_name(path: Path) -> str:
    parts = ["circuits", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (ROOT.parent / name.replace(".", "/") / "__init__.py").exists()


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, inside a function) for every import of circuits' own modules, TYPE_CHECKING blocks aside.
    Importing a.b.c runs a's and a.b's __init__ too: those count, except the importer's own packages."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("circuits")):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(p for p in (base, node.module) if p)
            for alias in node.names:       # `from . import rules` imports a module; `from .x import y`, x
                sub = f"{target}.{alias.name}"
                found.append((sub if is_package(sub) or (ROOT.parent / f"{sub.replace('.', '/')}.py").exists()
                              else target, in_function))
        elif isinstance(node, ast.Import):
            found.extend((a.name, in_function) for a in node.names if a.name.startswith("circuits"))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)} | {name}
    with_parents = []
    for target, in_function in found:
        parts = target.split(".")
        with_parents += [(".".join(parts[:i]), in_function) for i in range(2, len(parts) + 1)
                         if ".".join(parts[:i]) not in own]
    return with_parents


GRAPH = nx.DiGraph()
INSIDE_FUNCTIONS = []
for source in sorted(ROOT.rglob("*.py")):
    GRAPH.add_node(module_name(source))
    for target, in_function in imports(source):
        GRAPH.add_edge(module_name(source), target)
        if in_function:
            INSIDE_FUNCTIONS.append((module_name(source), target))


def layer(module: str) -> int:
    return LAYERS[module.split(".")[1]]


def test_circuits_is_subpackages_by_concept():
    top = sorted(p.name for p in ROOT.iterdir() if not p.name.startswith("__"))
    assert top == ["convert", "errors.py", "graph", "phases", "recording", "rules"]
    assert {"circuits.rules.synapse", "circuits.graph.circuit", "circuits.convert.fx", "circuits.phases.trainer",
            "circuits.recording.recorder"} <= set(GRAPH)


def test_no_import_circle():
    cycles = list(nx.simple_cycles(GRAPH))
    assert cycles == [], f"import circles: {cycles}"


def test_imports_run_one_way():
    upward = [(a, b) for a, b in GRAPH.edges if a != "circuits" and b != "circuits" and layer(b) > layer(a)]
    sideways = [(a, b) for a, b in GRAPH.edges if a != "circuits" and b != "circuits" and layer(b) == layer(a)
                and a.split(".")[1] != b.split(".")[1]]
    assert upward == [] and sideways == []
    # rules' modules import their siblings, never the rules package's own __init__
    assert [a for a, b in GRAPH.edges if b == "circuits.rules" and a.startswith("circuits.rules.")] == []
    assert not any(b == "circuits" for a, b in GRAPH.edges), "no module imports the top-level package"


def test_no_import_of_circuits_inside_a_function():
    assert INSIDE_FUNCTIONS == []


def test_the_test_sees_a_circle_and_an_upward_import(tmp_path):
    """The checks above can fail: a planted import of the network from a rule is an upward edge and a circle."""
    planted = GRAPH.copy()
    planted.add_edge("circuits.rules.base", "circuits.graph.network")
    assert layer("circuits.graph.network") > layer("circuits.rules.base")
    assert list(nx.simple_cycles(planted))


def test_torch_free_parts_import_without_torch():
    code = ("import sys, circuits.recording, circuits.recording.file, circuits.graph.schema, analysis; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT.parent)
