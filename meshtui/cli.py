"""`meshtui` command line: the arguments of up, serve, plan, bench and down, and the one place errors end.

Each command's runner is in `meshtui/commands.py`; expected failures print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from meshtui import __version__
from meshtui.commands import HEADLESS_MAX_TOKENS, TUI_MAX_TOKENS, cmd_bench, cmd_down, cmd_plan, cmd_serve, cmd_up
from meshtui.engine.protocol import SPECULATIVE_MODES
from meshtui.errors import MeshError
from meshtui.mesh import DEFAULT_PARALLEL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshtui", description="Run one LLM across the machines you can SSH into.")
    parser.add_argument("--version", action="version", version=f"meshtui {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("inventory", nargs="?", type=Path,
                       help="TOML host inventory (default: an embedded lab of local SSH hosts)")
        p.add_argument("--accept-new", action="store_true",
                       help="record unknown host keys (like StrictHostKeyChecking=accept-new); changed keys are "
                            "always refused")
        p.add_argument("--lab-hosts", type=int, default=2, metavar="N",
                       help="hosts in the embedded lab when no inventory is given (default 2)")
        p.add_argument("--model", type=Path, help="GGUF file to use instead of the inventory's model")
        p.add_argument("--context", type=int, help="context size instead of the inventory's")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument("-v", "--verbose", action="store_true", help="print each host's progress to stderr")
        p.add_argument("--weight-by-speed", action="store_true",
                       help="split layers by each node's measured speed (memory still bounds each node)")

    def api_options(p: argparse.ArgumentParser, default_port: int | None) -> None:
        p.add_argument("--api-host", default="127.0.0.1", metavar="H",
                       help="address to serve the API on (default 127.0.0.1; others need --api-key)")
        p.add_argument("--api-port", type=int, default=default_port, metavar="P",
                       help="port of the OpenAI-compatible API"
                            + (f" (default {default_port})" if default_port else ""))
        p.add_argument("--api-key", metavar="K",
                       help="bearer key clients must send (visible in `ps`: prefer --api-key-file or "
                            "$MESHTUI_API_KEY)")
        p.add_argument("--api-key-file", type=Path, metavar="FILE",
                       help="read the bearer key from the first line of FILE")

    def parallel_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL, metavar="N",
                       help=f"replies in flight at once, decoded together; the plan reserves KV cache for N "
                            f"sequences at the context (default {DEFAULT_PARALLEL})")

    def speculative_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--speculative", choices=SPECULATIVE_MODES, default="auto",
                       help="drafts made on the head and verified several per round trip: n-gram lookup over the "
                            "conversation, the inventory's [model] draft model, both where each pays (auto, the "
                            "default), or off")

    up = sub.add_parser("up", help="bring the mesh up and chat (TUI), or answer once (--headless)")
    common(up)
    up.add_argument("--headless", action="store_true", help="no TUI: answer --prompt once, tear down, exit")
    up.add_argument("--prompt", help="the prompt to answer in headless mode")
    up.add_argument("--max-tokens", type=int, default=None,
                    help=f"tokens per reply (default {HEADLESS_MAX_TOKENS} headless, {TUI_MAX_TOKENS} in the chat)")
    up.add_argument("--temperature", type=float, default=0.7)
    up.add_argument("--seed", type=int, default=0)
    up.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    api_options(up, default_port=None)
    parallel_option(up)
    speculative_option(up)

    serve = sub.add_parser("serve", help="bring the mesh up and serve an OpenAI-compatible API until stopped")
    common(serve)
    api_options(serve, default_port=8000)
    parallel_option(serve)
    speculative_option(serve)

    plan = sub.add_parser("plan", help="connect, probe and print the layer split; loads nothing")
    common(plan)
    parallel_option(plan)

    bench = sub.add_parser("bench", help="measure speed: the head alone, the mesh over SSH, plain TCP stages")
    common(bench)
    bench.add_argument("--out", type=Path, metavar="DIR", help="write bench.json and bench.svg into DIR")
    bench.add_argument("--prompts", type=int, default=3, metavar="N", help="fixed prompts to run (default 3)")
    bench.add_argument("--max-tokens", type=int, default=48, metavar="N", help="tokens per prompt (default 48)")
    bench.add_argument("--tcp-stages", metavar="NAME=HOST:PORT,...",
                       help="plain TCP ggml RPC servers you started, one per stage: adds the 'tcp' baseline")
    bench.add_argument("--parallel", type=int, default=None, metavar="N",
                       help="replies decoded together, as on up (default: the most --concurrency sends at once, "
                            f"else {DEFAULT_PARALLEL})")
    bench.add_argument("--rtt", metavar="MS,...",
                       help="sweep: the round trip added to every link, e.g. 0,1,2,5 (slow-link relays in front of "
                            "the hosts' sshd; decode tok/s per round trip)")
    bench.add_argument("--speculative", metavar="MODE,...",
                       help="sweep: speculation modes to compare at each round trip, e.g. off,auto "
                            "(off, auto, ngram, draft; default off)")
    bench.add_argument("--concurrency", metavar="N,...",
                       help="sweep: requests sent at once, e.g. 1,2,4,8 (aggregate and per-request decode tok/s, "
                            "time to first token)")

    down = sub.add_parser("down", help="stop agents left running on the inventory's hosts")
    down.add_argument("inventory", type=Path)
    down.add_argument("--accept-new", action="store_true")
    down.add_argument("--json", action="store_true")
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "up": cmd_up,
    "serve": cmd_serve,
    "plan": cmd_plan,
    "down": cmd_down,
    "bench": cmd_bench,
}


async def _run(args: argparse.Namespace) -> int:
    """Run a command; SIGTERM cancels it like Ctrl-C so every `finally` tears the mesh down."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    return await COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["up", *(argv if argv is not None else sys.argv[1:])])
    try:
        return asyncio.run(_run(args))
    except MeshError as err:
        print(f"meshtui: error: {err}", file=sys.stderr)
        return err.exit_code
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("meshtui: interrupted; the mesh was torn down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
