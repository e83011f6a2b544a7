"""The layers, checked: the core never imports the UI (Textual, Rich, meshtui.tui), and meshtui/tui/ uses only
the core's public seams. Every module is found by walking the package: a new one is covered without a list.

Rich counts as UI: Textual renders with it, and the core's output (the CLI's lines and `--json`) is plain text.
The one door from the core to the UI is the lazy `from meshtui.tui.app import ...` in `up`'s runner (meshtui.commands).
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import meshtui

PACKAGE_DIR = Path(meshtui.__file__).resolve().parent
UI_PACKAGES = ("textual", "rich")

# What meshtui/tui/ may import from the core, and why; anything else (and any _private name) is a layering error.
TUI_SEAMS = {
    "meshtui.events": "the core's past-tense events, which the views render",
    "meshtui.errors": "the MeshError family: what a failure says",
    "meshtui.inventory": "the inventory the app is made from",
    "meshtui.mesh": "the orchestrator the app drives (Mesh; RejoinPolicy through tui/protocol.py)",
    "meshtui.state": "the mesh as its events tell it: what every view reads, and the one `is_ready`",
    "meshtui.replies": "the reply queue the chat pane shares with the API",
    "meshtui.api": "the OpenAI-compatible API served beside the chat (up --api-port)",
    "meshtui.units": "sizes as people read them",
    "meshtui.text": "text from hosts and models made safe to print (no terminal escapes)",
    "meshtui.stats": "the one definition of the latency statistics (p95) the core and the bench report too",
}
# Core modules that may import meshtui.tui, and only inside a function (so importing them loads no UI).
LAZY_UI_DOORS = {"meshtui.commands"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_ui(name: str) -> bool:
    return name == "meshtui.tui" or name.startswith("meshtui.tui.")


def core_modules() -> list[str]:
    """Every module of the package outside meshtui.tui, found by pkgutil (not by a list kept by hand).

    `meshtui.__main__` runs the CLI when imported: it is left to the AST check (it imports only meshtui.cli)."""
    found = ["meshtui"]
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], "meshtui."):
        if not is_ui(info.name) and info.name != "meshtui.__main__":
            found.append(info.name)
    return sorted(found)


def imports_of(path: Path, name: str | None = None) -> list[tuple[str, str | None, ast.stmt, bool]]:
    """(module, imported name or None, node, inside a function) for every import of a meshtui module, in
    source order; `name` is the module's dotted name (default: from its place in the package)."""
    name = name or module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(inner) for inner in ast.walk(node) if inner is not node)
    package = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name
    found: list[tuple[str, str | None, ast.stmt, bool]] = []
    for node in sorted((n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))),
                       key=lambda n: (n.lineno, n.col_offset)):
        lazy = id(node) in in_function
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node, lazy) for alias in node.names if alias.name.startswith("meshtui")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if not base.startswith("meshtui"):
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if (PACKAGE_DIR.parent / submodule.replace(".", "/")).with_suffix(".py").exists() or \
                        (PACKAGE_DIR.parent / submodule.replace(".", "/") / "__init__.py").exists():
                    found.append((submodule, None, node, lazy))  # `from meshtui import events`
                else:
                    found.append((base, alias.name, node, lazy))
    return found


def test_the_walk_finds_the_core_and_leaves_out_the_ui() -> None:
    modules = core_modules()
    assert {"meshtui.mesh", "meshtui.replies", "meshtui.api", "meshtui.cli", "meshtui.engine.client",
            "meshtui.engine.worker", "meshtui.planner", "meshtui.tunnels"} <= set(modules)
    assert not [m for m in modules if is_ui(m)]
    assert len(modules) == len(set(modules)) >= 25


def test_no_core_module_loads_textual_or_rich() -> None:
    """Each core module imported in turn in a fresh interpreter; the first to load a UI package is named."""
    code = f"""
import importlib, json, sys
ui = {UI_PACKAGES!r}
for name in {core_modules()!r}:
    importlib.import_module(name)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ui or m.startswith("meshtui.tui"))
    if loaded:
        print(json.dumps({{"module": name, "loaded": loaded[:5]}}))
        sys.exit(1)
print(json.dumps({{"checked": len(sys.modules)}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{result.stdout.strip()} {result.stderr.strip()[-2000:]}"
    assert "checked" in json.loads(result.stdout.strip().splitlines()[-1])


def test_the_core_opens_the_ui_only_through_the_clis_lazy_import() -> None:
    offenders = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        name = module_name(path)
        if is_ui(name):
            continue
        for module, _, node, lazy in imports_of(path):
            if is_ui(module) and not (lazy and name in LAZY_UI_DOORS):
                offenders.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno} imports {module}")
    assert offenders == []


def test_the_tui_uses_only_the_cores_public_seams() -> None:
    offenders = []
    seen: set[str] = set()
    for path in sorted((PACKAGE_DIR / "tui").rglob("*.py")):
        for module, imported, node, _ in imports_of(path):
            if is_ui(module):
                continue
            seen.add(module)
            where = f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno}"
            if module not in TUI_SEAMS:
                offenders.append(f"{where} imports {module}, which is not one of the core's seams for the UI")
            elif imported is not None and imported.startswith("_"):
                offenders.append(f"{where} imports the private {module}.{imported}")
    assert offenders == []
    assert seen == set(TUI_SEAMS), f"seams no longer used (drop them from TUI_SEAMS): {set(TUI_SEAMS) - seen}"


def test_the_checker_sees_what_it_must_refuse(tmp_path: Path) -> None:
    """The AST reader itself: relative, aliased, lazy and `from package import module` forms."""
    sample = tmp_path / "probe.py"
    sample.write_text("from .. import planner\nfrom ..mesh import _raise_first\nimport meshtui.tunnels as t\n"
                      "import json\ndef f():\n    from meshtui.tui import app\n")
    found = [(module, imported, lazy) for module, imported, _, lazy in imports_of(sample, "meshtui.tui.probe")]
    assert found == [("meshtui.planner", None, False), ("meshtui.mesh", "_raise_first", False),
                     ("meshtui.tunnels", None, False), ("meshtui.tui.app", None, True)]
