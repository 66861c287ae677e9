"""What checkpoints cost and save on a real sliding-window model (Gemma 3 270M, window 512): run with the package
of the commit to measure on PYTHONPATH, e.g. before and after checkpoints, interleaved (results/checkpoint-cost.sh).

- a continuing turn: a conversation of N essay tokens (prompt + 16 generated), then a 64-token turn: time to
  its first token (with checkpoints it takes two of the bounded part and reads the turn's last token alone);
- what one checkpoint takes (bytes, ms to save), after the continuing turn;
- a regenerated long answer: a 600-token prompt, a 600-token answer (past the sliding-window cache's slack),
  then the same prompt again: time to the first token of the new answer (without a checkpoint the engine
  cannot drop the answer and reads the prompt again).
Budget 1,024 + 128 (nothing evicted), FA off, 2 threads, medians of 9 (regenerated: of 3).

    PYTHONPATH=DIR python results/checkpoint-cost-gemma.py GEMMA_GGUF LABEL
"""
import statistics
import sys
import time

sys.path.append(".")  # tests.conftest (after PYTHONPATH: the package measured comes from there)

import infokv_local  # noqa: E402
from infokv_local.engine import Engine  # noqa: E402
from infokv_local.llamacpp.model import Model  # noqa: E402
from tests.conftest import ESSAY  # noqa: E402

TURN = 64
KW = dict(budget=1024, buffer=128, n_threads=2, flash_attn=False)


def first_token_s(eng: Engine, tokens: list[int]) -> float:
    t0 = time.perf_counter()
    next(eng.generate(tokens, max_tokens=1, ignore_eos=True))
    return time.perf_counter() - t0


def main() -> None:
    path, label = sys.argv[1], sys.argv[2]
    with Model(path) as model:
        text = model.tokenize(ESSAY * 40)
        for n in (1024, 2048):
            conv, turn = text[:n], text[n:n + TURN]
            runs, save = [], ""
            for _ in range(9):
                with Engine(model, "infokv", **KW) as eng:
                    list(eng.generate(conv, max_tokens=16, ignore_eos=True))
                    runs.append(first_token_s(eng, turn))
                    if hasattr(eng.ctx, "save_bounded"):
                        t0 = time.perf_counter()
                        nbytes = len(eng.ctx.save_bounded())
                        save = f"; one checkpoint {nbytes / 2**20:.2f} MiB, saved in {(time.perf_counter() - t0) * 1e3:.1f} ms"
            print(f"{label:8s} {infokv_local.__file__.split('/infokv_local')[0]:12s} continuing turn, N={n}: "
                  f"{statistics.median(runs) * 1e3:7.1f} ms{save}", flush=True)
        prompt = text[:600]
        runs, how = [], ""
        for _ in range(3):
            with Engine(model, "infokv", **KW) as eng:
                list(eng.generate(prompt, max_tokens=600, ignore_eos=True))
                direct = eng.ctx.can_roll_back_to(len(prompt) - 1)
                t0 = time.perf_counter()
                if eng.truncate(len(prompt) - 1):
                    how = "the cache dropped the answer" if direct else "back to a checkpoint"
                    next(eng.generate(prompt[-1:], max_tokens=1, ignore_eos=True))
                else:
                    how = "prompt read again"
                    eng.reset()
                    next(eng.generate(prompt, max_tokens=1, ignore_eos=True))
                runs.append(time.perf_counter() - t0)
        print(f"{label:8s} regenerated 600-token answer: {statistics.median(runs) * 1e3:7.1f} ms ({how})", flush=True)


if __name__ == "__main__":
    main()
