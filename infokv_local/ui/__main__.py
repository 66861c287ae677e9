"""``python -m infokv_local.ui``: load the model once and serve the chat on a local port."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..cli.options import add_probe_option
from .session import Settings

CACHE_TYPES_OFFERED = ("f16", "q8_0", "q4_0")  # what Ollama and LM Studio offer; the API takes every type


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; settings are checked (a budget too small is an error here, not later)."""
    d = Settings()
    p = argparse.ArgumentParser(
        prog="python -m infokv_local.ui",
        description="A local chat under a fixed KV-cache budget, with a live view of the cache.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m infokv_local.ui\n"
               "  python -m infokv_local.ui --model qwen2.5-coder-0.5b --budget 128 --buffer 32 --port 7861")
    p.add_argument("--model", default=None,
                   help="GGUF path or registry model name (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="port (default %(default)s)")
    p.add_argument("--policy", default=d.policy,
                   help="eviction policy, with parameters as in 'infokv:alpha=0.9' (default %(default)s)")
    p.add_argument("--budget", type=int, default=d.budget, help="KV budget in tokens (default %(default)s)")
    p.add_argument("--buffer", type=int, default=d.buffer,
                   help="tokens the cache may grow past the budget before compressing (default %(default)s)")
    p.add_argument("--n-sink", type=int, default=d.n_sink, help="first tokens never evicted (default %(default)s)")
    p.add_argument("--n-recent", type=int, default=d.n_recent,
                   help="most recent tokens never evicted (default %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="sampling temperature (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help="max new tokens per answer (default %(default)s)")
    p.add_argument("--cache-type", default=d.cache_type, choices=CACHE_TYPES_OFFERED,
                   help="KV cache data type, K and V (default %(default)s; q8_0/q4_0 turn flash attention on)")
    add_probe_option(p)
    p.add_argument("--system", default=None, help="initial system prompt")
    p.add_argument("--open", action="store_true", help="open the chat in the default browser")
    args = p.parse_args(argv)
    args.settings = Settings(policy=args.policy, budget=args.budget, buffer=args.buffer, temperature=args.temperature,
                             max_tokens=args.max_tokens, n_sink=args.n_sink, n_recent=args.n_recent,
                             cache_type=args.cache_type, prompt_probe=args.prompt_probe)
    try:
        args.settings.check()
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    """Load the model, build the app and serve it until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the chat UI needs Gradio, an optional part: pip install 'infokv-local[ui]' "
              "(or `make setup`, which installs everything)", file=sys.stderr)
        return 2
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    ui_log = logging.getLogger("infokv_local.ui")
    ui_log.addHandler(handler)
    ui_log.setLevel(logging.INFO)

    from ..api import InfoKVLlama
    from ..engine import kv_bytes_per_token
    from ..llamacpp.model import Model
    from ..models.registry import resolve_model_path
    from ..policies import POLICIES
    from .app import DEFAULT_SYSTEM_PROMPT, AppConfig, build_app, launch_kwargs

    path = resolve_model_path(args.model)
    model = Model(path)
    policies = tuple(POLICIES) + (() if args.policy in POLICIES else (args.policy,))
    config = AppConfig(model_label=path.name, kv_bytes_per_token=kv_bytes_per_token(model), policies=policies,
                       defaults=args.settings, system_prompt=args.system or DEFAULT_SYSTEM_PROMPT,
                       kv_bytes_by_type={t: kv_bytes_per_token(model, t, t) for t in CACHE_TYPES_OFFERED})

    def factory(settings: Settings) -> InfoKVLlama:
        return InfoKVLlama(model, **settings.engine_kwargs())

    demo = build_app(config, factory)
    try:
        demo.queue().launch(server_name=args.host, server_port=args.port, inbrowser=args.open, ssr_mode=False,
                            show_error=True, footer_links=[], **launch_kwargs())
    finally:
        model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
