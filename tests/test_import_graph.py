"""The package's import graph, read statically (ast): no circles, and every arrow points the way the layout
allows. The rules are the table in docs/design.md's "Layout" section, parsed here; they are written nowhere else.
Imports inside functions count as much as those at the top: a lazy import still runs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llava_edge"
DESIGN = ROOT / "docs" / "design.md"
# What `pip install llava-edge` (no extras) does not have: the layers that run without torch must not import them.
NOT_IN_RUNTIME_INSTALL = {"torch", "transformers", "safetensors", "sentencepiece", "onnx", "onnxscript", "gguf"}


def layout_rules(text: str) -> tuple[dict[str, set[str] | None], set[str], set[str]]:
    """(layer -> the layers it may import besides itself, or None for anything; the layers that run without
    torch; the top-level modules that are commands, not leaves), from the Layout section's table, whose rows are
    | `layer` | files | may import | without torch | what it holds |."""
    section = re.search(r"^## Layout\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "docs/design.md has no '## Layout' section"
    may_import: dict[str, set[str] | None] = {}
    torch_free: set[str] = set()
    commands: set[str] = set()
    for line in section.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 5 or not re.fullmatch(r"`\w+`", cells[0]):
            continue  # prose, the header row, the separator row
        layer, files, allowed, without_torch = cells[0].strip("`"), cells[1], cells[2], cells[3]
        if allowed == "anything":
            may_import[layer] = None
        else:
            may_import[layer] = {a.strip("` ") for a in allowed.split(",") if a.strip("` –-")}
        if without_torch == "yes":
            torch_free.add(layer)
        if layer != "leaf":
            commands.update(re.findall(r"`(\w+)\.py`", files))
    return may_import, torch_free, commands


MAY_IMPORT, TORCH_FREE_LAYERS, COMMAND_MODULES = layout_rules(DESIGN.read_text())


def runtime_order(text: str) -> list[str]:
    """The runtime's modules in the order the "## Runtime" section lists them after "in import order"."""
    section = re.search(r"^## Runtime\n(.*?)(?=^## )", text, re.S | re.M)
    assert section and "in import order" in section.group(1), "docs/design.md's Runtime section lists no import order"
    listing = section.group(1).split("in import order", 1)[1]
    names: list[str] = []
    for line in listing.splitlines():
        if line.startswith(("- ", "  ")):
            names += [n for n in re.findall(r"`(\w+)\.py`", line) if n not in names]
    return names


RUNTIME_ORDER = runtime_order(DESIGN.read_text())


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Every module the file of module `name` imports (absolute names; `from pkg import x` counts as importing
    pkg and, when x is a module, pkg.x)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def package_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (names that are not modules of the package are dropped,
    except third-party top-level names, kept with a "ext:" prefix)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for target in imports_of(path, name):
            if target.split(".")[0] == root.name:
                if target in files and target != name:
                    edges.add(target)
            elif target:
                edges.add("ext:" + target.split(".")[0])
        graph[name] = edges
    return graph


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "leaf"  # the package itself
    if len(parts) == 2 and parts[1] in COMMAND_MODULES:
        return "cli"
    if len(parts) == 2 and parts[1] not in MAY_IMPORT:
        return "leaf"
    return parts[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def wrong_arrows(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        layer = layer_of(module)
        allowed = MAY_IMPORT.get(layer, set())  # a folder not in the layout may import nothing
        for target in sorted(targets):
            if target.startswith("ext:"):
                if layer in TORCH_FREE_LAYERS and target[4:] in NOT_IN_RUNTIME_INSTALL:
                    problems.append(f"{module} imports {target[4:]} ({layer} must run without it)")
            elif allowed is not None and layer_of(target) not in allowed | {layer}:
                problems.append(f"{module} ({layer}) imports {target} ({layer_of(target)})")
    return problems


def test_every_folder_has_a_place_in_the_layout():
    folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert folders <= set(MAY_IMPORT), f"add {sorted(folders - set(MAY_IMPORT))} to docs/design.md's Layout table"
    commands = {p.stem for p in PACKAGE.glob("*.py")} & COMMAND_MODULES
    assert commands == COMMAND_MODULES, f"the Layout table names commands that do not exist: {COMMAND_MODULES - commands}"


def test_the_layout_table_is_parsed_row_by_row():
    text = ("## Layout\n\nProse with | a pipe.\n\n| layer | files | may import | without torch | what it holds |\n"
            "|---|---|---|---|---|\n| `leaf` | the top-level `*.py` | – | yes | errors |\n"
            "| `runtime` | `runtime/` | leaf | yes | the engine |\n| `export` | `export/` | runtime, `leaf` | no | x |\n"
            "| `cli` | `cli.py`, `chat.py` | anything | no | the commands |\n\n## Next\n\n| `bench` | b | – | yes | y |\n")
    assert layout_rules(text) == ({"leaf": set(), "runtime": {"leaf"}, "export": {"runtime", "leaf"}, "cli": None},
                                  {"leaf", "runtime"}, {"cli", "chat"})


def test_the_design_states_the_runtime_rules():
    """The rules the rest of the project leans on are in the parsed table (a row the parser skipped would
    silently drop them): the runtime reaches only leaves and runs without torch, and so do the leaves."""
    assert MAY_IMPORT["runtime"] == {"leaf"} and MAY_IMPORT["leaf"] == set()
    assert {"leaf", "runtime", "server", "caption"} <= TORCH_FREE_LAYERS


def test_the_package_has_no_import_circles():
    assert cycles(package_graph()) == []


def test_every_import_points_the_way_the_layout_allows():
    assert wrong_arrows(package_graph()) == []


def test_runtime_reaches_only_leaves_and_runtime():
    graph = package_graph()
    seen, todo = set(), [m for m in graph if layer_of(m) == "runtime"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(t for t in graph[m] if not t.startswith("ext:"))
    assert {layer_of(m) for m in seen} <= {"runtime", "leaf"}


def misordered_runtime_imports(graph: dict[str, set[str]], order: list[str]) -> list[str]:
    """Runtime modules that import a runtime module listed at or after their own place (or not listed)."""
    prefix = f"{PACKAGE.name}.runtime."
    rank = {name: i for i, name in enumerate(order)}
    problems = []
    for module, targets in sorted(graph.items()):
        if not module.startswith(prefix):
            continue
        name = module[len(prefix):]
        if name not in rank:
            problems.append(f"{name}.py is not in docs/design.md's runtime import order")
            continue
        problems += [f"{name} imports {t[len(prefix):]}, listed after it" for t in sorted(targets)
                     if t.startswith(prefix) and rank.get(t[len(prefix):], len(order)) >= rank[name]]
    return problems


def test_runtime_modules_import_only_those_listed_before_them():
    assert misordered_runtime_imports(package_graph(), RUNTIME_ORDER) == []


def test_a_runtime_import_against_the_order_is_found():
    graph = {"llava_edge.runtime.prompt": {"llava_edge.runtime.scheduler"}, "llava_edge.runtime.scheduler": set()}
    assert misordered_runtime_imports(graph, ["prompt", "scheduler"]) == ["prompt imports scheduler, listed after it"]
    assert misordered_runtime_imports(graph, ["scheduler", "prompt"]) == []
    assert misordered_runtime_imports(graph, ["prompt"]) == ["prompt imports scheduler, listed after it",
                                                            "scheduler.py is not in docs/design.md's runtime import order"]


# ----------------------------------------------------------------------------- the checks themselves


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "llava_edge"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


BASE = {
    "__init__.py": "",
    "errors.py": "",
    "runtime/__init__.py": "",
    "runtime/loader.py": "from .probe import verdict\n",
    "runtime/probe.py": "import os\n",
    "quant/__init__.py": "",
    "quant/gguf.py": "from ..errors import UserError\n",
    "export/__init__.py": "",
    "export/onnx_vision.py": "from ..quant.gguf import x\nimport torch\n",
    "train/__init__.py": "",
    "train/shapes.py": "",
}


def test_a_clean_graph_passes(tmp_path):
    graph = package_graph(_package(tmp_path, BASE))
    assert cycles(graph) == [] and wrong_arrows(graph) == []


@pytest.mark.parametrize("rel, line, expected", [
    ("runtime/probe.py", "def child():\n    from .loader import construct\n", "circle"),
    ("runtime/probe.py", "from ..quant.gguf import quantize\n", "llava_edge.runtime.probe (runtime) imports llava_edge.quant.gguf"),
    ("runtime/probe.py", "from ..train import shapes\n", "llava_edge.runtime.probe (runtime) imports llava_edge.train.shapes"),
    ("runtime/probe.py", "import torch\n", "llava_edge.runtime.probe imports torch"),
    ("errors.py", "from transformers import AutoConfig\n", "llava_edge.errors imports transformers"),
    ("quant/gguf.py", "from ..export import onnx_vision\n", "llava_edge.quant.gguf (quant) imports llava_edge.export.onnx_vision"),
])
def test_each_rule_fails_when_broken(tmp_path, rel, line, expected):
    files = dict(BASE)
    files[rel] += line
    graph = package_graph(_package(tmp_path, files))
    if expected == "circle":
        assert cycles(graph) == [["llava_edge.runtime.loader", "llava_edge.runtime.probe"]]
    else:
        assert any(p.startswith(expected) for p in wrong_arrows(graph)), wrong_arrows(graph)
