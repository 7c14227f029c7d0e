"""The import graph of the library and the programs, read from their source: no cycles, and data flows one way
(diffclip imports neither program; eval/ does not import training/). Imports inside functions count too."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"diffclip": ROOT / "diffclip", "diffclip.training": ROOT / "training", "diffclip.eval": ROOT / "eval"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod when there is one
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles_and_one_way_data_flow():
    graph = _graph()
    # the two cycles this guards against: factory <-> hub, readers <-> readers_* (the registry is one way)
    assert "diffclip.factory" not in graph["diffclip.hub"] and "diffclip.cli" not in graph["diffclip.hub"]
    families = [m for m in graph if m.startswith("diffclip.eval.readers_")]
    assert len(families) >= 6 and all("diffclip.eval.readers" not in graph[m] for m in families)
    assert {"diffclip.eval.readers_registry", "diffclip.eval.readers_emoji"} <= graph["diffclip.eval.readers"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    library = [m for m in graph if not m.startswith(("diffclip.training", "diffclip.eval"))]
    for name in library:
        assert not {t for t in graph[name] if t.startswith(("diffclip.training", "diffclip.eval"))}, name
    for name in (m for m in graph if m.startswith("diffclip.eval")):
        assert not {t for t in graph[name] if t.startswith("diffclip.training")}, name


def test_a_planted_cycle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
