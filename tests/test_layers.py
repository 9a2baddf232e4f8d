"""One-way layers: every module of mechcliff has a layer, and no import (top-level, function-local or under
``TYPE_CHECKING``) points up the layer order or closes a cycle. The table is docs/architecture.md's diagram.

A new module gets a line in :data:`LAYERS`; a module that needs something of a higher layer is in the wrong layer,
or the thing it needs is (move the shared piece down).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "mechcliff"

#: Layer order, lowest first: a module may import its own layer or a lower one.
ORDER = ("foundation", "presentation", "model", "data", "units", "analyses", "experiments", "commands", "api")

LAYERS: dict[str, str] = {
    # foundation: errors, I/O, formatting, results, statistics, versions -- imports nothing of mechcliff above it
    "errors": "foundation", "fmt": "foundation", "stats": "foundation", "results": "foundation",
    "head_scores": "foundation", "runlock": "foundation", "versions": "foundation", "files": "foundation",
    "resources": "foundation",  # data files shipped with the package (the lock, prompt sets, the adapter)
    # presentation: figure builders and HTML, from arrays (a leaf: plotting libraries and the foundation only)
    "plotting": "presentation", "report": "presentation",
    # model: handle, loading, presets, organism, conformance, hook sites and the one capture function
    "model": "model", "model.handle": "model", "model.loading": "model", "model.conformance": "model",
    "model.organism": "model", "model.upstream": "model", "model.capture": "model", "model.presets": "model",
    "model.sites": "model", "model.plain": "model",
    # data and encoding: prompt / rollout I/O, chat templates and token-exact spans
    "data": "data", "chat": "data",
    "rollout_import": "data",  # rollouts written elsewhere (vLLM, OpenAI API, HF datasets, STAR-1)
    # the units analyses are made of: interventions, control sets, judges, probes, rollout generation
    "interventions": "units", "controls": "units", "judges": "units", "probe": "units", "generation": "units",
    "folding": "units",  # interventions folded into a copy's weights (ablated generation without hooks, export)
    # analyses: one method per module; no argparse, no print
    "trace": "analyses", "attribution": "analyses", "patching": "analyses", "ships": "analyses", "asr": "analyses",
    "sweep": "analyses", "modes": "analyses", "refusal_heads": "analyses", "neurons": "analyses",
    "safety_layers": "analyses", "spectral": "analyses", "judging": "analyses", "selection": "analyses",
    "repair": "analyses",
    # experiments: run folders, stages, manifests, run-level figures and reports
    "pipeline": "experiments", "repair_curve": "experiments", "learned_organism": "experiments", "stages": "experiments",
    "figures": "experiments", "report_run": "experiments",
    # commands: the command line, a thin layer over the API
    "cli": "commands", "cli_rim": "commands", "cli_tools": "commands", "cli_cot": "commands",
    # the package's lazy public API and `python -m mechcliff`
    "": "api", "__main__": "api",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str | None:
    """The layer of a module: its own entry, else its package's (``spectral.kernels`` → ``spectral``)."""
    while True:
        if module in LAYERS:
            return LAYERS[module]
        if "." not in module:
            return LAYERS.get(module)
        module = module.rsplit(".", 1)[0]


KNOWN = {_module_name(p) for p in PACKAGE.rglob("*.py")}


def _type_only_lines(tree: ast.AST) -> set[int]:
    """Lines of imports under ``if TYPE_CHECKING:`` (annotations only: never run, so never part of a cycle)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {n.lineno for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def _imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str, bool]]:
    """Every mechcliff module ``source`` imports, anywhere in the file, as (line, module name without
    'mechcliff.', whether the import is for type checking only)."""
    tree = ast.parse(source)
    type_only = _type_only_lines(tree)
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".") if package else []
                up = up[:len(up) - node.level + 1]
                base = ".".join(["mechcliff", *up, *([base] if base else [])])
            names = [f"{base}.{a.name}" for a in node.names] if base.startswith("mechcliff") else []
        for full in names:
            if full != "mechcliff" and not full.startswith("mechcliff."):
                continue
            target = full.removeprefix("mechcliff").lstrip(".")
            while target and target not in KNOWN:  # `from mechcliff.x import name`: the module is x
                target = target.rpartition(".")[0]
            if target != module:
                out.append((node.lineno, target, node.lineno in type_only))
    return out


def _graph() -> dict[str, list[tuple[int, str, bool]]]:
    return {_module_name(p): _imports(p.read_text(), _module_name(p), p.name == "__init__.py")
            for p in sorted(PACKAGE.rglob("*.py"))}


def _upward(graph: dict[str, list[tuple[int, str, bool]]]) -> list[str]:
    up = []
    for module, imports in graph.items():
        mine = ORDER.index(_layer(module) or "api")
        for line, target, _type_only in imports:
            if ORDER.index(_layer(target) or "api") > mine:
                up.append(f"mechcliff/{module.replace('.', '/') or '__init__'}:{line} ({_layer(module)}) imports "
                          f"{target or 'mechcliff'} ({_layer(target)})")
    return up


def test_every_module_has_a_layer():
    missing = sorted(m for m in _graph() if _layer(m) is None)
    assert not missing, f"modules without a layer in tests/test_layers.py LAYERS: {missing}"
    assert set(LAYERS.values()) <= set(ORDER)


def test_no_import_points_up():
    up = _upward(_graph())
    assert not up, "imports that point up the layer order:\n" + "\n".join(up)


def test_no_import_cycles():
    graph = {m: sorted({t for _, t, type_only in imps if not type_only}) for m, imps in _graph().items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, []):
            # a package's modules import their siblings through it and it re-exports them: not a cycle
            if nxt and (node.startswith(nxt + ".") or nxt.startswith(node + ".")):
                continue
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_local_and_upward_imports():
    """The checks cannot pass vacuously: function-local, relative and TYPE_CHECKING imports are all seen."""
    src = """
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from mechcliff.model.handle import ModelHandle
def f():
    from mechcliff.pipeline import Run
    from . import probe
"""
    found = {(t, type_only) for _, t, type_only in _imports(src, "errors")}
    assert found == {("model.handle", True), ("pipeline", False), ("probe", False)}
    assert len(_upward({"errors": _imports(src, "errors")})) == 3
    assert _upward({"pipeline": _imports(src, "pipeline")}) == []
