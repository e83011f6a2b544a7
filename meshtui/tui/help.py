"""F1: what the keys do and how to read the mesh table."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# meshtui

One model, split by layers over the head (this machine) and the hosts you reach by SSH.

## Keys

- **Enter**: send the prompt; the whole conversation goes with it
- **Esc**: stop the reply that is streaming; with none, leave the prompt so single keys work
- **Ctrl+L**: clear the conversation
- **F1** or **?**: this help
- **F2**: show or hide the log
- **F3**: switch between the provisioning view and the mesh view
- **i** or **Tab**: back to the prompt
- **q**, **Ctrl+C** or **Ctrl+Q**: quit; the agents, tunnels and connections are torn down first
- **r**: bring failed hosts back (between replies): reconnect, re-plan with them, reload

A prompt sent while a reply is still streaming is refused (it stays in the input): stop the reply or wait.

## The mesh table

* **layers**: the contiguous blocks a node holds; `+out`: it also holds the output layer (on the head, a local
  stage serves it, so the logits never cross the network).
* **memory**: what the plan puts on the node, of what it may use.
* **last / mean / p95**: one stage's time per token, from the head's tunnel: `total = compute+network`,
  where network is the node's measured round trip and compute is the rest. The head's share runs in this
  process and is not measured through a tunnel, so it shows `—`.
* **bytes/token**: bytes crossing the tunnel per token, both ways.

The bar under the table shows the split: each node as wide as its share of the layers.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape,f1,question_mark,q", "dismiss", "Close help"),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Markdown(HELP)

    def on_mount(self) -> None:
        self.query_one("#help").border_title = "Help"
        self.query_one("#help").border_subtitle = "Esc closes"
