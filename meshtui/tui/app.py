"""The meshtui app: provisioning, then the mesh table and the chat; built by `make_app` for the CLI and tests."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import ContentSwitcher, DataTable, Footer, Header, Input
from textual.worker import Worker, WorkerError, WorkerState

from meshtui import events as ev
from meshtui.api import ApiServer
from meshtui.errors import MeshError
from meshtui.inventory import Inventory
from meshtui.mesh import DEFAULT_PARALLEL, Mesh
from meshtui.replies import ReplyQueue
from meshtui.state import MeshState, apply, initial_state
from meshtui.tui.chat import ChatPane
from meshtui.tui.help import HelpScreen
from meshtui.tui.log import LogPanel
from meshtui.tui.nodes import NodesView
from meshtui.tui.protocol import MeshFactory, MeshLike
from meshtui.tui.provisioning import ProvisioningView

INTERNAL_ERROR_EXIT = 70  # EX_SOFTWARE: a bug, not an expected failure
SHORT_BELOW = 32  # terminal rows under which the mesh panel is laid out compactly


def _real_mesh(inventory: Inventory, *, accept_new: bool, listener: ev.Listener,
               weight_by_speed: bool = False, parallel: int = DEFAULT_PARALLEL,
               speculative: str = "auto") -> MeshLike:
    return Mesh(inventory, accept_new=accept_new, listener=listener, weight_by_speed=weight_by_speed,
                parallel=parallel, speculative=speculative)


@dataclass(frozen=True)
class ApiOptions:
    """Serve the OpenAI-compatible API beside the chat once the mesh is up (`up --api-port`)."""

    host: str
    port: int
    key: str | None


class MeshApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "meshtui"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+c", "quit", "Quit", priority=True),
        Binding("ctrl+q", "quit", "Quit", show=False, priority=True),
        Binding("q", "quit", "Quit", show=False),
        Binding("escape", "stop_or_leave", "Stop reply"),
        Binding("ctrl+l", "clear_chat", "Clear chat", priority=True),
        Binding("f1", "help", "Help"),
        Binding("question_mark", "help", "Help", show=False),
        Binding("f2", "toggle_log", "Log"),
        Binding("f3", "toggle_view", "Setup/Mesh"),
        Binding("f4", "fold_mesh", "Fold mesh"),
        Binding("i", "focus_prompt", "Prompt", show=False),
        Binding("r", "rejoin", "Rejoin failed"),
    ]

    class RepliesChanged(Message):
        """A reply started or ended: whose are in flight now."""

        def __init__(self, sources: tuple[str, ...]) -> None:
            super().__init__()
            self.sources = sources

    class MeshWentUp(Message):
        pass

    class CoreChanged(Message):
        """The core reported something that may change whether it can answer; coalesced when busy."""

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, MeshApp.CoreChanged)

    class MeshRecovered(Message):
        def __init__(self, host: str, seconds: float) -> None:
            super().__init__()
            self.host = host
            self.seconds = seconds

    class HostRejoined(Message):
        def __init__(self, host: str) -> None:
            super().__init__()
            self.host = host

    class StageLost(Message):
        def __init__(self, host: str, reason: str) -> None:
            super().__init__()
            self.host = host
            self.reason = reason

    def __init__(self, inventory: Inventory, *, mesh_factory: MeshFactory, accept_new: bool = False,
                 max_tokens: int = 256, temperature: float = 0.7, seed: int = 0,
                 api: ApiOptions | None = None) -> None:
        super().__init__()
        self.inventory = inventory
        # The views read this state, folded here from the core's events (meshtui/state.py), never the mesh's objects.
        self.state: MeshState = initial_state((h.name, h.address) for h in inventory.hosts)
        self.mesh: MeshLike = mesh_factory(inventory, accept_new=accept_new, listener=self._on_core_event)
        self.requests = ReplyQueue(self.mesh)  # the chat's and the API's replies, up to mesh.parallel at once
        self.api_options = api
        self.api_server: ApiServer | None = None
        self.chat = ChatPane(self.requests, max_tokens=max_tokens, temperature=temperature, seed=seed, id="chat")
        self.nodes_view = NodesView(self._read_state, id="nodes")
        self.provisioning = ProvisioningView(self._read_state, id="provisioning")
        self.log_panel = LogPanel(id="log-panel")
        self.is_up = False
        self.lost: set[str] = set()  # stages lost after the mesh was up
        self.up_error = ""  # the one-line reason bringing the mesh up failed
        self.exit_code = 0
        self._teardown: asyncio.Future[None] | None = None

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="◆")
        with ContentSwitcher(initial="provisioning", id="views"):
            yield self.provisioning
            yield self.nodes_view
        yield self.chat
        yield self.log_panel
        yield Footer()

    def on_mount(self) -> None:
        model = self.inventory.model
        self.sub_title = f"{model.name or (model.path.name if model.path else 'model')} on {self.inventory.source}"
        self.bring_up()

    # -- the core talks to us here ---------------------------------------------------------------
    def _read_state(self) -> MeshState:
        return self.state

    def _on_core_event(self, event: ev.Event) -> None:
        """The core's listener: runs in the core's call stack, so it folds the event and posts messages; it
        never draws."""
        self.state = apply(self.state, event)
        match event:
            case ev.LogRecorded():
                self.log_panel.post_message(LogPanel.Recorded(event))
            case ev.StageLatencyMeasured():
                self.nodes_view.post_message(NodesView.Changed())
            case ev.ReplyStarted() | ev.ReplyFinished() | ev.ReplyFailed():
                # The chat pane consumes its own stream; it shows whose replies are in flight (the state's).
                self.post_message(self.RepliesChanged(tuple(r.source for r in self.state.replies.values())))
                return
            case ev.TokenGenerated():
                return
            case ev.MeshReady():
                self.post_message(self.MeshWentUp())
            case ev.MeshRecovered():
                self.nodes_view.post_message(NodesView.Changed())
                self.post_message(self.MeshRecovered(event.host, event.seconds))
            case ev.HostRejoined():
                self.nodes_view.post_message(NodesView.Changed())
                self.post_message(self.HostRejoined(event.host))
            case _:
                self.provisioning.post_message(ProvisioningView.EventArrived(event))
                self.nodes_view.post_message(NodesView.Changed())
                if isinstance(event, ev.StageFailed) or (isinstance(event, ev.HostFailed) and self.is_up):
                    self.post_message(self.StageLost(event.host, event.reason))
        if not isinstance(event, (ev.LogRecorded, ev.StageLatencyMeasured, ev.TransferProgressed)):
            self.post_message(self.CoreChanged())

    @on(CoreChanged)
    def _on_core_changed(self) -> None:
        # The core's one definition of ready (a loaded engine, no recovery under way); the chat pane keeps no
        # rule of its own.
        self.chat.sync_ready()

    @work(exclusive=True, exit_on_error=False, group="mesh")
    async def bring_up(self) -> None:
        await self.mesh.up()
        # As headless `up` and `serve` do: failed hosts are retried in the background and rejoin before the
        # next reply once they are reachable (`r` asks at once).
        self.mesh.enable_auto_rejoin()

    @on(Worker.StateChanged)
    def _on_worker_state(self, event: Worker.StateChanged) -> None:
        if event.worker.group != "mesh" or event.state != WorkerState.ERROR:
            return
        error = event.worker.error
        if isinstance(error, MeshError):
            self.up_error = str(error)
            self.exit_code = error.exit_code
        else:  # a bug: say what it was rather than hide it
            self.up_error = f"internal error: {type(error).__name__}: {error}"
            self.exit_code = INTERNAL_ERROR_EXIT
        self.query_one("#views", ContentSwitcher).current = "provisioning"
        self.provisioning.set_status(f"✗ {self.up_error}\nEverything started was torn down. Press q to quit.",
                                     failed=True)
        self.chat.give_up(self.up_error)

    @on(MeshWentUp)
    def _on_mesh_up(self) -> None:
        self.is_up = True
        self.query_one("#views", ContentSwitcher).current = "nodes"
        self.nodes_view.redraw()
        self.chat.sync_ready()
        if self.api_options is not None and self.api_server is None:
            self.serve_api(self.api_options)

    @work(exclusive=True, exit_on_error=False, group="api")
    async def serve_api(self, options: ApiOptions) -> None:
        # Each request is logged through the mesh's listener, so it shows in the log panel like the core's lines.
        server = ApiServer(cast(Mesh, self.mesh), options.host, options.port, options.key, requests=self.requests)
        try:
            await server.start()
        except MeshError as err:
            self._log_line("api", str(err), "error")
            self.notify(str(err), title="API not served", severity="error", timeout=10)
            return
        self.api_server = server
        self._log_line("api", f"serving the OpenAI-compatible API on {server.url}")
        self.sub_title = f"{self.sub_title} · API {server.url}"

    def _log_line(self, source: str, message: str, level: str = "info") -> None:
        self.log_panel.post_message(LogPanel.Recorded(ev.LogRecorded(source=source, message=message, level=level)))

    @on(RepliesChanged)
    def _on_replies_changed(self, message: RepliesChanged) -> None:
        self.chat.in_flight = message.sources

    @on(StageLost)
    def _on_stage_lost(self, message: StageLost) -> None:
        if message.host in self.lost:
            return  # the core reports a lost stage twice: HostFailed, then StageFailed
        self.lost.add(message.host)
        self.chat.down_reason = f"{message.host}: {message.reason}"
        self.notify(f"{message.host}: {message.reason}", title="stage lost", severity="error", timeout=10)

    @on(MeshRecovered)
    def _on_recovered(self, message: MeshRecovered) -> None:
        """The core re-planned without the lost stage and the reply went on: the chat is usable again."""
        self.chat.down_reason = ""
        self.notify(f"continuing without {message.host} (recovered in {message.seconds:.1f}s); it rejoins by "
                    "itself once it is back (r tries now)", title="mesh recovered", timeout=8)

    @on(HostRejoined)
    def _on_rejoined(self, message: HostRejoined) -> None:
        self.lost.discard(message.host)
        self.chat.down_reason = ""
        self.notify(f"{message.host} is back in the mesh", title="rejoined", timeout=6)

    # -- actions ---------------------------------------------------------------------------------
    def action_rejoin(self) -> None:
        failed = self.state.failed_hosts()
        if not self.is_up or not failed:
            self.notify("No failed host to rejoin.", severity="warning")
        elif self.chat.streaming or self.requests.active_source is not None:
            self.notify("Wait for the reply to finish (or stop it with Esc), then rejoin.", severity="warning")
        else:
            self.rejoin_hosts(failed)

    @work(exclusive=True, exit_on_error=False, group="rejoin")
    async def rejoin_hosts(self, names: list[str]) -> None:
        # A rejoin reloads the engine: it takes its turn like a reply, so none starts meanwhile.
        async with self.requests.exclusive("rejoin"):
            for name in names:
                try:
                    await self.mesh.rejoin(name)
                except MeshError as err:
                    self.notify(str(err), title=f"{name} cannot rejoin yet", severity="error", timeout=8)
        self.post_message(self.CoreChanged())

    async def action_quit(self) -> None:
        self.sub_title = "tearing the mesh down…"
        await self.shutdown_mesh()
        self.exit(return_code=self.exit_code)

    async def shutdown_mesh(self) -> None:
        """Stop any reply and any bring-up in progress, then tear the mesh down. Every caller waits for
        the one teardown: quitting twice, or the app ending some other way, never leaves it half done."""
        if self._teardown is None:
            self._teardown = asyncio.ensure_future(self._tear_down())
        await asyncio.shield(self._teardown)

    async def _tear_down(self) -> None:
        if self.api_server is not None:  # stop taking requests; open ones are cut and their replies cancelled
            await self.api_server.close()
        if self.requests.active_source is not None:
            self.mesh.cancel()  # the UI may be gone already: talk to the mesh, not the chat pane
        workers = [w for w in self.workers if w.group in ("mesh", "chat", "api") and not w.is_finished]
        for worker in workers:
            worker.cancel()
        for worker in workers:  # up() tears down what it started when cancelled: let it finish
            with contextlib.suppress(WorkerError):  # cancelled, or failed and already reported
                await worker.wait()
        await self.requests.settle()
        try:
            await self.mesh.close()
        except MeshError as err:  # close() already swallows what it expects; say what is left, still quit
            self.up_error = self.up_error or f"teardown: {err}"

    def action_stop_or_leave(self) -> None:
        if self.chat.stop():
            return
        if isinstance(self.focused, Input):
            current = self.query_one("#views", ContentSwitcher).current
            self.query_one(f"#{current}").query_one(DataTable).focus()

    def action_clear_chat(self) -> None:
        self.chat.clear()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_toggle_log(self) -> None:
        self.log_panel.toggle_class("-open")

    def action_toggle_view(self) -> None:
        switcher = self.query_one("#views", ContentSwitcher)
        switcher.current = "nodes" if switcher.current == "provisioning" else "provisioning"

    def action_fold_mesh(self) -> None:
        """Fold the mesh panel to its table (no split bar, no sparklines), or unfold it."""
        self.nodes_view.toggle_class("-folded")
        self.provisioning.toggle_class("-folded")

    def on_resize(self) -> None:
        # A short terminal (24 rows) keeps most of its height for the chat: see app.tcss's `.-short` rules.
        self.set_class(self.size.height < SHORT_BELOW, "-short")

    def action_focus_prompt(self) -> None:
        self.chat.focus_prompt()


def make_app(inventory: Inventory, *, accept_new: bool = False, mesh_factory: MeshFactory | None = None,
             max_tokens: int = 256, temperature: float = 0.7, seed: int = 0, weight_by_speed: bool = False,
             api: ApiOptions | None = None, parallel: int = DEFAULT_PARALLEL,
             speculative: str = "auto") -> MeshApp:
    """The one way to build the app: the CLI passes its options, tests pass a fake mesh factory."""
    factory = mesh_factory or cast(MeshFactory, functools.partial(_real_mesh, weight_by_speed=weight_by_speed,
                                                                  parallel=parallel, speculative=speculative))
    return MeshApp(inventory, mesh_factory=factory, accept_new=accept_new, max_tokens=max_tokens,
                   temperature=temperature, seed=seed, api=api)


async def run_tui(inventory: Inventory, **options: Any) -> int:
    """Run the app until the user quits; the mesh is torn down however it ends. Returns the exit code.

    `options` are make_app's: accept_new, max_tokens, temperature, seed, weight_by_speed, api, parallel,
    speculative.
    """
    app = make_app(inventory, **options)
    try:
        await app.run_async()
    finally:
        await app.shutdown_mesh()
    if app.up_error:
        print(f"meshtui: error: {app.up_error}", file=sys.stderr)
    return app.return_code if app.return_code is not None else app.exit_code
