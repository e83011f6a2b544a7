"""The mesh at work: a row per node, the layer split, and each stage's recent per-token latency."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import DataTable, Label, Sparkline

from meshtui.tui.formatting import NOT_MEASURED, bytes_or_dash, latency_columns, layer_range, memory_use
from meshtui.tui.protocol import MeshLike
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


class NodesView(Vertical):
    """Reads the live `Node` objects (whose latency histories are bounded deques in the core)."""

    COMPONENT_CLASSES = {
        *(f"nodes--colour-{i}" for i in range(NODE_COLOURS)),
        "nodes--ready", "nodes--busy", "nodes--failed", "nodes--idle",
    }

    class Changed(Message):
        """Something about the nodes changed. Any number of these in a row are worth one redraw."""

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, NodesView.Changed)

    def __init__(self, mesh: MeshLike, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.mesh = mesh
        self.throttle = Throttle(self, REDRAW_INTERVAL, self.redraw)
        self._spark_shown: dict[str, tuple[int, float | None, bool]] = {}

    def compose(self) -> ComposeResult:
        yield DataTable(id="nodes-table", cursor_type="row", zebra_stripes=True)
        yield SplitBar(self.mesh, id="nodes-split")
        with Vertical(id="sparks"):
            for i, node in enumerate(self.mesh.nodes):
                if node.is_head:
                    continue
                # ids by position: host names may hold characters ids cannot ("gpu.1", "3090")
                with Horizontal(classes="spark-row"):
                    yield Label(node.name, classes="spark-name")
                    yield Sparkline([], classes=f"spark node-{i % NODE_COLOURS}", id=f"spark-{i}")
                    yield Label("", classes="spark-stat", id=f"spark-stat-{i}")

    def on_mount(self) -> None:
        self.border_title = "Mesh"
        self.border_subtitle = "per-token latency of each stage: total (compute+network) · memory: planned / usable"
        self._rows = TableSync(self.query_one(DataTable), COLUMNS)
        for row in self.mesh.summary():
            self._rows.show(row["name"], self._cells(row))

    @on(Changed)
    def _on_changed(self, message: Changed) -> None:
        self.throttle.poke()

    def redraw(self) -> None:
        for row in self.mesh.summary():
            self._rows.show(row["name"], self._cells(row))
        self.query_one(SplitBar).refresh()
        self._redraw_sparks()

    def _redraw_sparks(self) -> None:
        for i, node in enumerate(self.mesh.nodes):
            if node.is_head:
                continue
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

    def _cells(self, row: dict[str, Any]) -> list[Text]:
        known = {n.name: (i, n) for i, n in enumerate(self.mesh.nodes)}
        index, node = known[row["name"]]
        is_head = node.is_head
        colour = index % NODE_COLOURS
        plan = self.mesh.plan
        status = row["status"]
        lat = latency_columns(node.latencies)  # the head's: its decode time less the stages' round trips
        return [
            Text(row["name"], style=self.get_component_rich_style(f"nodes--colour-{colour}")),
            Text(row["address"]),
            Text(f"{status}: {row['reason']}" if status == "failed" and row.get("reason") else status,
                 style=self.get_component_rich_style(self._status_class(status))),
            Text(layer_range(row["layers"], plan.n_layer if plan is not None else None,
                             plus_output=is_head and bool(getattr(plan, "output_on_head", False)))),
            Text(memory_use(row["planned_bytes"], row["usable_bytes"]) + (" GPU" if row["device"] != "cpu" else "")),
            *(Text(x, justify="right") for x in lat),
            Text(NOT_MEASURED if is_head else bytes_or_dash(row["bytes_per_token"]), justify="right"),
        ]

    @staticmethod
    def _status_class(status: str) -> str:
        if status == "ready":
            return "nodes--ready"
        if status == "failed":
            return "nodes--failed"
        if status in ("idle", "stopped", "pending"):
            return "nodes--idle"
        return "nodes--busy"
