"""The shape of the house, read from the code's own imports: the library never imports a command, and no two
packages import each other (directly or round a longer cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "statetune"
COMMAND_MODULES = ("statetune.cli", "statetune.__main__", "statetune.commands")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every statetune module and the statetune modules it imports (at any depth of the file)."""
    out: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name, found = _module_name(path), set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
        out[name] = {m for m in found if m == "statetune" or m.startswith("statetune.")}
    return out


def _floor(module: str) -> str:
    """The package (or top-level module) a module belongs to: ``statetune.train.loop`` -> ``statetune.train``."""
    return ".".join(module.split(".")[:2])


def _is_command(module: str) -> bool:
    return any(module == c or module.startswith(c + ".") for c in COMMAND_MODULES)


def test_the_library_never_imports_a_command():
    wrong = sorted(f"{m} imports {i}" for m, imps in _imports().items() if not _is_command(m)
                   for i in imps if _is_command(i))
    assert not wrong, "library modules import command modules:\n" + "\n".join(wrong)


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for m, imps in _imports().items():
        if m != "statetune":  # the package's own __init__ re-exports the public API from below
            graph.setdefault(_floor(m), set()).update(_floor(i) for i in imps if _floor(i) != _floor(m))
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "packages that import each other:\n" + "\n".join(cycles)


def test_no_module_over_300_lines():
    long = sorted(f"{p.relative_to(PACKAGE.parent)}: {n}" for p in PACKAGE.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > 300)
    assert not long, "modules over 300 lines:\n" + "\n".join(long)


def test_commands_import_the_library_not_each_other():
    """A command is a thin layer over the library; one command calling another would hide library logic in a
    command (the demo's recipe, for instance, calls the library's prepare, not the ``prepare`` command)."""
    wrong = sorted(f"{m} imports {i}" for m, imps in _imports().items() if m.startswith("statetune.commands.")
                   for i in imps if i.startswith("statetune.commands.") and i != m)
    assert not wrong, "commands that import other commands:\n" + "\n".join(wrong)
