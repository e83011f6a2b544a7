"""The mesh at work: a row per node, the layer split, and each stage's recent per-token latency."""

from __future__ import annotations

from collections.abc import Callable

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import DataTable, Label, Sparkline

from meshtui.state import MeshState, NodeState
from meshtui.tui.formatting import (
    NOT_MEASURED,
    bytes_or_dash,
    latency_columns,
    latency_totals,
    layer_range,
    memory_use,
)
from meshtui.tui.splitbar import NODE_COLOURS, SplitBar
from meshtui.tui.tables import TableSync
from meshtui.tui.throttle import Throttle

REDRAW_INTERVAL = 0.2  # seconds: at most 5 table redraws a second, whatever the token rate
SPARK_SAMPLES = 120

COLUMNS = (
    ("node", "node"),
    ("address", "address"),
    ("status", "status"),
    ("layers", "layers"),
    ("memory", "memory"),
    ("last", "last ms"),
    ("mean", "mean ms"),
    ("p95", "p95 ms"),
    ("bytes", "B/token"),
)
# A narrow terminal (80 columns) keeps what tells a stage's health: status, layers and per-token totals.
COMPACT_COLUMNS = (
    ("node", "node"),
    ("status", "status"),
    ("layers", "layers"),
    ("last", "last ms"),
    ("mean", "mean"),
    ("p95", "p95"),
)
COMPACT_BELOW = 100  # columns of the view under which the table is compact


class NodesView(Vertical):
    """Renders the state the core's events built (`meshtui.state`): a row per node and a sparkline each."""

    COMPONENT_CLASSES = {
        *(f"nodes--colour-{i}" for i in range(NODE_COLOURS)),
        "nodes--ready", "nodes--busy", "nodes--failed", "nodes--idle",
    }

    class Changed(Message):
        """Something about the nodes changed. Any number of these in a row are worth one redraw."""

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, NodesView.Changed)

    def __init__(self, state: Callable[[], MeshState], *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.state = state
        self.throttle = Throttle(self, REDRAW_INTERVAL, self.redraw)
        self._spark_shown: dict[str, tuple[int, float | None, bool]] = {}
        self._compact: bool | None = None  # None until the first layout

    def compose(self) -> ComposeResult:
        yield DataTable(id="nodes-table", cursor_type="row", zebra_stripes=True)
        yield SplitBar(self.state, id="nodes-split")
        with Vertical(id="sparks"):
            for i, node in enumerate(self.state().nodes):
                # ids by position: host names may hold characters ids cannot ("gpu.1", "3090")
                with Horizontal(classes="spark-row"):
                    yield Label(node.name, classes="spark-name")
                    yield Sparkline([], classes=f"spark node-{i % NODE_COLOURS}", id=f"spark-{i}")
                    yield Label("", classes="spark-stat", id=f"spark-stat-{i}")

    def on_mount(self) -> None:
        self.border_title = "Mesh"
        self._use_columns(compact=False)
        self.redraw()

    def on_resize(self) -> None:
        compact = self.size.width < COMPACT_BELOW
        if compact != self._compact:
            self._use_columns(compact)
            self.redraw()

    def _use_columns(self, compact: bool) -> None:
        self._compact = compact
        self.border_subtitle = ("per-token ms · F4 folds" if compact else
                                "per-token latency of each stage: total (compute+network) · memory: planned / usable")
        table = self.query_one(DataTable)
        table.clear(columns=True)
        self._rows = TableSync(table, COMPACT_COLUMNS if compact else COLUMNS)

    @on(Changed)
    def _on_changed(self, message: Changed) -> None:
        self.throttle.poke()

    def redraw(self) -> None:
        state = self.state()
        for index, node in enumerate(state.nodes):
            cells = self._cells(state, index, node)
            self._rows.show(node.name, [cells[key] for key in self._rows.keys])
        self.query_one(SplitBar).refresh()
        self._redraw_sparks(state)

    def _redraw_sparks(self, state: MeshState) -> None:
        for i, node in enumerate(state.nodes):
            last = node.latencies[-1].total_ms if node.latencies else None
            shown = (len(node.latencies), last, node.layers is not None)
            if self._spark_shown.get(node.name) == shown:
                continue  # nothing new: leave the widget alone
            self._spark_shown[node.name] = shown
            samples = list(node.latencies)[-SPARK_SAMPLES:]
            self.query_one(f"#spark-{i}", Sparkline).data = [s.total_ms for s in samples]
            if samples:
                stat = f"last {samples[-1].total_ms:.1f} · max {max(s.total_ms for s in samples):.1f} ms"
            else:
                stat = "no tokens yet" if node.layers else "holds no layers"
            self.query_one(f"#spark-stat-{i}", Label).update(stat, layout=False)  # fixed width in tcss

    def _cells(self, state: MeshState, index: int, node: NodeState) -> dict[str, Text]:
        """Every column's cell, by column key; the table shows the columns of its layout."""
        colour = index % NODE_COLOURS
        plan = state.plan
        status = node.status
        # the head's latency: its decode time less the stages' round trips
        lat = latency_totals(node.latencies) if self._compact else latency_columns(node.latencies)
        return {
            "node": Text(node.name, style=self.get_component_rich_style(f"nodes--colour-{colour}")),
            "address": Text(node.address),
            "status": Text(f"{status}: {node.reason}" if status == "failed" and node.reason else status,
                           style=self.get_component_rich_style(self._status_class(status))),
            "layers": Text(layer_range(node.layers, plan.n_layer if plan is not None else None,
                                       plus_output=node.is_head and plan is not None and plan.output_on_head)),
            "memory": Text(memory_use(node.planned_bytes, node.usable_bytes)
                           + (" GPU" if node.device != "cpu" else "")),
            **{key: Text(x, justify="right") for key, x in zip(("last", "mean", "p95"), lat, strict=True)},
            "bytes": Text(NOT_MEASURED if node.is_head else bytes_or_dash(node.bytes_per_token()), justify="right"),
        }

    @staticmethod
    def _status_class(status: str) -> str:
        if status == "ready":
            return "nodes--ready"
        if status == "failed":
            return "nodes--failed"
        if status in ("idle", "stopped", "pending"):
            return "nodes--idle"
        return "nodes--busy"
