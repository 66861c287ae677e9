"""End to end: ``python -m infokv_local.ui`` on the real model, driven in a real headless Chromium.

One server (a subprocess on a free local port, budget 48 + buffer 16 so SmolLM2-135M evicts within
a few dozen tokens, greedy sampling so the long answer never ends before it is stopped) and one
browser serve all the tests of this file.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infokv_local.ui.browser import CHROMIUM, UIServer, launch_chromium

LONG_PROMPT = "Write a long story about a dragon who learns to fly."  # greedy: > 400 tokens, no end token
SERVER_ARGS = ["--budget", "48", "--buffer", "16", "--temperature", "0", "--max-tokens", "400"]

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
expect = sync_api.expect


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UIServer]:
    with UIServer(SERVER_ARGS, tmp_path_factory.mktemp("ui") / "server.log") as srv:
        try:
            srv.wait_ready()
        except RuntimeError as e:
            pytest.fail(str(e))
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


def _open(browser, server: UIServer):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(server.url)
    expect(page.locator("#msg textarea")).to_be_visible(timeout=30_000)
    return page


def _send(page, text: str) -> None:
    box = page.locator("#msg textarea")
    box.fill(text)
    box.press("Enter")


def _bot_text(page) -> str:
    bots = page.locator('#chat [data-testid="bot"]')
    return bots.last.inner_text() if bots.count() else ""


def _stat(page, key: str) -> float:
    return float(page.locator(f"#kv-panel .kv-{key}").get_attribute("data-value"))


def _wait_stat_above(page, key: str, value: float, timeout: float = 60_000) -> None:
    page.wait_for_function(
        "([key, value]) => { const e = document.querySelector(`#kv-panel .kv-${key}`);"
        " return e !== null && parseFloat(e.dataset.value) > value; }",
        arg=[key, value], timeout=timeout,
    )


def _panel_state(page) -> str:
    return page.locator("#kv-panel .kv-panel").get_attribute("data-state") or ""


def test_chat_streams_shows_the_cache_stops_and_clears(server: UIServer, browser, tmp_path: Path) -> None:
    page = _open(browser, server)
    _send(page, LONG_PROMPT)

    # the answer streams: the bot message appears, then grows
    bot = page.locator('#chat [data-testid="bot"]').last
    expect(bot).to_be_visible(timeout=60_000)
    page.wait_for_function("() => { const b = [...document.querySelectorAll('#chat [data-testid=\"bot\"]')].pop();"
                           " return b && b.innerText.length > 40; }", timeout=60_000)
    first = len(_bot_text(page))
    page.wait_for_function("(n) => { const b = [...document.querySelectorAll('#chat [data-testid=\"bot\"]')].pop();"
                           " return b && b.innerText.length > n; }", arg=first, timeout=30_000)
    assert _panel_state(page) == "generating"

    # the cache panel moves: cells in use, then compressions and evicted tokens while streaming
    _wait_stat_above(page, "used", 0)
    _wait_stat_above(page, "evicted", 0)
    _wait_stat_above(page, "evictions", 1)
    assert 0 < _stat(page, "used") <= 48 + 16
    assert _stat(page, "mib") > 0
    assert _stat(page, "peak") <= 48 + 16
    # the chart is drawn (Vega renders an SVG with the series' lines) and the map marks evicted tokens
    expect(page.locator("#kv-plot svg path").first).to_be_attached(timeout=20_000)
    expect(page.locator("#kv-plot svg")).to_contain_text("cells in use")
    expect(page.locator("#cache-map .tok.gone").first).to_be_attached(timeout=20_000)
    expect(page.locator("#cache-map .tok.kept").first).to_be_attached()
    assert page.locator("#cache-map .cache-map").get_attribute("data-evicted") not in (None, "0")

    # stop mid-answer: the state says so and the text no longer grows
    assert _panel_state(page) == "generating", "the answer ended before Stop was pressed"
    page.locator("#stop").click()
    expect(page.locator("#kv-panel .kv-panel")).to_have_attribute("data-state", "done (stopped)", timeout=10_000)
    stopped = _bot_text(page)
    time.sleep(1.0)  # an answer still streaming would add several tokens in this time
    assert _bot_text(page) == stopped
    assert _stat(page, "used") <= 48 + 16
    page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
    if os.environ.get("INFOKV_UI_SCREENSHOT"):
        shutil.copy(tmp_path / "ui.png", os.environ["INFOKV_UI_SCREENSHOT"])

    # a budget too small is refused with a clear message, and nothing is lost
    n_messages = page.locator('#chat [data-testid="user"], #chat [data-testid="bot"]').count()
    page.locator("#budget input").fill("10")
    expect(page.locator("#budget-note")).to_contain_text("too small")
    _send(page, "Go on.")
    expect(page.get_by_text(re.compile(r"Budget 10 is too small"))).to_be_visible(timeout=10_000)
    expect(page.locator("#msg textarea")).to_have_value("Go on.")
    assert page.locator('#chat [data-testid="user"], #chat [data-testid="bot"]').count() == n_messages
    assert _bot_text(page) == stopped
    page.locator("#budget input").fill("48")
    expect(page.locator("#budget-note")).to_contain_text("MiB")

    # a new chat clears the conversation, the map and the panel
    page.locator("#new-chat").click()
    expect(page.locator('#chat [data-testid="user"]')).to_have_count(0, timeout=10_000)
    expect(page.locator('#chat [data-testid="bot"]')).to_have_count(0)
    expect(page.locator("#kv-panel .kv-panel")).to_have_attribute("data-state", "new chat")
    expect(page.locator("#cache-map .cache-map")).to_have_attribute("data-tokens", "0")
    page.close()


def test_tabs_have_their_own_conversations_and_closing_one_releases_it(server: UIServer, browser) -> None:
    a, b = _open(browser, server), _open(browser, server)
    for page in (a, b):
        page.locator("#max-tokens input").fill("24")
    _send(a, "Name one colour.")
    _send(b, "Name one animal.")
    for page in (a, b):  # the second waits for the first (one generation at a time on the model)
        expect(page.locator("#kv-panel .kv-panel")).to_have_attribute("data-state", re.compile(r"^done"),
                                                                       timeout=90_000)
        expect(page.locator('#chat [data-testid="user"]')).to_have_count(1)
        expect(page.locator('#chat [data-testid="bot"]')).to_have_count(1)
    expect(a.locator('#chat [data-testid="user"]')).to_have_text("Name one colour.")
    expect(b.locator('#chat [data-testid="user"]')).to_have_text("Name one animal.")
    assert "animal" not in a.locator("#cache-map").inner_text()
    assert "colour" not in b.locator("#cache-map").inner_text()

    n_closed = server.log().count(" closed (")
    b.close()
    server.wait_log_count(" closed (", n_closed + 1)
    # the other tab still works, on its own conversation
    _send(a, "And another one.")
    expect(a.locator('#chat [data-testid="user"]')).to_have_count(2, timeout=30_000)
    expect(a.locator("#kv-panel .kv-panel")).to_have_attribute("data-state", re.compile(r"^done"), timeout=90_000)
    a.close()
