"""The folder tree is the architecture: layers import only downward, nothing imports in a
circle (function-level imports included), and no module grows past 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lowest first; a module may import its own layer and the ones before it. stages.monitoring
# (the serving cores: detectors, drift, telemetry, access) sits above stages.models because it
# loads verified models and reads the champion's signed records, and below the stage modules
# and flows because the service, the playbooks and the drill all build on it.
LAYERS = ["stages.core", "stages.trust", "stages.data", "stages.ml", "stages.screening", "stages.models",
          "stages.monitoring", "stages", "flows"]
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("stages", "flows"):
        for path in (ROOT / top).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def _layer(module: str) -> int:
    return max(i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + "."))


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Project modules each module imports, at any depth of its code."""
    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                hit = resolve(target)
                if hit and hit != name and not (modules[hit].name == "__init__.py" and target == hit and hit in name):
                    edges.add(hit)
        graph[name] = edges
    return graph


def test_layers_import_only_downward():
    modules = _modules()
    upward = [f"{m} ({LAYERS[_layer(m)]}) imports {t} ({LAYERS[_layer(t)]})"
              for m, targets in _imports(modules).items() for t in sorted(targets) if _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    graph = _imports(_modules())
    # a package's __init__ re-exports its children: edges into an __init__ from its own
    # children are the package importing itself, not a circle between modules
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_module_past_the_limit():
    big = {str(p.relative_to(ROOT)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_the_documented_loader_stays_where_users_import_it():
    from stages.models.verify import load_verified_model
    from stages.register import load_verified_model as documented

    assert documented is load_verified_model
