"""The core never imports Textual: only meshtui.tui does, and the CLI imports it lazily."""

from __future__ import annotations

import subprocess
import sys

CORE = ["meshtui.mesh", "meshtui.cli", "meshtui.planner", "meshtui.events", "meshtui.inventory",
        "meshtui.hosts", "meshtui.ssh", "meshtui.tunnels", "meshtui.lab", "meshtui.engine.client",
        "meshtui.gguf_facts", "meshtui.units", "meshtui.errors"]


def test_core_modules_do_not_import_textual():
    code = (f"import {', '.join(CORE)}; import sys; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'textual'); "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
