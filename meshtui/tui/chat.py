"""The conversation: every turn sends the whole history; the reply streams in as tokens arrive.

A prompt submitted while a reply is still streaming is refused with a notice (the text stays in the input),
so the history the model sees is always the one on screen. A prompt submitted before the mesh is ready (while
it comes up, or recovers) is kept, shown as waiting, and sent as soon as it is ready.
"""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.visual import visualize
from textual.widgets import Input, Static
from textual.worker import Worker, WorkerState

from meshtui import events as ev
from meshtui.errors import MeshError
from meshtui.replies import ReplyQueue
from meshtui.text import printable
from meshtui.tui.formatting import replies_in_flight
from meshtui.tui.throttle import Throttle

REPLY_REDRAW_INTERVAL = 0.1  # seconds: at most 10 redraws of a streaming reply a second
WAITING_TEXT = "waiting for the mesh: sent when it is ready"


class ChatMessage(Static):
    """One turn on screen: the user's prompt, the assistant's reply, or an error."""

    def __init__(self, role: str, text: str = "") -> None:
        super().__init__(Text(printable(text, keep_newlines=True)), classes=f"message -{role}")
        self.role = role
        self.text = text

    def set_text(self, text: str) -> bool:
        """Show `text`; True when it changed the widget's height (which costs a layout of the screen)."""
        self.text = text
        content = Text(printable(text, keep_newlines=True))  # a model's text may hold escape sequences
        width = self.size.width
        # the measure Textual's own layout uses (Widget.get_content_height passes its styles the same way)
        height = visualize(self, content).get_height(self.styles, width) if width else None  # type: ignore[arg-type]
        relayout = height is None or height != self.size.height
        self.update(content, layout=relayout)
        return relayout


class ChatPane(Vertical):
    in_flight: reactive[tuple[str, ...]] = reactive(())
    """Whose replies are being generated now (the chat's and the API's), from the core's reply events."""
    ready: reactive[bool] = reactive(False)
    """The mesh can answer: a copy of the core's one definition (`ReplyQueue.ready`, which is `Mesh.ready`),
    taken by `sync_ready` whenever the core reports a change. Never set from anywhere else."""
    down_reason: reactive[str] = reactive("")
    """Why the mesh cannot answer (empty while it is coming up)."""

    class ReplyGrew(Message):
        """The reply so far. A later one for the same turn supersedes it, so a busy UI skips ahead."""

        def __init__(self, turn: int, text: str) -> None:
            super().__init__()
            self.turn = turn
            self.text = text

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, ChatPane.ReplyGrew) and message.turn == self.turn

    class ReplyEnded(Message):
        def __init__(self, turn: int, finished: ev.ReplyFinished | None, error: str = "") -> None:
            super().__init__()
            self.turn = turn
            self.finished = finished
            self.error = error

    def __init__(self, requests: ReplyQueue, *, max_tokens: int = 256, temperature: float = 0.7, seed: int = 0,
                 id: str | None = None) -> None:
        super().__init__(id=id)
        self.requests = requests  # the queue in front of the engine, shared with the API
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.messages: list[dict[str, str]] = []
        self.stopping = False
        self._turn = 0  # the turn on screen; bumped by clearing so late messages of the old one are dropped
        self._streaming_turn: int | None = None
        self._waiting_turn: int | None = None  # a prompt kept until the mesh is ready
        self._gave_up = False  # the mesh will not come up: nothing typed can be sent
        self._reply: ChatMessage | None = None
        self._reply_text = ""
        self._reply_throttle = Throttle(self, REPLY_REDRAW_INTERVAL, self._show_reply)

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="transcript")
        yield Static("", id="chat-status")
        yield Input(placeholder="ask something; it is sent once the mesh is ready", id="prompt")

    def on_mount(self) -> None:
        self.border_title = "Chat"
        self._set_status("the mesh is coming up · a prompt typed now is sent when it is ready")
        self.focus_prompt()

    # -- readiness -------------------------------------------------------------------------------
    def watch_in_flight(self, sources: tuple[str, ...]) -> None:
        self.border_subtitle = replies_in_flight(sources)

    def sync_ready(self) -> None:
        """Take the core's readiness (the app calls this whenever the core reports something changed)."""
        self.ready = self.requests.ready

    def watch_ready(self, ready: bool) -> None:
        if self._gave_up:
            return
        prompt = self.query_one("#prompt", Input)
        if ready:
            prompt.placeholder = "ask something; Enter sends"
            if self._waiting_turn is not None:
                self._send_waiting()
            elif not self.streaming:
                self._set_status("ready · Enter sends · Esc stops a reply · Ctrl+L clears")
            prompt.focus()
        else:
            prompt.placeholder = "ask something; it is sent once the mesh is ready"

    def watch_down_reason(self, reason: str) -> None:
        if reason and not self._gave_up:
            if self._waiting_turn is not None:
                self._set_status(f"the mesh is down: {reason} · the prompt waits for it · Esc withdraws it",
                                 error=True)
            else:
                self._set_status(f"the mesh is down: {reason}", error=True)

    def give_up(self, reason: str) -> None:
        """The mesh will not come up (bringing it up failed): close the prompt, fail a waiting one."""
        self.down_reason = reason
        self._gave_up = True
        prompt = self.query_one("#prompt", Input)
        prompt.placeholder = "the mesh is down"
        prompt.disabled = True
        if self._waiting_turn is not None:
            turn, self._waiting_turn = self._waiting_turn, None
            self.post_message(self.ReplyEnded(turn, None, f"not sent: the mesh did not come up: {reason}"))
        self._set_status(f"the mesh is down: {reason}", error=True)

    # -- sending ---------------------------------------------------------------------------------
    @on(Input.Submitted, "#prompt")
    def _on_submit(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self._waiting_turn is not None:
            self.notify("A prompt is already waiting for the mesh: Esc withdraws it.", severity="warning")
            return
        if self.streaming:
            self.notify("A reply is still streaming: wait for it, or press Esc to stop it.", severity="warning")
            return
        event.input.clear()
        self.send(text)

    def send(self, text: str) -> None:
        """Show the prompt and send it; before the mesh is ready, keep it (shown as waiting) until it is."""
        self.messages.append({"role": "user", "content": text})
        self._turn += 1
        self._reply_text = ""
        self._reply = ChatMessage("assistant", "…")
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.mount_all([ChatMessage("user", text), self._reply])
        transcript.scroll_end(animate=False)
        self._streaming_turn = self._turn
        self.stopping = False
        if self.ready:
            self._set_status("streaming… Esc stops the reply")
            self._stream_reply(self._turn, list(self.messages))
            return
        self._waiting_turn = self._turn
        self._reply.set_text(WAITING_TEXT)
        self._reply.add_class("-waiting")
        self._reply.border_subtitle = "waiting"
        why = f"the mesh is down: {self.down_reason}" if self.down_reason else "the mesh is coming up"
        self._set_status(f"{why} · the prompt is sent when it is ready · Esc withdraws it",
                         error=bool(self.down_reason))

    def _send_waiting(self) -> None:
        turn, self._waiting_turn = self._waiting_turn, None
        if turn is None or turn != self._turn:
            return
        if self._reply is not None:
            self._reply.set_text("…")
            self._reply.remove_class("-waiting")
            self._reply.border_subtitle = ""
        self._set_status("streaming… Esc stops the reply")
        self._stream_reply(turn, list(self.messages))

    @work(exclusive=True, exit_on_error=False, group="chat")
    async def _stream_reply(self, turn: int, messages: list[dict[str, str]]) -> None:
        """Consume the mesh's stream for one reply; the UI only hears about it through messages."""
        text = ""
        finished: ev.ReplyFinished | None = None
        try:
            async for event in self.requests.stream(source="chat", messages=messages, max_tokens=self.max_tokens,
                                                    temperature=self.temperature, seed=self.seed):
                if isinstance(event, ev.TokenGenerated):
                    text += event.text
                    self.post_message(self.ReplyGrew(turn, text))
                elif isinstance(event, ev.ReplyFinished):
                    finished = event
        except MeshError as err:
            self.post_message(self.ReplyEnded(turn, None, str(err)))
            return
        self.post_message(self.ReplyEnded(turn, finished, "" if finished else "the reply ended unfinished"))

    @on(Worker.StateChanged)
    def _on_worker_state(self, event: Worker.StateChanged) -> None:
        """A bug in the stream (not a MeshError, which the worker reports itself) must still end the turn."""
        if event.worker.group == "chat" and event.state == WorkerState.ERROR and self._streaming_turn is not None:
            error = event.worker.error
            self.post_message(self.ReplyEnded(self._streaming_turn, None,
                                              f"internal error: {type(error).__name__}: {error}"))

    @on(ReplyGrew)
    def _on_reply_grew(self, message: ReplyGrew) -> None:
        if message.turn == self._turn:
            self._reply_text = message.text
            self._reply_throttle.poke()

    def _show_reply(self) -> None:
        if self._reply is not None and self._reply_text and self._reply.set_text(self._reply_text):
            self._follow()

    @on(ReplyEnded)
    def _on_reply_ended(self, message: ReplyEnded) -> None:
        if message.turn == self._streaming_turn:
            self._streaming_turn = None
        if message.turn != self._turn:
            return  # a reply stopped by clearing the conversation: forget it
        reply, self._reply = self._reply, None
        finished = message.finished
        text = (finished.text if finished else "") or self._reply_text
        unanswered = bool(self.messages) and self.messages[-1]["role"] == "user"
        if unanswered and (finished is None or not text):
            # no answer to keep: drop the prompt from the history (not the screen) so turns keep alternating
            self.messages.pop()
        if finished is None:
            if reply is not None:
                reply.set_text(self._reply_text or "(no reply)")
                reply.remove_class("-waiting")
                reply.add_class("-failed")
                reply.border_subtitle = "failed"
            self.query_one("#transcript").mount(ChatMessage("error", message.error))
            self._set_status(f"the reply failed: {message.error}", error=True)
        else:
            if reply is not None:
                reply.set_text(text or "(empty reply)")
                reply.border_subtitle = describe_reply(finished)
            if text:
                self.messages.append({"role": "assistant", "content": text})
            self._set_status(f"{describe_reply(finished)} · Enter sends · Ctrl+L clears")
        self._follow()

    # -- actions the app binds -------------------------------------------------------------------
    def stop(self) -> bool:
        """Stop the streaming reply; False when none is streaming."""
        if not self.streaming:
            return False
        if self._waiting_turn is not None:  # not sent yet: withdraw it
            turn, self._waiting_turn = self._waiting_turn, None
            self.post_message(self.ReplyEnded(turn, None, "withdrawn before the mesh was ready"))
            return True
        if not self.stopping:
            self.stopping = True
            if not self.requests.stop("chat") and self._streaming_turn is not None:
                # Still waiting behind an API reply: withdraw it before it starts.
                self.workers.cancel_group(self, "chat")
                self.post_message(self.ReplyEnded(self._streaming_turn, None, "stopped before it started"))
            self._set_status("stopping the reply…")
        return True

    def clear(self) -> None:
        self.stop()
        self._turn += 1  # whatever is still in flight belongs to the forgotten conversation
        self._reply = None
        self.messages.clear()
        self.query_one("#transcript").remove_children()
        self._set_status("conversation cleared")

    def focus_prompt(self) -> None:
        self.query_one("#prompt", Input).focus()

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def streaming(self) -> bool:
        """A reply is in flight (including one being stopped, and a prompt waiting for the mesh)."""
        return self._streaming_turn is not None

    @property
    def waiting(self) -> bool:
        """A prompt is kept until the mesh is ready."""
        return self._waiting_turn is not None

    def _follow(self) -> None:
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.scroll_end(animate=False)

    def _set_status(self, text: str, *, error: bool = False) -> None:
        status = self.query_one("#chat-status", Static)
        status.update(Text(text))
        status.set_class(error, "-error")


def describe_reply(finished: ev.ReplyFinished) -> str:
    count = len(finished.token_ids)
    tokens = f"{count} token{'s' if count != 1 else ''}"
    text = f"{finished.tokens_per_second:.1f} tok/s · {tokens} · {finished.seconds:.2f} s"
    spec = finished.speculative
    if spec is not None and spec.drafted and spec.tokens_per_step:
        # Drafts verified on the mesh: how many tokens each round trip brought, and how many drafts held.
        text += f" · {spec.tokens_per_step:.1f} tokens/round trip ({spec.accepted}/{spec.drafted} drafts kept)"
    if finished.stop_reason == "cancelled":
        text += " · stopped"
    elif finished.stop_reason == "length":
        text += " · hit the token limit"
    return text
