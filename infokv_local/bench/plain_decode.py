"""llama.cpp's plain decode loop on one sequence, as any llama.cpp program writes it: the baseline the speed
benchmarks compare against (run on the stock library, or on the patched one with the statistics off)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class PlainDecoder:
    """Fills a ``llama_batch`` with consecutive positions of sequence 0 and decodes it; ``all_outputs``
    asks logits for every row, else for the last one only."""

    def __init__(self, ctx_ptr: Any, n_batch: int) -> None:
        from llama_cpp import llama_cpp as llama  # imported late: the worker chose the library by then

        self._llama, self._ctx, self.n_batch = llama, ctx_ptr, n_batch
        self._batch = llama.llama_batch_init(n_batch, 0, 1)

    def __call__(self, tokens: Sequence[int], start: int, all_outputs: bool = False) -> None:
        if not 0 < len(tokens) <= self.n_batch:
            raise ValueError(f"a batch holds 1..{self.n_batch} tokens (got {len(tokens)})")
        b = self._batch
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = all_outputs or i == len(tokens) - 1
        b.n_tokens = len(tokens)
        rc = self._llama.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        self._llama.llama_synchronize(self._ctx)

    def close(self) -> None:
        if self._batch is not None:
            self._llama.llama_batch_free(self._batch)
            self._batch = None
