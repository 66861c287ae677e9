"""What an edited or regenerated last turn costs with checkpoints of the bounded part (docs/memory.md), against
reading the whole conversation again (what the engine did before it kept checkpoints), and what the checkpoints
cost a continuing turn, on the random-weight models of llama.cpp's test-llama-archs (native/arch_models.py).

For a conversation of N tokens (prompt + 16 generated), then a last turn of 64 tokens: the time to the first
token of
- a continuing turn (the 64 tokens appended; it takes the two checkpoints of its prompt),
- an edited one (the last turn replaced: back to the checkpoint where that turn started, 64 tokens read),
- a regenerated one (back to the checkpoint before the turn's last token, that token read again),
- the whole conversation read again from an empty cache (the edited turn without checkpoints).
Also the bytes of one checkpoint and the time to take one. Full cache, FA off, 2 threads, medians of 3.

    python results/checkpoint-edit-cost.py DIR_WITH_ARCH_MODELS
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
    names = sys.argv[2:] or ["llama-dense", "gemma3-dense", "qwen35-dense", "granitehybrid-dense"]
    for name in names:
        with Model(d / f"{name}.gguf") as model:
            rng = np.random.default_rng(0)
            for n in (512, 1024, 2048):
                conv = rng.integers(3, model.info.n_vocab, n).tolist()
                turn = rng.integers(3, model.info.n_vocab, TURN).tolist()
                edit = rng.integers(3, model.info.n_vocab, TURN).tolist()
                times: dict[str, list[float]] = {"continuing": [], "edited": [], "regenerated": [], "read again": []}
                save_s, nbytes = [], 0
                for _ in range(3):
                    with Engine(model, "full", n_threads=2, max_context=n + 4 * TURN, compact_at=1 << 20,
                                flash_attn=False) as eng:
                        list(eng.generate(conv, max_tokens=16, ignore_eos=True))
                        start = len(eng.tokens)
                        times["continuing"].append(first_token_s(eng, turn))
                        if eng.ctx.bounded:
                            t0 = time.perf_counter()
                            nbytes = len(eng.ctx.save_bounded())
                            save_s.append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        assert eng.truncate(start + TURN - 1)
                        next(eng.generate(turn[-1:], max_tokens=1, ignore_eos=True))
                        times["regenerated"].append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        assert eng.truncate(start)
                        next(eng.generate(edit, max_tokens=1, ignore_eos=True))
                        times["edited"].append(time.perf_counter() - t0)
                        kept = eng.tokens[:start]
                        t0 = time.perf_counter()
                        eng.reset()
                        next(eng.generate(kept + edit, max_tokens=1, ignore_eos=True))
                        times["read again"].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) for k, v in times.items()}
                c = med["continuing"]
                ck = (f"checkpoint {nbytes / 2**20:6.2f} MiB, taken in {statistics.median(save_s) * 1e3:5.2f} ms"
                      if save_s else "no checkpoints (dense)")
                print(f"{name:20s} {model.info.memory:14s} N={n:5d} continuing {c * 1e3:7.1f} ms | "
                      + " | ".join(f"{k} {v * 1e3:7.1f} ms ({v / c:4.1f}x)" for k, v in med.items() if k != "continuing")
                      + f" | {ck}", flush=True)


if __name__ == "__main__":
    main()
