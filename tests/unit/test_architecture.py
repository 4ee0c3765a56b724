"""Layering and size rules for tokcli/, checked on the source text (ast; nothing of tokcli is imported).

- core/ is the bottom layer: it never imports the families, the CLI, training, benchmarks, the pipeline, the
  metrics, or the package top ``tokcli`` (``import tokcli`` / ``from tokcli import name`` where name is not a
  submodule). Only the CLI imports the CLI; a family package never imports another family package. These count
  every import, at module level and inside functions.
- No import cycles between tokcli's top-level subpackages / modules (the package top included), counting the
  imports that run when a module is imported (module level, class bodies; not function bodies, not
  ``if TYPE_CHECKING:``).
- No file over 500 lines, no function or method over 80 lines.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PKG = "tokcli"
ROOT = Path(__file__).resolve().parents[2] / PKG

MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80

# core/ must not depend on these (nor on the package top itself).
CORE_FORBIDDEN = ("tokcli.families", "tokcli.cli", "tokcli.train", "tokcli.bench", "tokcli.pipeline",
                  "tokcli.metrics")
# The only exceptions to the layering rules: the package top wires the layers together; model.py and
# registry.py are both core (same layer).
ALLOWED = {("tokcli/core/model.py", "tokcli.core.registry")}
ANYTHING_GOES = {"tokcli/__init__.py"}
# The CLI layer: tokcli/cli/ and `python -m tokcli` (tokcli/__main__.py, which only calls tokcli.cli.app.main).
CLI_FILES_OUTSIDE_CLI = {"tokcli/__main__.py"}


@dataclass(frozen=True)
class Import:
    file: str            # tokcli/core/registry.py
    line: int
    target: str          # the module imported (tokcli.core.checkpoint), or "tokcli" for the package top
    module_level: bool   # runs when the importing module is imported

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    """Whether ``name`` (tokcli.x.y) is a module or package in the source tree."""
    rel = Path(*name.split("."))
    base = ROOT.parent / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _rel(path: Path) -> str:
    return path.relative_to(ROOT.parent).as_posix()


@lru_cache(maxsize=None)
def source_files() -> tuple[Path, ...]:
    return tuple(sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts))


@lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, module_level: bool):
    """(import node, runs-at-import) for every import under ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, module_level
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(child, False)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):  # typing only: not at import time
            yield from _walk(ast.Module(body=child.body, type_ignores=[]), False)
            yield from _walk(ast.Module(body=child.orelse, type_ignores=[]), module_level)
        else:
            yield from _walk(child, module_level)


def _targets(node: ast.Import | ast.ImportFrom, path: Path) -> list[str]:
    """The tokcli modules an import statement loads ("tokcli" = the package top's namespace)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == PKG or a.name.startswith(PKG + ".")]
    if node.level:
        pkg = _module_name(path).split(".")
        if path.name != "__init__.py":
            pkg = pkg[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base != PKG and not base.startswith(PKG + "."):
        return []
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        if a.name != "*" and _is_module(sub):
            out.append(sub)          # from tokcli.core import registry -> tokcli.core.registry
        elif base not in out:
            out.append(base)         # from tokcli.core.registry import X -> tokcli.core.registry; tokcli: the top
    return out


@lru_cache(maxsize=None)
def imports() -> tuple[Import, ...]:
    out = []
    for path in source_files():
        for node, module_level in _walk(_tree(path), True):
            for t in _targets(node, path):
                out.append(Import(_rel(path), node.lineno, t, module_level))
    return tuple(out)


def _under(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


def _listing(bad: list[str]) -> str:
    return "\n  " + "\n  ".join(sorted(set(bad)))


# --------------------------------------------------------------------------------------------------------------
# (a) layering: no upward edges
# --------------------------------------------------------------------------------------------------------------
def test_the_source_tree_is_parsed():
    files = {_rel(p) for p in source_files()}
    assert {"tokcli/__init__.py", "tokcli/core/registry.py", "tokcli/cli/app.py"} <= files
    assert any(i.file.startswith("tokcli/core/") and i.module_level for i in imports())
    assert any(not i.module_level for i in imports()), "function-local imports are not being found"


def test_core_imports_nothing_above_it():
    bad = []
    for i in imports():
        if not i.file.startswith("tokcli/core/") or (i.file, i.target) in ALLOWED:
            continue
        if i.target == PKG:
            bad.append(f"{i.where()} imports the package top `tokcli` (import the submodule that defines the name)")
        for up in CORE_FORBIDDEN:
            if _under(i.target, up):
                when = "at import" if i.module_level else "deferred: in a function or TYPE_CHECKING"
                bad.append(f"{i.where()} imports {i.target} ({when})")
    assert not bad, f"core/ is the bottom layer; {len(set(bad))} upward import(s):" + _listing(bad)


def test_only_the_cli_imports_the_cli():
    bad = [f"{i.where()} imports {i.target}" for i in imports()
           if _under(i.target, "tokcli.cli") and not i.file.startswith("tokcli/cli/")
           and i.file not in ANYTHING_GOES | CLI_FILES_OUTSIDE_CLI]
    assert not bad, f"{len(set(bad))} import(s) of tokcli.cli from outside the CLI:" + _listing(bad)


def _family_packages() -> set[str]:
    fam = ROOT / "families"
    return {p.name for p in fam.iterdir() if (p / "__init__.py").is_file()} if fam.is_dir() else set()


def test_families_never_import_each_other():
    fams = _family_packages()
    bad = []
    for i in imports():
        parts = i.file.split("/")
        if len(parts) < 4 or parts[:2] != ["tokcli", "families"] or parts[2] not in fams:
            continue
        own = parts[2]
        for other in fams - {own}:
            if _under(i.target, f"tokcli.families.{other}"):
                bad.append(f"{i.where()} (family {own}) imports {i.target} (family {other})")
    assert not bad, f"{len(set(bad))} import(s) between family packages:" + _listing(bad)


# --------------------------------------------------------------------------------------------------------------
# (b) no cycles between top-level parts, module-level imports only
# --------------------------------------------------------------------------------------------------------------
def _part(module: str) -> str:
    """tokcli.core.registry -> core; tokcli.bench -> bench; tokcli -> tokcli (the package top)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PKG


def _part_of_file(rel: str) -> str:
    return _part(_module_name(ROOT.parent / rel))


def _graph() -> dict[str, dict[str, list[Import]]]:
    g: dict[str, dict[str, list[Import]]] = {}
    for i in imports():
        if not i.module_level:
            continue
        a, b = _part_of_file(i.file), _part(i.target)
        if a != b:
            g.setdefault(a, {}).setdefault(b, []).append(i)
            g.setdefault(b, {})
    return g


def _strongly_connected(g: dict[str, dict]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def _a_cycle(g: dict[str, dict], comp: list[str]) -> list[str]:
    """One cycle through the component's first node (breadth-first: a shortest one)."""
    start, members = comp[0], set(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(g[v]):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def test_no_import_cycles_between_top_level_parts():
    g = _graph()
    msgs = []
    for comp in _strongly_connected(g):
        cycle = _a_cycle(g, comp)
        edges = []
        for a, b in zip(cycle, cycle[1:]):
            first = sorted(g[a][b], key=lambda i: (i.file, i.line))
            shown = ", ".join(f"{i.where()} ({i.target})" for i in first[:3])
            more = f" and {len(first) - 3} more" if len(first) > 3 else ""
            edges.append(f"    {a} -> {b}: {shown}{more}")
        msgs.append(f"cycle {' -> '.join(cycle)} (all of {{{', '.join(comp)}}} import each other):\n"
                    + "\n".join(edges))
    assert not msgs, f"{len(msgs)} import cycle(s) between tokcli's top-level parts (module-level imports):\n" + \
        "\n".join(msgs)


# --------------------------------------------------------------------------------------------------------------
# (c) sizes
# --------------------------------------------------------------------------------------------------------------
def test_no_file_over_500_lines():
    bad = []
    for p in source_files():
        n = len(p.read_text(encoding="utf-8").splitlines())
        if n > MAX_FILE_LINES:
            bad.append(f"{_rel(p)}: {n} lines")
    assert not bad, f"{len(bad)} file(s) over {MAX_FILE_LINES} lines:" + _listing(bad)


def _functions(node: ast.AST, prefix: str = ""):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{child.name}"
            yield name, child
            yield from _functions(child, name + ".")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, f"{prefix}{child.name}.")
        else:
            yield from _functions(child, prefix)


def test_no_function_over_80_lines():
    bad = []
    for p in source_files():
        for name, fn in _functions(_tree(p)):
            n = fn.end_lineno - fn.lineno + 1  # the def line to the last line of the body (docstring included)
            if n > MAX_FUNCTION_LINES:
                bad.append(f"{_rel(p)}:{fn.lineno} {name}: {n} lines")
    assert not bad, f"{len(bad)} function(s)/method(s) over {MAX_FUNCTION_LINES} lines:" + _listing(bad)


def test_the_cycle_finder_itself():
    g = {"a": {"b": []}, "b": {"c": []}, "c": {"a": [], "d": []}, "d": {}, "e": {"d": []}}
    assert _strongly_connected(g) == [["a", "b", "c"]]
    assert _a_cycle(g, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert _strongly_connected({"x": {"y": []}, "y": {}}) == []
