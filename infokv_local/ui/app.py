"""The Gradio layout and its events: the chat on the left, the live KV-cache view on the right.

Each browser tab has its own :class:`~.session.ChatSession` in a ``gr.State`` (its own InfoKVLlama on
the one shared model). The chat event runs with ``concurrency_limit=1`` under one concurrency id, so
tabs take turns on the model; a closed tab's session is closed at once by ``demo.unload``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gradio as gr

from ..cli.options import PROBE_POLICIES
from ..errors import InfoKVError
from ..settings import DEFAULTS
from .cache_map import render_cache_map
from .chart import COLORS, cache_frame
from .panel import MIB, render_panel
from .session import ChatLLM, ChatSession, ReplyUpdate, SessionRegistry, Settings, monotonic_throttle

log = logging.getLogger("infokv_local.ui")
STATIC_DIR = Path(__file__).with_name("static")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
#: Seconds between two chat-text updates, and between two updates of the cache panel, chart and map.
TEXT_EVERY = 0.05
VIEW_EVERY = 0.4


@dataclass(frozen=True)
class AppConfig:
    """What the app shows and starts with."""

    model_label: str
    kv_bytes_per_token: int
    policies: tuple[str, ...]
    defaults: Settings = Settings()
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_budget: int = 8192
    kv_bytes_by_type: dict[str, int] = field(default_factory=dict)  # per KV cache type offered (f16 if empty)

    def bytes_per_token(self, cache_type: str | None) -> int:
        return self.kv_bytes_by_type.get(cache_type or "f16", self.kv_bytes_per_token)

    @property
    def cache_types(self) -> list[str]:
        return list(self.kv_bytes_by_type) or ["f16"]


def budget_note(budget: float | None, buffer: float | None, bytes_per_token: int, min_budget: int,
                policy: str = DEFAULTS.policy, cache_type: str = "f16") -> str:
    """Markdown under the budget control: the MiB the budget means for the loaded model, or what is wrong."""
    of = "" if cache_type == "f16" else f" ({cache_type})"
    if policy == "full":
        return f"The **full** cache evicts nothing: {bytes_per_token / 1024:.1f} KiB per token{of}, no budget."
    if budget is None or buffer is None:
        return "Set a budget and a buffer."
    budget, buffer = int(budget), int(buffer)
    if budget < min_budget:
        return f"⚠️ **Budget too small**: at least {min_budget} tokens (sinks + recent window + 1)."
    if cache_type != "f16" and policy.split(":")[0] == "h2o":
        return f"⚠️ **h2o needs flash attention off**, a {cache_type} cache needs it on: choose f16 or another policy."
    mib = budget * bytes_per_token / MIB
    peak = (budget + buffer) * bytes_per_token / MIB
    return (
        f"**{budget} tokens = {mib:.2f} MiB** of KV cache{of} for this model; "
        f"it grows to {budget + buffer} tokens ({peak:.2f} MiB) before each compression."
    )


def _views(session: ChatSession, state: str, kv: dict[str, Any] | None = None) -> tuple[str, Any, str]:
    """Panel HTML, chart data and cache-map HTML for the session now (``kv``: the stream's latest block)."""
    llm = session.llm
    s = session.applied or session.settings
    budget, buffer = (None, None) if s.policy == "full" else (s.budget, s.buffer)
    if llm is None:
        return render_panel(None, state), cache_frame([], budget, buffer), render_cache_map(None)
    return (
        render_panel(kv if kv is not None else llm.kv_stats(), state),
        cache_frame(llm.cell_history(), budget, buffer),
        render_cache_map(llm.cache_map()),
    )


def build_app(config: AppConfig, factory: Callable[[Settings], ChatLLM]) -> gr.Blocks:
    """The Blocks app. ``factory(settings)`` builds one tab's InfoKVLlama on the shared model."""
    registry = SessionRegistry()
    d = config.defaults

    def new_session(request: gr.Request | None) -> ChatSession:
        session = ChatSession(factory=factory, settings=d, system_prompt=config.system_prompt)
        if request is not None and request.session_hash:
            registry.add(request.session_hash, session)
            log.info("session %s opened (%d open)", request.session_hash[:8], len(registry))
        return session

    with gr.Blocks(title="infokv-local chat", fill_width=True) as demo:
        session_state = gr.State(None, delete_callback=lambda s: s.close() if s is not None else None)
        gr.HTML(
            f'<div class="app-head"><b>infokv-local</b> chat · <span class="model">{_esc(config.model_label)}</span>'
            f' · {config.kv_bytes_per_token / 1024:.1f} KiB of KV cache per token</div>',
            elem_id="app-head",
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=420):
                chatbot = gr.Chatbot(elem_id="chat", height=460, label="Chat", buttons=["copy"],
                                     feedback_options=None, placeholder="Ask something; watch the cache on the right.")
                with gr.Row():
                    msg = gr.Textbox(show_label=False, placeholder="Message (Enter to send)", scale=6,
                                     elem_id="msg", autofocus=True, lines=1, max_lines=6)
                    send = gr.Button("Send", variant="primary", scale=1, min_width=70, elem_id="send")
                    stop = gr.Button("Stop", variant="stop", scale=1, min_width=70, elem_id="stop")
                    again = gr.Button("Regenerate", scale=1, min_width=100, elem_id="regenerate")
                    new = gr.Button("New chat", scale=1, min_width=90, elem_id="new-chat")
                system = gr.Textbox(label="System prompt", value=config.system_prompt, lines=2, elem_id="system")
                with gr.Accordion("Cache map: the conversation's tokens, coloured by what the cache keeps", open=True):
                    cmap = gr.HTML(render_cache_map(None), elem_id="cache-map", max_height=380, autoscroll=True)
            with gr.Column(scale=2, min_width=340):
                panel = gr.HTML(render_panel(None), elem_id="kv-panel")
                plot = gr.LinePlot(
                    cache_frame([], d.budget, d.buffer), x="token", y="cells", color="series",
                    color_map=COLORS, title="KV cells over the conversation", x_title="token in conversation",
                    y_title="cells", height=240, elem_id="kv-plot", tooltip="all",
                )
                with gr.Accordion("Cache settings (apply to the next message)", open=True):
                    policy = gr.Dropdown(list(config.policies), value=d.policy, label="Policy", elem_id="policy",
                                         allow_custom_value=True,
                                         info="a name, or a name with parameters: infokv:alpha=0.9")
                    with gr.Row():
                        budget = gr.Number(d.budget, label="Budget (tokens)", precision=0, minimum=1,
                                           maximum=config.max_budget, elem_id="budget")
                        buffer = gr.Number(d.buffer, label="Buffer (tokens)", precision=0, minimum=1,
                                           maximum=config.max_budget, elem_id="buffer")
                    cache_type = gr.Dropdown(
                        config.cache_types, value=d.cache_type, label="KV cache type", elem_id="cache-type",
                        info="q8_0 / q4_0 quantize K and V (flash attention on; not with h2o)")
                    probe = gr.Checkbox(
                        d.prompt_probe, label="Read a long message's end first (prompt probe)", elem_id="prompt-probe",
                        info="a message longer than the cache is compressed in chunks; this reads its last tokens "
                             "(the question) before each compression so that what they ask for is kept "
                             f"({PROBE_POLICIES}; prefill is slower)")
                    note = gr.Markdown(
                        budget_note(d.budget, d.buffer, config.bytes_per_token(d.cache_type), d.min_budget,
                                    d.policy), elem_id="budget-note")
                    with gr.Row():
                        temperature = gr.Slider(0.0, 2.0, value=d.temperature, step=0.05, label="Temperature",
                                                elem_id="temperature")
                        max_tokens = gr.Number(d.max_tokens, label="Max new tokens", precision=0, minimum=1,
                                               maximum=config.max_budget * 4, elem_id="max-tokens")

        def on_load(request: gr.Request) -> ChatSession:
            return new_session(request)

        def settings_of(pol: str, bud: float | None, buf: float | None, ctype: str, probe_on: bool, temp: float,
                        max_new: float | None) -> Any:
            """The controls' values as the session's settings (an empty number is -1: refused by its check)."""
            return replace(d, policy=pol, budget=int(bud if bud is not None else -1),
                           buffer=int(buf if buf is not None else -1), cache_type=ctype or "f16",
                           prompt_probe=bool(probe_on), temperature=float(temp),
                           max_tokens=int(max_new if max_new is not None else -1))

        def prepare(message: str, system_prompt: str, pol: str, bud: float | None, buf: float | None, ctype: str,
                    probe_on: bool, temp: float, max_new: float | None, session: ChatSession | None,
                    request: gr.Request) -> Any:
            session = session or new_session(request)
            if not (message or "").strip():
                raise gr.Error("Type a message first.", duration=4)
            if session.busy or session.pending is not None:
                raise gr.Error("Still answering: press Stop (or New chat) first.", duration=4)
            try:
                settings = settings_of(pol, bud, buf, ctype, probe_on, temp, max_new)
                session.submit(message, settings, system_prompt or "")
            except ValueError as e:
                raise gr.Error(str(e), duration=8) from None
            shown = session.history + [{"role": "user", "content": message}]
            return "", shown, session

        def prepare_again(system_prompt: str, pol: str, bud: float | None, buf: float | None, ctype: str,
                          probe_on: bool, temp: float, max_new: float | None, session: ChatSession | None,
                          request: gr.Request) -> Any:
            session = session or new_session(request)
            if session.busy or session.pending is not None:
                raise gr.Error("Still answering: press Stop (or New chat) first.", duration=4)
            try:
                settings = settings_of(pol, bud, buf, ctype, probe_on, temp, max_new)
                message = session.regenerate(settings, system_prompt or "")
            except ValueError as e:
                raise gr.Error(str(e), duration=8) from None
            return session.history + [{"role": "user", "content": message}], session

        def respond(session: ChatSession) -> Iterator[tuple[Any, ...]]:
            text_due, view_due = monotonic_throttle(TEXT_EVERY), monotonic_throttle(VIEW_EVERY)
            message = session.pending[0] if session.pending else ""
            n_before = len(session.history)
            try:
                for up in session.reply():
                    chat = _shown(session, up)
                    if view_due(up.done):
                        state = "generating" if not up.done else f"done ({up.finish_reason})"
                        yield (gr.skip(), chat, *_views(session, state, up.kv))
                    elif text_due(False):
                        yield gr.skip(), chat, gr.skip(), gr.skip(), gr.skip()
            except (ValueError, RuntimeError, InfoKVError) as e:
                # e.g. the API refused the settings: say what is wrong, keep the conversation and the message
                log.warning("reply failed: %s", e)
                gr.Warning(str(e))
                unsent = message if len(session.history) == n_before else gr.skip()
                yield (unsent, session.history, *_views(session, "error"))

        def on_stop(session: ChatSession | None) -> None:
            if session is not None:
                session.stop()

        def on_new(session: ChatSession | None, request: gr.Request) -> Any:
            session = session or new_session(request)
            if not session.new_chat():
                gr.Warning("The answer did not stop in time; try again.")
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), session
            return [], *_views(session, "new chat"), session

        def on_settings(pol: str, bud: float | None, buf: float | None, ctype: str | None) -> str:
            return budget_note(bud, buf, config.bytes_per_token(ctype), d.min_budget, pol, ctype or "f16")

        def on_unload(request: gr.Request) -> None:
            if request is not None and request.session_hash and registry.close(request.session_hash):
                log.info("session %s closed (%d open)", request.session_hash[:8], len(registry))

        demo.load(on_load, outputs=session_state, api_visibility="private", concurrency_limit=None)
        inputs = [msg, system, policy, budget, buffer, cache_type, probe, temperature, max_tokens, session_state]
        views = [chatbot, panel, plot, cmap]
        for trigger in (msg.submit, send.click):
            trigger(prepare, inputs, [msg, chatbot, session_state], api_visibility="private",
                    concurrency_limit=None, show_progress="hidden").success(
                lambda: gr.update(interactive=False), None, send, api_visibility="private", concurrency_limit=None,
                show_progress="hidden").then(
                respond, session_state, [msg, *views], api_visibility="private", concurrency_limit=1,
                concurrency_id="generate", show_progress="minimal", show_progress_on=[panel]).then(
                lambda: gr.update(interactive=True), None, send, api_visibility="private", concurrency_limit=None,
                show_progress="hidden")
        again.click(prepare_again, inputs[1:], [chatbot, session_state], api_visibility="private",
                    concurrency_limit=None, show_progress="hidden").success(
            lambda: (gr.update(interactive=False), gr.update(interactive=False)), None, [send, again],
            api_visibility="private", concurrency_limit=None, show_progress="hidden").then(
            respond, session_state, [msg, *views], api_visibility="private", concurrency_limit=1,
            concurrency_id="generate", show_progress="minimal", show_progress_on=[panel]).then(
            lambda: (gr.update(interactive=True), gr.update(interactive=True)), None, [send, again],
            api_visibility="private", concurrency_limit=None, show_progress="hidden")
        stop.click(on_stop, session_state, None, api_visibility="private", concurrency_limit=None,
                   show_progress="hidden")
        new.click(on_new, session_state, [*views, session_state], api_visibility="private",
                  concurrency_limit=None, show_progress="hidden")
        for ctl in (policy, budget, buffer, cache_type):
            ctl.change(on_settings, [policy, budget, buffer, cache_type], note, api_visibility="private",
                       concurrency_limit=None, show_progress="hidden")
        demo.unload(on_unload)
        demo.infokv_registry = registry  # for tests and the launcher
    return demo


def _shown(session: ChatSession, up: ReplyUpdate) -> list[dict[str, str]]:
    """The messages to display: the history, plus the answer while it streams."""
    if up.done:
        return list(session.history)
    return [*session.history, {"role": "assistant", "content": up.text or "…"}]


def _esc(text: str) -> str:
    import html

    return html.escape(text)


def theme() -> gr.themes.Base:
    """A quiet theme with local fonts only (no font download)."""
    return gr.themes.Soft(primary_hue="blue", neutral_hue="slate", font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])


def launch_kwargs() -> dict[str, Any]:
    """Keyword arguments of ``demo.launch`` for the look: theme and the CSS under ``static/``."""
    return {"theme": theme(), "css_paths": [STATIC_DIR / "ui.css"]}
