"""The eval-callback route: copies of named graph tensors as llama.cpp computes them.

This is the unpatched way to observe ``kq_soft_max-<il>`` or ``l_out-<il>`` (every observed tensor
splits the graph and synchronises). infokv-local uses it only as the reference the patch's
in-graph statistics are checked against, and in diagnostics.
"""

from __future__ import annotations

import ctypes

import numpy as np
from llama_cpp import llama_cpp as llama

from .kernels import ffi, lib


class TensorTap:
    """Collects F32 tensors whose names start with one of ``prefixes`` (name -> list of arrays).

    Pass :attr:`callback` as a context's ``cb_eval``; keep the tap alive as long as the context.
    Arrays use numpy order, i.e. ggml's ``ne`` reversed (``[ne3, ne2, ne1, ne0]``).
    """

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self.prefixes = prefixes
        self.tensors: dict[str, list[np.ndarray]] = {}
        self.callback = llama.ggml_backend_sched_eval_callback(self._on_tensor)
        self._name = ffi.new("char[]", 128)
        self._ne = ffi.new("int64_t[4]")

    def _on_tensor(self, tensor: int, ask: bool, _user: ctypes.c_void_p) -> bool:
        t = ffi.cast("struct ggml_tensor *", tensor)
        ok = lib.infokv_tensor_desc(t, self._name, 128, self._ne)
        name = ffi.string(self._name).decode()
        wanted = name.startswith(self.prefixes)
        if ask:
            return wanted
        if wanted and ok:
            shape = tuple(int(self._ne[i]) for i in range(4))[::-1]
            out = np.empty(shape, dtype=np.float32)
            lib.infokv_tensor_f32(t, ffi.from_buffer("float[]", out))
            self.tensors.setdefault(name, []).append(out)
        return True

    def clear(self) -> None:
        self.tensors.clear()
