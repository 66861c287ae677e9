"""The llama.cpp layer: the patched library, models, contexts, sampling and the per-step kernels.

Importing this package loads nothing; :func:`require_installed` is the first thing the API and the engine
do, so that an environment without llama-cpp-python gets the command that builds it, not an ImportError.
"""

from __future__ import annotations

import importlib.util

from ..errors import UnpatchedLibraryError

BUILD_COMMAND = "python -m infokv_local install   (in a checkout: make setup)"


def require_installed() -> None:
    """Raise :class:`UnpatchedLibraryError` naming the build command when llama-cpp-python is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise UnpatchedLibraryError(
            "llama-cpp-python is not installed in this environment. infokv-local needs its own patched build "
            f"(cell removal by index, attention and layer statistics); build and install it with:\n    {BUILD_COMMAND}"
        )
