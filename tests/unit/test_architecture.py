"""The house's limits (docs/architecture.md): sizes, where analysis is called, one-way imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nnxport"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imports(path: Path) -> set[str]:
    """The nnxport modules ``path`` imports at module level or in a function (not under TYPE_CHECKING)."""
    found: set[str] = set()
    tree = _tree(path)
    guarded = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    known = {_name(p) for p in MODULES}
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("nnxport")}


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring does not count
    assert fn.end_lineno is not None
    return fn.end_lineno - body[0].lineno + 1


def test_sizes() -> None:
    long_modules = [f"{p.relative_to(PACKAGE)}: {n}" for p in MODULES
                    if (n := len(p.read_text(encoding="utf-8").splitlines())) > 700]
    long_functions = [f"{p.relative_to(PACKAGE)}:{fn.lineno} {fn.name}: {_body_lines(fn)}" for p in MODULES
                      for fn in ast.walk(_tree(p))
                      if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and _body_lines(fn) > 80]
    assert not long_modules, long_modules
    assert not long_functions, long_functions
    assert len((PACKAGE / "api.py").read_text(encoding="utf-8").splitlines()) <= 350


def test_analysis_is_called_by_the_plan_and_the_draft_only() -> None:
    callers = sorted(_name(p) for p in MODULES for node in ast.walk(_tree(p))
                     if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                     and node.func.id == "analyze")
    assert callers == ["nnxport.mapping.draft", "nnxport.pipeline.plan"]


def test_imports_form_no_cycle() -> None:
    graph = {_name(p): _imports(p) - {_name(p)} for p in MODULES}
    graph = {m: {d for d in deps if d in graph and not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(d):], d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("library", ["typer", "rich"])
def test_cli_libraries_stay_in_cli(library: str) -> None:
    users = [_name(p) for p in MODULES if not _name(p).startswith("nnxport.cli")
             and any(isinstance(n, ast.Import | ast.ImportFrom)
                     and library in ([a.name.split(".")[0] for a in n.names] if isinstance(n, ast.Import)
                                     else [(n.module or "").split(".")[0]])
                     for n in ast.walk(_tree(p)))]
    assert users == []


def test_pipeline_does_not_import_testing_helpers() -> None:
    users = [_name(p) for p in MODULES if not _name(p).startswith("nnxport.testing")
             and any(d.startswith("nnxport.testing") for d in _imports(p))]
    assert users == []
