"""The desktop chat, ``python -m infokv_local.ui``: a Gradio chat with a live view of the KV cache.

The cache panel shows the cells in use against the budget, the KV memory, the evictions and the
speed while tokens stream; a chart shows the saw-tooth of grow-and-compress over the conversation;
the cache map colours every token of the conversation by whether it is still cached and by its
policy score.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the chat (see ``python -m infokv_local.ui --help``)."""
    from .__main__ import main as _main

    return _main(argv)
