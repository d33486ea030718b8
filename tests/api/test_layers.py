"""The layers of graphprune import downwards only, and no module imports itself in a cycle.

Imports are read as text (ast), module level and inside functions alike (a lazy import is
still a dependency), so the check needs nothing installed beyond the sources. Every module
must be placed in LAYERS: a new module fails here until someone decides where it belongs.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# bottom to top; a module may import its own layer and the layers below it
LAYERS = {
    "ir": {"errors", "argtypes", "op_families", "external_data", "model_io", "shape_eval", "graph", "kv_cache", "quantized", "runtime",
           "calibration", "compare", "paths", "wellformed", "torch_exec", "ort_macs"},
    "analysis": {"roles", "rule_context", "dependency", "cost", "pipeline", "branches"},
    "oprules": {"oprules", "oprules.*"},
    "passes": {"passes", "passes.*", "options", "activations", "fidelity", "verify", "verify_io", "api", "deploy", "depth", "plan"},
    "measure": {"backends", "backends.*", "bench", "latency", "latency.*", "report_html"},
    "cli": {"cli", "__main__", ""},  # "" is the package itself (graphprune/__init__.py re-exports the API)
}
ORDER = list(LAYERS)


def _modules(root: Path = ROOT) -> dict[str, Path]:
    """{dotted name relative to graphprune ('' for the package): path}; passes/ is graphprune.passes."""
    mods = {}
    for top, prefix in (("graphprune", ""), ("passes", "passes")):
        for path in (root / top).rglob("*.py"):
            rel = path.relative_to(root / top).with_suffix("")
            parts = [prefix] * bool(prefix) + list(rel.parts)
            if parts and parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _layer(mod: str) -> str | None:
    for layer, names in LAYERS.items():
        for n in names:
            if mod == n or (n.endswith(".*") and mod.startswith(n[:-1])):
                return layer
    return None


def _known(mods: dict[str, Path], dotted: str) -> bool:
    return dotted.removeprefix("graphprune").removeprefix(".") in mods


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """{module: modules of graphprune it imports}, both relative to graphprune."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        here = ["graphprune"] + (mod.split(".") if mod else [])
        base = here if is_pkg else here[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    prefix = base[: len(base) - node.level + 1]
                    target = ".".join(prefix + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [f"{target}.{a.name}" if _known(mods, f"{target}.{a.name}") else target
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t != "graphprune" and not t.startswith("graphprune."):
                    continue
                name = t.removeprefix("graphprune").removeprefix(".")
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name == mod:
                    continue
                # a module importing the package it sits in (whose __init__ re-exports it) is not
                # a dependency of design; the package's __init__ importing its modules is
                if name not in mods:
                    continue
                if mods[name].name == "__init__.py" and (name == "" or mod.startswith(name + ".")):
                    continue
                edges[mod].add(name)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def strong(v):
        work = [(v, iter(sorted(edges[v])))]
        index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]; counter[0] += 1; stack.append(nxt); on.add(nxt)
                    work.append((nxt, iter(sorted(edges[nxt]))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop(); on.discard(w); comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def _upward(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in sorted(edges.items()):
        for t in sorted(targets):
            lm, lt = ORDER.index(_layer(mod)), ORDER.index(_layer(t))
            if lt > lm:
                bad.append(f"graphprune.{mod} ({ORDER[lm]}) imports graphprune.{t} ({ORDER[lt]})")
    return bad


def test_every_module_has_a_layer():
    found = _modules()
    assert {"", "dependency", "cli", "passes", "oprules"} <= set(found), f"sources not found under {ROOT}"
    unplaced = sorted(m for m in found if _layer(m) is None)
    assert not unplaced, f"place these modules in tests/api/test_layers.py LAYERS: {unplaced}"


def test_no_import_cycle():
    cycles = _cycles(_edges(_modules()))
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_layers_import_downwards_only():
    bad = _upward(_edges(_modules()))
    assert not bad, "upward imports:\n" + "\n".join(bad)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("files, expect_cycle, expect_upward", [
    # graph (ir) imports the CLI lazily: upward, even inside a function
    ({"graphprune/__init__.py": "", "graphprune/graph.py": "def f():\n    from .cli import main\n",
      "graphprune/cli.py": "from .graph import f\n"}, True, True),
    # two analysis modules importing each other: a cycle inside one layer, nothing upward
    ({"graphprune/__init__.py": "", "graphprune/dependency.py": "from graphprune import cost\n",
      "graphprune/cost.py": "from .dependency import x\n"}, True, False),
    # an op rule importing the analysis layer is the intended direction
    ({"graphprune/__init__.py": "", "graphprune/oprules/__init__.py": "from .base import R\n",
      "graphprune/oprules/base.py": "from ..rule_context import RuleContext\n",
      "graphprune/rule_context.py": "from .graph import tensor_shape\n", "graphprune/graph.py": ""}, False, False),
])
def test_the_checks_catch_what_they_claim(tmp_path, files, expect_cycle, expect_upward):
    """The checker itself on small trees: it must see a lazy upward import and a same-layer cycle."""
    _write(tmp_path, files)
    (tmp_path / "passes").mkdir()
    edges = _edges(_modules(tmp_path))
    assert bool(_cycles(edges)) == expect_cycle
    assert bool(_upward(edges)) == expect_upward


def test_one_list_of_broadcasting_ops():
    """Shape refinement and the op rules read the same list (they had drifted: graph.py lacked the
    Bitwise ops and BitShift), and every op on it has the broadcasting rule."""
    from graphprune import graph, oprules
    from graphprune.op_families import BROADCAST_OPS

    assert oprules.BROADCAST_OPS is BROADCAST_OPS
    assert graph._BROADCAST == frozenset(BROADCAST_OPS)
    reg = oprules.default_registry()
    kinds = {type(reg.lookup("", op, 18)).__name__ for op in BROADCAST_OPS}
    assert kinds == {"Broadcast"}, kinds
