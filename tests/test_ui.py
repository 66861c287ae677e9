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
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from infokv_local.api import CacheMap, InfoKVLlama
from infokv_local.llamacpp.model import Model
from infokv_local.ui.app import budget_note
from infokv_local.ui.browser import CHROMIUM, UIServer, launch_chromium
from infokv_local.ui.cache_map import render_cache_map
from infokv_local.ui.chart import BUDGET, PEAK, USED, cache_frame
from infokv_local.ui.panel import render_panel
from infokv_local.ui.session import ChatSession, Settings

try:
    from playwright.sync_api import expect
except ImportError:  # the browser tests skip; the others run
    expect = None

LONG_PROMPT = "Write a long story about a dragon who learns to fly."  # greedy: > 400 tokens, no end token
SERVER_ARGS = ["--budget", "48", "--buffer", "16", "--temperature", "0", "--max-tokens", "400"]



def _need_browser() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UIServer]:
    _need_browser()
    with UIServer(SERVER_ARGS, tmp_path_factory.mktemp("ui") / "server.log") as srv:
        try:
            srv.wait_ready()
        except RuntimeError as e:
            pytest.fail(str(e))
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
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
    expect(page.locator("#send")).to_be_disabled()  # no second message while answering
    page.locator("#stop").click()
    expect(page.locator("#kv-panel .kv-panel")).to_have_attribute("data-state", "done (stopped)", timeout=10_000)
    expect(page.locator("#send")).to_be_enabled(timeout=10_000)
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


def _choose(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.click()
    page.get_by_role("option", name=value, exact=True).click()
    expect(box).to_have_value(value)


def test_a_quantized_cache_from_the_dropdown(server: UIServer, browser) -> None:
    """KV cache type q8_0: the note shows its MiB, the answer runs on it (the panel says so), h2o is refused."""
    page = _open(browser, server)
    f16_note = page.locator("#budget-note").inner_text()
    _choose(page, "cache-type", "q8_0")
    expect(page.locator("#budget-note")).to_contain_text("(q8_0)")
    assert page.locator("#budget-note").inner_text() != f16_note
    page.locator("#max-tokens input").fill("40")
    _send(page, "Name three colours.")
    expect(page.locator("#kv-panel .kv-panel")).to_have_attribute("data-state", re.compile(r"^done"), timeout=90_000)
    expect(page.locator("#kv-panel .kv-foot")).to_have_attribute("data-cache-type", "q8_0")
    expect(page.locator("#kv-panel .kv-foot")).to_contain_text("(q8_0)")
    _choose(page, "policy", "h2o")
    expect(page.locator("#budget-note")).to_contain_text("h2o needs flash attention off")
    _send(page, "And three animals.")
    expect(page.get_by_text(re.compile(r"Policy h2o needs flash attention off"))).to_be_visible(timeout=10_000)
    expect(page.locator("#msg textarea")).to_have_value("And three animals.")
    page.close()


def test_the_prompt_probe_from_its_checkbox(server: UIServer, browser) -> None:
    """Checked, a message longer than the cache is read with its end first before each compression (the
    panel says how often); unchecked, in plain chunks."""
    page = _open(browser, server)
    long_message = " ".join(["The harbour town kept its boats in rows along the old stone quay."] * 12) + \
        " What is kept along the quay?"
    panel = page.locator("#kv-panel .kv-panel")
    page.locator("#max-tokens input").fill("6")
    page.locator("#prompt-probe input").check()
    _send(page, long_message)
    expect(panel).to_have_attribute("data-state", re.compile(r"^done"), timeout=120_000)
    probes = page.locator("#kv-panel .kv-probes")
    expect(probes).to_contain_text("prompt probe of 8 tokens")  # min(window 32, buffer 16 // 2)
    assert int(probes.get_attribute("data-value") or 0) > 0
    assert 0 < _stat(page, "peak") <= 48 + 16

    page.locator("#prompt-probe input").uncheck()
    page.locator("#new-chat").click()
    expect(panel).to_have_attribute("data-state", "new chat", timeout=30_000)
    _send(page, long_message)
    expect(panel).to_have_attribute("data-state", re.compile(r"^done"), timeout=120_000)
    expect(page.locator("#kv-panel .kv-probes")).to_have_count(0)
    assert _stat(page, "evictions") > 0
    page.close()


def test_regenerate_answers_the_last_message_again(server: UIServer, browser) -> None:
    """The Regenerate button drops the last answer and answers the last message again (greedy: the same text,
    the budget of 48 + 16 not reached), the conversation before it kept; with no message yet it says so."""
    page = _open(browser, server)
    page.locator("#regenerate").click()
    expect(page.get_by_text("Nothing to regenerate yet")).to_be_visible(timeout=10_000)
    page.locator("#max-tokens input").fill("8")
    panel = page.locator("#kv-panel .kv-panel")
    _send(page, "Name one colour.")
    expect(panel).to_have_attribute("data-state", re.compile(r"^done"), timeout=90_000)
    first = _bot_text(page)
    assert first
    assert page.locator("#kv-panel .kv-reused").count() == 0  # a first message reuses nothing
    page.locator("#regenerate").click()
    # the conversation up to the message's last token is kept: the answer is all that is generated again
    expect(page.locator("#kv-panel .kv-reused")).to_have_count(1, timeout=90_000)
    expect(panel).to_have_attribute("data-state", re.compile(r"^done"), timeout=90_000)
    assert int(page.locator("#kv-panel .kv-reused").get_attribute("data-value") or 0) > 0
    expect(page.locator('#chat [data-testid="user"]')).to_have_count(1)
    expect(page.locator('#chat [data-testid="bot"]')).to_have_count(1)
    assert _bot_text(page) == first
    page.close()


# ---- the pieces the page is made of (no browser) ------------------------------------------------------------------
def test_cache_map_escapes_tokens_and_marks_what_the_cache_keeps() -> None:
    pieces = ["<|im_start|>", "<script>alert(1)</script>", " & ", "\n", "kept", "low", "recent", "next"]
    cmap = CacheMap(
        pieces=pieces,
        in_cache=np.array([True, False, False, True, True, True, True, False]),
        score=np.array([np.nan, np.nan, np.nan, 0.1, 0.9, 0.2, np.nan, np.nan]),
        protected=np.array([True, False, False, False, False, False, True, False]),
        evicted=np.array([False, True, True, False, False, False, False, False]),
    )
    html = render_cache_map(cmap)
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert " &amp; " in html
    assert 'data-tokens="8"' in html and 'data-kept="5"' in html and 'data-evicted="2"' in html
    assert html.count('class="tok gone"') == 2 + 1  # two tokens and the legend
    assert html.count("tok kept prot") == 2 + 1  # two tokens and the legend
    assert 'class="tok kept s4" title="#4' in html  # the best-scored kept token is in the top class
    assert 'class="tok kept s0" title="#3' in html  # and the worst in the bottom one
    assert 'class="tok pending" title="#7' in html  # sampled, not fed yet: neither cached nor evicted
    assert "showing the last 3 of 8 tokens" in render_cache_map(cmap, max_tokens=3)
    assert 'data-tokens="0"' in render_cache_map(None)


def test_chart_keeps_the_teeth_of_the_saw_and_the_budget_lines() -> None:
    history = [(i, 48 + i % 17) for i in range(1, 5001)]  # grow by 16, drop back to 48, 5000 times
    frame = cache_frame(history, 48, 16, max_points=400)
    used = frame[frame.series == USED]
    assert len(used) <= 400
    assert used.cells.max() == 64 and used.cells.min() == 48
    assert set(frame.series) == {USED, BUDGET, PEAK}
    assert set(cache_frame(history, None, None).series) == {USED}


def test_panel_and_budget_note_show_the_numbers() -> None:
    kv = {"policy": "infokv", "budget": 48, "buffer": 16, "used_cells": 60, "max_used_cells": 64,
          "kv_bytes": 60 * 23040, "kv_bytes_per_token": 23040, "evictions": 3, "evicted_tokens": 48,
          "tokens_per_s": None}
    html = render_panel(kv, "generating")
    assert 'class="kv-stat kv-used" data-value="60"' in html and "60 / 48 (+16)" in html
    assert 'kv-evicted" data-value="48"' in html and 'data-state="generating"' in html
    assert "(no budget)" in render_panel({**kv, "policy": "full", "budget": None, "buffer": None})
    assert "kv-probes" not in html and "kv-reused" not in html and "kv-checkpoints" not in html
    assert 'kv-reused" data-value="30"> · 30 tokens of history reused' in render_panel({**kv, "reused_tokens": 30})
    assert "2 checkpoints (1.5 MiB)" in render_panel({**kv, "checkpoints": 2, "checkpoint_bytes": 3 * 2**19})
    assert 'kv-probes" data-value="3"> · prompt probe of 8 tokens, read 3x' in render_panel(
        {**kv, "prompt_probe": 8, "probes": 3})
    assert Settings(prompt_probe=True).engine_kwargs()["prompt_probe"] is True
    assert "too small" in budget_note(10, 16, 23040, 37)
    assert "MiB" in budget_note(48, 16, 23040, 37)
    with pytest.raises(ValueError, match="at least 37"):
        Settings(budget=36).check()
    with pytest.raises(ValueError, match="Unknown policy 'nope'"):
        Settings(policy="nope").check()


def test_session_stops_continues_closes_and_clears(model: Model) -> None:
    settings = Settings(budget=48, buffer=16, temperature=0.0, max_tokens=400)
    session = ChatSession(factory=lambda s: InfoKVLlama(model, **s.engine_kwargs()))

    session.submit(LONG_PROMPT, settings, "You are a helpful assistant.")
    updates = []
    for up in session.reply():
        updates.append(up)
        if len(updates) == 80:
            session.stop()
    last = updates[-1]
    assert last.done and last.finish_reason == "stopped" and len(updates) == 81
    assert last.kv["evicted_tokens"] > 0 and last.kv["used_cells"] <= 64
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    assert session.history[1]["content"] == last.text and not session.busy

    # the next turn continues the same conversation on the compressed cache
    session.submit("Go on.", replace(settings, max_tokens=8), "You are a helpful assistant.")
    last = list(session.reply())[-1]
    assert last.done and last.finish_reason == "length"
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2

    # closing the tab while it answers: the answer ends at the next token and the context is released
    session.submit("And then?", settings, "")
    reply = session.reply()
    next(reply)
    session.close()
    assert session.llm is not None  # still answering
    rest = list(reply)
    assert rest[-1].finish_reason == "stopped" and len(rest) <= 2
    assert session.llm is None

    # settings the engine refuses: an error, and the conversation is as it was
    before = list(session.history)
    session.submit("Hi", replace(settings, policy="infokv:no_such_parameter=1"), "")
    with pytest.raises(ValueError, match="no_such_parameter"):
        list(session.reply())
    assert session.history == before and not session.busy

    # a new chat forgets everything (and a closed session starts again on the next message)
    assert session.new_chat()
    assert session.history == []
    session.submit("Hi", replace(settings, max_tokens=4), "")
    assert list(session.reply())[-1].done and session.llm is not None
    session.close()
    assert session.llm is None


def test_session_regenerates_the_last_answer_on_the_cached_conversation(model: Model) -> None:
    settings = Settings(budget=512, buffer=64, temperature=0.0, max_tokens=12)
    session = ChatSession(factory=lambda s: InfoKVLlama(model, **s.engine_kwargs()))
    with pytest.raises(ValueError, match="Nothing to regenerate"):
        session.regenerate(settings, "")
    session.submit("Name three colours.", settings, "")
    first = list(session.reply())[-1]
    session.submit("And three animals?", settings, "")
    second = list(session.reply())[-1]
    assert session.regenerate(settings, "") == "And three animals?"
    assert [m["role"] for m in session.history] == ["user", "assistant"]  # the last exchange is dropped
    again = list(session.reply())[-1]
    # greedy, nothing evicted: the same answer, and only the message's last token was read again
    assert again.text == second.text and again.kv["evicted_tokens"] == 0
    assert again.kv["reused_tokens"] > first.kv["reused_tokens"] and again.kv["sequence_tokens"] == \
        second.kv["sequence_tokens"]
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    with pytest.raises(ValueError, match="Budget 10 is too small"):
        session.regenerate(replace(settings, budget=10), "")
    assert len(session.history) == 4 and session.pending is None  # a refused setting changes nothing
    session.close()
