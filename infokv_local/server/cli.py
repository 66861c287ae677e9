"""``python -m infokv_local serve``: the command line of the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn

EXAMPLES = """examples:
  python -m infokv_local serve                                   # SmolLM2-135M on http://127.0.0.1:8000/v1
  python -m infokv_local serve --slots 4 --budget 1024 --buffer 128 --api-key secret   # longer conversations
  python -m infokv_local serve --model qwen2.5-coder-0.5b --budget-mib 64 --port 8001
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32}'
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand (its options, help and examples) to ``subparsers``."""
    from ..cli.options import MODEL_HELP, add_cache_options

    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server, every conversation in a fixed KV budget",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /v1/kv, /metrics and /health. "
                    "--slots conversations of at most budget + buffer cells each generate together in one context; "
                    "idle conversations are parked in RAM and restored without prefill; requests beyond the slots "
                    "queue (503 when the queue is full).",
    )
    g = p.add_argument_group("model and KV cache")
    g.add_argument("--model", help=MODEL_HELP)
    g.add_argument("--model-alias", action="append", default=[],
                   help="another name clients may send as 'model' (repeatable; the file name always works)")
    add_cache_options(g, per=" per slot")
    s = p.add_argument_group("server")
    s.add_argument("--slots", type=int, default=1, help="conversations generating at once (default: 1)")
    s.add_argument("--queue", type=int, default=16, help="requests waiting for a slot before 503 (default: 16)")
    s.add_argument("--park-mib", type=float, default=512.0,
                   help="RAM for parked conversations; the least recently parked are dropped beyond it (default: 512)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    s.add_argument("--max-body-kib", type=int, default=4096, help="largest request body (default: 4096 KiB)")
    s.add_argument("--max-prompt-tokens", type=int,
                   help="most prompt tokens a request may have to read (those its slot does not hold already); a "
                        "longer prompt gets a 400 at once (default: what this machine reads in about a minute, "
                        "measured at start; 0: no limit)")
    s.add_argument("--verbose", action="store_true", help="llama.cpp's log and uvicorn's access log")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Load the model, build the slots, print the KV memory and serve until interrupted."""
    import uvicorn

    from ..api import InfoKVLlama
    from ..cli.options import flash_attn_of
    from ..errors import InfoKVError
    from ..llamacpp.cache_types import check_cache_type
    from ..llamacpp.model import Model, set_verbose
    from ..llamacpp.rpc import parse_endpoints
    from ..models.registry import resolve_model_path
    from ..policies import make_policy
    from .app import ServerSettings, create_app
    from .slots import ParkingStore, SlotPool

    try:
        if args.slots < 1 or args.queue < 0 or args.park_mib < 0 or args.max_body_kib < 1 or \
                (args.max_prompt_tokens is not None and args.max_prompt_tokens < 0):
            raise ValueError("--slots and --max-body-kib must be positive, --queue, --park-mib and "
                             "--max-prompt-tokens >= 0")
        if not make_policy(args.policy).evicts:
            raise ValueError(f"policy {args.policy!r} does not evict: the server needs a fixed budget per slot")
        if args.verbose:
            set_verbose(True)
        check_cache_type(args.cache_type_k, "--cache-type-k")
        check_cache_type(args.cache_type_v, "--cache-type-v")
        model = Model(resolve_model_path(args.model), n_gpu_layers=args.n_gpu_layers, rpc=parse_endpoints(args.rpc))
        budget = args.budget if args.budget_mib is None else None
        first = InfoKVLlama(model, policy=args.policy, budget=budget, budget_mib=args.budget_mib,
                            buffer=args.buffer, n_sink=args.n_sink,
                            n_recent=args.n_recent, n_threads=args.threads, flash_attn=flash_attn_of(args),
                            cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v,
                            prompt_probe=args.prompt_probe, max_checkpoints=args.max_checkpoints)
    except (InfoKVError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = Path(model.path)
    engine = first.engine
    budget, per_cell, bounded = engine.budget, engine.kv_bytes_per_cell, engine.ctx.bounded_bytes
    alloc, memory, eviction_note = engine.ctx.n_cells, engine.ctx.memory, engine.eviction_note
    if args.max_prompt_tokens is None:
        speed = prompt_read_speed(first)
        max_prompt: int | None = prompt_limit_of(speed)
        limit_note = (f"prompts of at most {max_prompt} tokens to read per request (about a minute here: "
                      f"{speed:.0f} tokens/s measured; --max-prompt-tokens)")
    else:
        max_prompt = args.max_prompt_tokens or None
        limit_note = (f"prompts of at most {max_prompt} tokens to read per request" if max_prompt
                      else "no limit on prompt tokens")
    try:
        shared, llms = slots_of(first, args.slots)
    except (InfoKVError, ValueError) as e:
        first.close()
        model.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = ServerSettings(
        model_id=path.name, model_path=str(path), policy=args.policy, budget=budget, buffer=args.buffer,
        kv_bytes_per_cell=per_cell, memory=memory, bounded_bytes_per_slot=bounded,
        prompt_probe=args.prompt_probe, api_key=args.api_key,
        max_body_bytes=args.max_body_kib * 1024, max_prompt_tokens=max_prompt,
        model_aliases=(path.stem, *args.model_alias),
        shared_statistics=None if shared is None else shared.statistics,
    )
    if shared is not None:  # what the one context allocates, per slot (a unified cache: its cells over the slots)
        alloc = shared.ctx.n_cells // args.slots
    pool = SlotPool(llms, max_queue=args.queue, store=ParkingStore(int(args.park_mib * 2**20)), shared=shared)
    app = create_app(pool, settings)
    cap = settings.capacity
    mib = 2**20
    if eviction_note:
        print(f"infokv-local serve: {eviction_note}", flush=True)
    together = (f"; the {args.slots} slots are sequences of one context ({shared.layout}), their tokens decoded "
                f"together" if shared is not None else "")
    # a sliding-window or hybrid memory: the part that does not grow is beside the cells the budget counts
    beside = (f" + {args.slots} x {bounded / mib:.1f} MiB of {memory} memory that does not grow = "
              f"{(args.slots * cap * per_cell + args.slots * bounded) / mib:.1f} MiB in all" if bounded else "")
    print(f"infokv-local serve: {path.name}, policy {args.policy}, {args.slots} slot(s) x (budget {budget} + buffer "
          f"{args.buffer}) = {args.slots * cap} KV cells = {args.slots * cap * per_cell / mib:.1f} MiB of KV memory at "
          f"most{beside} ({per_cell} bytes per cell; llama.cpp allocates {alloc} cells per slot = "
          f"{args.slots * alloc * per_cell / mib:.1f} MiB); parking up to {args.park_mib:g} MiB"
          + ("; prompt probe on" if args.prompt_probe else "") + f"{together}; {limit_note}", flush=True)
    print(f"listening on http://{args.host}:{args.port}/v1 (OpenAI-compatible); Ctrl-C stops", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                            access_log=args.verbose, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = _stopping_server(config, app.state.request_stop)
    try:
        server.run()
    finally:
        app.state.request_stop()
        app.state.executor.shutdown(wait=True, cancel_futures=True)  # cancelled: each ends within a chunk
        for llm in llms:
            llm.close()
        if shared is not None:
            shared.close()
        model.close()
    _raise_the_stopping_signal(server)
    return 0


def slots_of(first: Any, n: int) -> tuple[Any, list[Any]]:
    """The server's slots: ``first`` alone when there is one; otherwise ``n`` objects with its settings whose
    sequences share one context (``first`` is closed), so that their generation steps are decoded together.
    The context collects the statistics of every evicting policy a request may ask for
    (:data:`SHARED_POLICIES`), and also those of the server's own policy. Returns the shared context (None for
    one slot) and the slots' objects."""
    from ..api import InfoKVLlama

    if n == 1:
        return None, [first]
    policies = [first.engine.policy, *SHARED_POLICIES]
    shared = first.shared_context(n, policies, first.engine.capacity)
    settings = first.clone_settings()
    first.close()
    llms: list[Any] = []
    try:
        for _ in range(n):
            llms.append(InfoKVLlama(first.model, shared=shared, **settings))
    except BaseException:
        for llm in llms:
            llm.close()
        shared.close()
        raise
    return shared, llms


# what a shared context collects for requests' own policies: the attention of the last queries and layer
# evolution; H2O's attention of every query row turns flash attention off for every slot, so it is collected
# only when the server's own policy is H2O (a request asking for it otherwise gets a 400 that says so)
SHARED_POLICIES = ("infokv", "snapkv", "tova", "streaming", "context-shift", "random")


GRACEFUL_SHUTDOWN_S = 3  # after SIGTERM or Ctrl-C, how long the cancelled requests get to send their answers


def _stopping_server(config: uvicorn.Config, on_exit: Callable[[], None]) -> uvicorn.Server:
    """uvicorn's server, which on SIGTERM or Ctrl-C first cancels every request in flight (``on_exit``), so
    that its graceful shutdown has nothing long to wait for."""
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self.stop_signals: list[int] = []

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            self.stop_signals.append(sig)
            on_exit()
            super().handle_exit(sig, frame)

    return Server(config)


def _raise_the_stopping_signal(server: uvicorn.Server) -> None:
    """Exit as the signal that stopped the server says (130 after Ctrl-C, killed by SIGTERM) where uvicorn's
    own re-raising of it was lost: it raises the signal inside the event loop as the loop ends, and when the
    last task finishes before asyncio's handler cancels it, asyncio returns normally and the process would
    exit 0."""
    captured = getattr(server, "stop_signals", [])
    if signal.SIGINT in captured:
        raise KeyboardInterrupt
    if signal.SIGTERM in captured:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)


def prompt_read_speed(llm: Any) -> float:
    """Prompt tokens per second ``llm`` reads with its policy: the faster of two reads of a filler prompt of
    two prompt chunks (the first also warms up). The slot is left empty."""
    text = "The quick brown fox jumps over the lazy dog while the sun sets behind the hills. " * 64
    tokens = llm.tokenize(text)[: 2 * llm.engine.chunk]
    prompt = llm.detokenize(tokens[1:] if tokens[:1] == [llm.model.bos_token_id] else tokens).decode(errors="ignore")
    best = 0.0
    for _ in range(2):
        llm.reset()
        t0 = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=1, temperature=0)
        best = max(best, out["usage"]["prompt_tokens"] / max(time.perf_counter() - t0, 1e-6))
    llm.reset()
    return best


def prompt_limit_of(tokens_per_s: float, seconds: float = 60.0) -> int:
    """The default ``--max-prompt-tokens``: what ``seconds`` of reading at that speed covers, in whole
    thousands of tokens (at least 2048)."""
    return max(2048, int(tokens_per_s * seconds) // 1024 * 1024)


def main(argv: list[str] | None = None) -> int:
    """``python -m infokv_local.server.cli``: the same as ``python -m infokv_local serve``."""
    ap = argparse.ArgumentParser(prog="python -m infokv_local")
    add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
