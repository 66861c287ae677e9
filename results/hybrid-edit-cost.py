"""What an edited last turn costs on a memory that cannot roll back (hybrid: attention cache + recurrent state)
against one that can (dense), on the random-weight models of llama.cpp's test-llama-archs (native/arch_models.py).

For a conversation of N tokens (prompt + 16 generated), then a last turn of 64 tokens: the time to the first
token of a continuing turn (the 64 tokens appended), and of an edited one (the last 64 tokens replaced): a
dense memory truncates and reads the 64 new tokens; a hybrid memory cannot truncate (the engine says so) and
reads the whole conversation again, as the API does. Full cache, 2 threads, medians of 3.

    python results/hybrid-edit-cost.py DIR_WITH_ARCH_MODELS
"""
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from infokv_local.engine import Engine
from infokv_local.llamacpp.model import Model

TURN = 64


def first_token_s(eng: Engine, tokens: list[int]) -> float:
    t0 = time.perf_counter()
    next(eng.generate(tokens, max_tokens=1, ignore_eos=True))
    return time.perf_counter() - t0


def main() -> None:
    d = Path(sys.argv[1])
    for name in ("llama-dense", "qwen35-dense", "granitehybrid-dense"):
        with Model(d / f"{name}.gguf") as model:
            rng = np.random.default_rng(0)
            for n in (512, 1024, 2048):
                conv = rng.integers(3, model.info.n_vocab, n).tolist()
                new = rng.integers(3, model.info.n_vocab, TURN).tolist()
                cont, edit, how = [], [], ""
                for _ in range(3):
                    with Engine(model, "full", n_threads=2, max_context=n + 4 * TURN, compact_at=1 << 20,
                                flash_attn=False) as eng:
                        list(eng.generate(conv, max_tokens=16, ignore_eos=True))
                        snap = eng.snapshot()
                        cont.append(first_token_s(eng, new))
                        eng.restore(snap)
                        cut = len(eng.tokens) - TURN
                        t0 = time.perf_counter()
                        if eng.truncate(cut):
                            how = "truncate + read the turn"
                            next(eng.generate(new, max_tokens=1, ignore_eos=True))
                        else:
                            how = "read the whole conversation again"
                            kept = eng.tokens[:cut]
                            eng.reset()
                            next(eng.generate(kept + new, max_tokens=1, ignore_eos=True))
                        edit.append(time.perf_counter() - t0)
                c, e = statistics.median(cont), statistics.median(edit)
                print(f"{name:20s} {model.info.memory:8s} N={n:5d} continuing {c * 1e3:7.1f} ms  edited "
                      f"{e * 1e3:7.1f} ms  ({e / c:5.1f}x: {how})", flush=True)


if __name__ == "__main__":
    main()
