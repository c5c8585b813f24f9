"""The house shows the architecture: agent/ is laid out by stage, and a stage imports only the
stages below it (type-only imports included); no module of agent/ takes part in an import cycle.
The order, bottom up, is the table in CONTRIBUTING.md."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["core", "config", "windows", "intake", "durable", "forward", "ops", "app", "sim", "cli"]


def _imports() -> dict[str, set[str]]:
    """Module -> the agent modules it imports (whatever the import's place: top, function,
    TYPE_CHECKING)."""
    graph: dict[str, set[str]] = {}
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (ROOT / "agent").rglob("*.py")
    }
    for mod, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            deps |= {n for n in names if n in modules and n != mod}
        graph[mod] = deps
    return graph


def _stage(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in STAGES else None


def test_every_module_lives_in_a_stage() -> None:
    loose = [
        m for m in _imports() if m.count(".") == 1 and m.split(".")[1] not in [*STAGES, "_build"]
    ]
    assert loose == [], f"modules outside the stages: {loose}"


def test_a_stage_imports_only_stages_below_it() -> None:
    up = sorted(
        f"{mod} -> {dep}"
        for mod, deps in _imports().items()
        for dep in deps
        if (s := _stage(mod)) and (d := _stage(dep)) and STAGES.index(d) > STAGES.index(s)
    )
    assert up == [], "a stage reaches up:\n" + "\n".join(up)


def test_no_import_cycle_in_agent() -> None:
    graph = _imports()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"
