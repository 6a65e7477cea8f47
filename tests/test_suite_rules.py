"""Rules for the test suite itself, checked on its source.

- Tests import helper modules, never a test module or a conftest (pytest loads those itself; importing
  one runs its module-level code twice and couples unrelated tests).
- Every test can fail: it asserts, expects an exception, or calls a helper that does.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# Calls that fail the test by themselves: pytest's expectations, and waits that raise on their deadline.
FAILING_CALLS = {"raises", "fail", "warns", "deprecated_call", "wait_until"}


def _modules() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text(), str(p)) for p in sorted(TESTS.rglob("*.py"))}


def _is_test_module(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last == "conftest" or last.startswith("test_")


def _imported(tree: ast.Module) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            dots = "." * node.level
            if node.module is not None:
                yield node.lineno, dots + node.module
            for alias in node.names:  # `from tests.api import test_x` / `from . import conftest`
                yield node.lineno, dots + (f"{node.module}." if node.module else "") + alias.name


def _called_names(node: ast.AST) -> set[str]:
    names = set()
    for call in ast.walk(node):
        if isinstance(call, ast.Call):
            f = call.func
            if isinstance(f, ast.Name):
                names.add(f.id)
            elif isinstance(f, ast.Attribute):
                names.add(f.attr)
            if any(
                k.arg == "check" and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords
            ):  # subprocess.run(..., check=True)
                names.add("raises")
    return names


def _fails_by_itself(node: ast.AST) -> bool:
    return any(isinstance(n, (ast.Assert, ast.Raise)) for n in ast.walk(node))


Function = ast.FunctionDef | ast.AsyncFunctionDef


def _functions(trees: dict[Path, ast.Module]) -> Iterator[tuple[Path, Function]]:
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def test_no_test_module_or_conftest_is_imported() -> None:
    offenders = [
        f"{path.relative_to(TESTS.parent)}:{line} imports {name}"
        for path, tree in _modules().items()
        for line, name in _imported(tree)
        if (name.startswith("tests.") or name.startswith(".")) and _is_test_module(name)
    ]
    assert not offenders, "move what they share into a helper module:\n" + "\n".join(offenders)


def test_every_test_can_fail() -> None:
    trees = _modules()
    functions = list(_functions(trees))
    # Helpers that fail (directly, or through another such helper), found by name: a fixed point.
    failing = set(FAILING_CALLS)
    grew = True
    while grew:
        grew = False
        for _, fn in functions:
            if fn.name not in failing and (_fails_by_itself(fn) or _called_names(fn) & failing):
                failing.add(fn.name)
                grew = True
    silent = [
        f"{path.relative_to(TESTS.parent)}::{fn.name}"
        for path, fn in functions
        if path.name.startswith("test_")
        and fn.name.startswith("test_")
        and not _fails_by_itself(fn)
        and not _called_names(fn) & failing
    ]
    assert not silent, "tests that assert nothing:\n" + "\n".join(silent)


def test_the_rules_see_offences() -> None:
    """The checks above are only worth something if they recognise what they forbid."""
    tree = ast.parse("from tests.api.conftest import x\nfrom . import test_other\nimport tests.waiting\n")
    assert [n for _, n in _imported(tree) if _is_test_module(n)] == ["tests.api.conftest", ".test_other"]
    silent = ast.parse("def test_x():\n    print(1)\n").body[0]
    assert not _fails_by_itself(silent) and not _called_names(silent) & FAILING_CALLS
    loud = ast.parse("def test_y():\n    with pytest.raises(E):\n        f()\n").body[0]
    assert _called_names(loud) & FAILING_CALLS
