"""Save docs/screenshot.svg: the real app on the embedded lab after one streamed reply.

Run from the repository root: .venv/bin/python tests/tui/make_screenshot.py [PROMPT]
(Not a test: it writes into docs/. It brings up a real mesh, so it takes about 15 seconds.)
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from pilot_helpers import wait_until

from meshtui.inventory import ModelSpec
from meshtui.lab import EmbeddedLab
from meshtui.tui.app import make_app

DOCS = Path(__file__).resolve().parents[2] / "docs"
SIZE = (140, 40)


async def main(prompt: str) -> None:
    lab = EmbeddedLab(n_hosts=2)
    await lab.start()
    try:
        app = make_app(lab.inventory(ModelSpec(path=None, name="smollm2", context=2048)),
                       max_tokens=96, temperature=0.0)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.chat.ready or bool(app.up_error), 120, "the mesh")
            if app.up_error:
                raise SystemExit(f"the mesh did not come up: {app.up_error}")
            await pilot.press(*prompt, "enter")
            await wait_until(pilot, lambda: len(app.chat.messages) == 2, 120, "the reply")
            await pilot.pause(0.5)  # let the throttled table show the last token
            DOCS.mkdir(exist_ok=True)
            app.save_screenshot(filename="screenshot.svg", path=str(DOCS))
            print(f"saved {DOCS / 'screenshot.svg'}; reply: {app.chat.messages[-1]['content']!r}")
            await app.shutdown_mesh()
    finally:
        await lab.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "In one sentence, why split a model over machines?"))
