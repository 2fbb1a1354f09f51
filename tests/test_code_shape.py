"""The package's shape, read statically (ast): no module over 400 lines, no function over 60, and no private
name (`_x`) of one module used by another, neither imported (`from .m import _x`) nor reached through an
imported module (`from . import m; m._x`). A private name is one its module may change without a word."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from test_import_graph import PACKAGE, module_name

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def sources(root: Path = PACKAGE) -> dict[str, tuple[Path, str]]:
    """module name -> (file, text) of every module of the package."""
    return {module_name(p, root): (p, p.read_text()) for p in sorted(root.rglob("*.py"))}


def long_modules(found: dict[str, tuple[Path, str]]) -> list[str]:
    return [f"{name}: {n} lines" for name, (_, text) in found.items()
            if (n := len(text.splitlines())) > MAX_MODULE_LINES]


def long_functions(found: dict[str, tuple[Path, str]]) -> list[str]:
    """Functions (methods and nested ones too) longer than the limit, from `def` to the last line."""
    out = []
    for name, (path, text) in found.items():
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{name}.{node.name} (line {node.lineno}): {n} lines")
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _imported_module(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute name of what `from ... import` reads from."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts[: len(parts) - (node.level - 1)] if is_package else parts[: len(parts) - node.level]
    return ".".join(base + ([node.module] if node.module else []))


def private_crossings(found: dict[str, tuple[Path, str]]) -> list[str]:
    """Each use of another package module's private name: imported by name, or read as an attribute of a name
    that an import bound to a package module."""
    root = next(iter(found)).split(".")[0] if found else ""
    out = []
    for name, (path, text) in found.items():
        tree = ast.parse(text, str(path))
        module_aliases: dict[str, str] = {}  # local name -> the package module it names
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _imported_module(name, node, path.name == "__init__.py")
                if source.split(".")[0] != root:
                    continue
                for alias in node.names:
                    if f"{source}.{alias.name}" in found:
                        module_aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
                    elif _private(alias.name) and source != name:
                        out.append(f"{name} (line {node.lineno}) imports {source}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name in found:
                        module_aliases[alias.asname] = alias.name
        seen = set()
        for node in sorted(ast.walk(tree), key=lambda n: getattr(n, "lineno", 0)):
            if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                    and module_aliases.get(node.value.id, name) != name):
                target = f"{module_aliases[node.value.id]}.{node.attr}"
                if target not in seen:  # once per name, at its first use
                    seen.add(target)
                    out.append(f"{name} (line {node.lineno}) reads {target}")
    return out


def test_no_module_is_over_400_lines():
    assert long_modules(sources()) == []


def test_no_function_is_over_60_lines():
    assert long_functions(sources()) == []


def test_no_private_name_is_imported_from_another_module():
    assert [c for c in private_crossings(sources()) if " imports " in c] == []


def test_no_private_name_is_read_through_another_module():
    assert [c for c in private_crossings(sources()) if " reads " in c] == []


# ----------------------------------------------------------------------------- the checks themselves


def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, tuple[Path, str]]:
    root = tmp_path / "llava_edge"
    for rel, text in {"__init__.py": "", "a/__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return sources(root)


def test_the_limits_count_lines_from_def_to_the_end(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    fits = _package(tmp_path, {"a/m.py": "def f():\n" + body})
    assert long_functions(fits) == [] and long_modules(fits) == []
    method = ["class C:", "    def g(self):", *(f"        x{i} = {i}" for i in range(MAX_FUNCTION_LINES))]
    blank = [""] * (MAX_MODULE_LINES + 1 - len(method))
    over = _package(tmp_path, {"a/m.py": "\n".join(method + blank) + "\n"})
    assert long_functions(over) == ["llava_edge.a.m.g (line 2): 61 lines"]
    assert long_modules(over) == [f"llava_edge.a.m: {MAX_MODULE_LINES + 1} lines"]


@pytest.mark.parametrize("line, expected", [
    ("from .m import _hidden\n", "llava_edge.a.user (line 1) imports llava_edge.a.m._hidden"),
    ("from llava_edge.a.m import (\n    shown,\n    _hidden,\n)\n", "llava_edge.a.user (line 1) imports llava_edge.a.m._hidden"),
    ("from ..a import m as mm\ny = mm._hidden\n", "llava_edge.a.user (line 2) reads llava_edge.a.m._hidden"),
    ("import llava_edge.a.m as mm\ny = mm._hidden\n", "llava_edge.a.user (line 2) reads llava_edge.a.m._hidden"),
    ("def f():\n    from . import m\n    return m._hidden()\n", "llava_edge.a.user (line 3) reads llava_edge.a.m._hidden"),
])
def test_a_private_name_used_from_another_module_is_found(tmp_path, line, expected):
    found = _package(tmp_path, {"a/m.py": "shown = 1\n_hidden = 2\n", "a/user.py": line})
    assert private_crossings(found) == [expected]


def test_own_private_names_dunders_and_other_packages_pass(tmp_path):
    found = _package(tmp_path, {
        "a/m.py": "import os\n_hidden = 2\ny = _hidden + len(os._exit.__name__)\n",
        "a/user.py": "from .m import __doc__\nfrom . import m\nimport sys\nz = m.__name__ + sys._getframe().f_code.co_name\n"
                     "class C:\n    def f(self):\n        return self._x\n",
    })
    assert private_crossings(found) == []
