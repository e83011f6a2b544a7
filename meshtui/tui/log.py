"""The log panel: every LogRecorded event, newest at the bottom; hidden until asked for."""

from __future__ import annotations

import time

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import RichLog

from meshtui import events as ev

MAX_LINES = 5000


class LogPanel(Vertical):
    COMPONENT_CLASSES = {"log--debug", "log--info", "log--warning", "log--error", "log--source", "log--time"}

    class Recorded(Message):
        def __init__(self, event: ev.LogRecorded) -> None:
            super().__init__()
            self.event = event
            self.at = time.strftime("%H:%M:%S")

    def compose(self) -> ComposeResult:
        yield RichLog(id="log", max_lines=MAX_LINES, wrap=True, markup=False, highlight=False)

    def on_mount(self) -> None:
        self.border_title = "Log"
        self.border_subtitle = "F2 hides"

    @on(Recorded)
    def _on_recorded(self, message: Recorded) -> None:
        event = message.event
        level = event.level if event.level in ("debug", "info", "warning", "error") else "info"
        line = Text.assemble(
            (message.at + " ", self.get_component_rich_style("log--time")),
            (f"{event.source:<8} ", self.get_component_rich_style("log--source")),
            (event.message, self.get_component_rich_style(f"log--{level}")),
        )
        self.query_one(RichLog).write(line)
