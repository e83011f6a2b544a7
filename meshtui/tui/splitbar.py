"""One line showing which node holds which layers, each node's share as wide as its share of the layers."""

from __future__ import annotations

from collections.abc import Callable

from rich.text import Text
from textual.widget import Widget

from meshtui.state import MeshState
from meshtui.tui.formatting import layer_range, proportional_widths

NODE_COLOURS = 6  # tcss defines .splitbar--node-0 .. -5; node i uses colour i % NODE_COLOURS


class SplitBar(Widget):
    COMPONENT_CLASSES = {
        *(f"splitbar--node-{i}" for i in range(NODE_COLOURS)),
        "splitbar--failed",
        "splitbar--empty",
    }

    def __init__(self, state: Callable[[], MeshState], *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.state = state

    def render(self) -> Text:
        state = self.state()
        plan = state.plan
        width = self.size.width
        if plan is None:
            return Text("layer split: waiting for the plan", style=self.get_component_rich_style("splitbar--empty"))
        index = {node.name: i for i, node in enumerate(state.nodes)}
        status = {node.name: node.status for node in state.nodes}
        held = [a for a in plan.assignments if a.n_layers > 0]
        widths = proportional_widths([a.n_layers for a in held], width)
        bar = Text(no_wrap=True, overflow="crop")
        for assignment, cells in zip(held, widths, strict=True):
            if cells <= 0:
                continue
            if status.get(assignment.name) == "failed":
                style = self.get_component_rich_style("splitbar--failed")
                mark = "✗ "
            else:
                colour = index.get(assignment.name, 0) % NODE_COLOURS
                style = self.get_component_rich_style(f"splitbar--node-{colour}")
                mark = ""
            span = layer_range((assignment.start, assignment.end), plan.n_layer,
                               plus_output=assignment.is_head and plan.output_on_head)
            label = f" {mark}{assignment.name} {span}"
            if len(label) > cells:
                label = f" {mark}{assignment.name}"
            bar.append(label[:cells].ljust(cells), style=style)
        return bar
