"""``python -m infokv_local.ui.screenshot``: the README's picture of the chat (``docs/ui.png``).

Starts the chat on the embedded model with a small budget, has a two-turn conversation in headless
Chromium (so the cache has grown and been compressed several times) and saves a full-page
screenshot. Needs Playwright (the test extra) and the system Chromium.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ..settings import DEFAULTS
from .browser import CHROMIUM, UIServer, launch_chromium

TURNS = ["Tell me a short story about a lighthouse keeper and a storm.", "Give the story a title."]


def take(out: Path, budget: int = 64, buffer: int = 16, max_tokens: int = 200, policy: str = DEFAULTS.policy,
         turns: list[str] | None = None, width: int = 1400, height: int = 1100) -> Path:
    """Run the conversation and write the screenshot to ``out``."""
    from playwright.sync_api import expect, sync_playwright

    args = ["--budget", str(budget), "--buffer", str(buffer), "--max-tokens", str(max_tokens), "--policy", policy,
            "--temperature", "0.7"]
    with tempfile.TemporaryDirectory() as tmp, UIServer(args, Path(tmp) / "server.log") as server:
        server.wait_ready()
        with sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(server.url)
            for i, text in enumerate(turns or TURNS):
                box = page.locator("#msg textarea")
                box.fill(text)
                box.press("Enter")
                expect(page.locator('#chat [data-testid="bot"]')).to_have_count(i + 1, timeout=60_000)
                expect(page.locator("#kv-panel .kv-panel")).to_have_attribute("data-state", "generating",
                                                                               timeout=60_000)
                page.wait_for_function("() => document.querySelector('#kv-panel .kv-panel')"
                                       ".dataset.state.startsWith('done')", timeout=180_000)
            page.mouse.move(0, 0)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--out``, ``--budget``, ``--buffer``, ``--max-tokens``, ``--policy``."""
    p = argparse.ArgumentParser(prog="python -m infokv_local.ui.screenshot", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("docs/ui.png"))
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--buffer", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--policy", default=DEFAULTS.policy)
    a = p.parse_args(argv)
    if not Path(CHROMIUM).exists():
        p.error(f"{CHROMIUM} is missing (apt-get install chromium)")
    print(take(a.out, a.budget, a.buffer, a.max_tokens, a.policy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
