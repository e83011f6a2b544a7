"""Text from outside (hosts, model files, HTTP clients) made safe to show on a terminal.

A host's stderr, a GGUF's `general.name` or a request path can carry escape sequences that retitle the
terminal, rewrite what is on screen or hide text (bidi overrides). `printable` renders every such character
visibly, as Python writes it in a string literal (`\\x1b`, `\\u202e`), so the text is still readable and
nothing reaches the terminal as a control. Apply it where untrusted text enters an event, a log line or an
error message: every sink (log panel, TUI, `down`'s listing, `serve`'s request log) is then covered.
"""

from __future__ import annotations

# Bidirectional overrides, embeddings and isolates ("Trojan Source"), and the marks that reorder text.
_BIDI = frozenset({0x200E, 0x200F, 0x061C, *range(0x202A, 0x202F), *range(0x2066, 0x206A)})


def _is_control(code: int) -> bool:
    return code < 0x20 or 0x7F <= code <= 0x9F or code in _BIDI or code in (0x2028, 0x2029)


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """`text` with C0/C1 controls, ESC, DEL, line separators and bidi controls shown as `\\xNN`/`\\uNNNN`.

    Tabs stay (harmless); newlines stay only with `keep_newlines` (multi-line text such as a reply).
    Idempotent: the escapes it writes are plain printable characters.
    """
    if text.isprintable():  # the common case: nothing to do (isprintable is False for \\t, \\n and bidi too)
        return text
    out = []
    for char in text:
        code = ord(char)
        if char == "\t" or (keep_newlines and char == "\n") or not _is_control(code):
            out.append(char)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out)


def one_line(text: object, limit: int = 160) -> str:
    """Untrusted text as one printable line of at most `limit` characters, for an error message or a log."""
    flat = " ".join(str(text).split())
    safe = printable(flat)
    return safe if len(safe) <= limit else safe[: limit - 1] + "…"
