"""Wall time of `python -m evaluation fidelity-decode` with --parallel 1 and --parallel 8, rounds interleaved
(1, 8, 8, 1, ...), on traces made once beforehand; every run writes a fresh log, and the two settings' per-token
KL are compared record by record. Usage:

    python results/fidelity-decode-parallel-ab.py MODEL LIMIT MAX_TOKENS ROUNDS OUT.json [--fork-at P]

MODEL as `--model` takes it (a name of the registry or a path); policies and budgets as below; 2 threads.
With ``--fork-at P`` the two settings are instead the prompt forked (the default, "1" in the output) and read by
every config (``--no-fork``, "8"), both at ``--parallel P``. Runs made before forks existed read every prompt.
"""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

model, limit, max_tokens, rounds, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
fork_at = int(sys.argv[7]) if len(sys.argv) > 7 and sys.argv[6] == "--fork-at" else None
POLICIES = "infokv,infokv-rkv,rkv,snapkv,h2o,streaming,keydiff"
work = Path(tempfile.mkdtemp(prefix="fd-ab-"))
traces = work / "traces.jsonl"
base = [sys.executable, "-m", "evaluation", "fidelity-decode", "--model", model, "--limit", str(limit), "--offset", "1200",
        "--max-tokens", str(max_tokens), "--policies", POLICIES, "--threads", "2", "--traces", str(traces),
        "--no-progress", "--flash-attn", "off"]


def run(parallel: int, tag: str, budgets: tuple[str, str] = ("--ratio", "0.25,0.125")) -> tuple[float, Path]:
    dest = work / f"{tag}.json"
    t0 = time.perf_counter()
    how = ["--parallel", str(parallel)] if fork_at is None else \
        ["--parallel", str(fork_at), *(["--no-fork"] if parallel == 8 else [])]
    subprocess.run([*base, *budgets, *how, "--out", str(dest)], check=True, capture_output=True)
    return time.perf_counter() - t0, dest.with_suffix(".jsonl")


def kl_of(log: Path) -> dict:
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    return {(r["item_id"], r["policy"], r["budget_spec"]): np.asarray(r["kl"]) for r in recs}


run(1, "warm", ("--budget", "100000"))  # makes the traces (full cache, greedy); a budget that holds them replays none
times: dict[int, list[float]] = {1: [], 8: []}
logs: dict[int, Path] = {}
order = [1, 8, 8, 1] * ((rounds + 1) // 2)
for i, p in enumerate(order[:2 * rounds]):
    dt, logs[p] = run(p, f"p{p}-{i}")
    times[p].append(dt)
    print(f"{'forked' if fork_at and p == 1 else 'read' if fork_at else '--parallel'} {p}: {dt:.1f} s", flush=True)
a, b = kl_of(logs[1]), kl_of(logs[8])
diff = max((float(np.max(np.abs(a[k] - b[k]))) if len(a[k]) else 0.0) for k in a)
result = {"arms": "1: forked, 8: read by each" if fork_at else "--parallel 1, --parallel 8", "fork_at": fork_at,
          "model": model, "traces": limit, "max_tokens": max_tokens, "policies": POLICIES, "ratios": "0.25,0.125",
          "threads": 2, "seconds": {str(k): v for k, v in times.items()},
          "median_1": float(np.median(times[1])), "median_8": float(np.median(times[8])),
          # the faster arm's gain: --parallel 8 over 1, or a forked prompt over one read by each
          "speedup": float(np.median(times[8]) / np.median(times[1]) if fork_at else
                           np.median(times[1]) / np.median(times[8])), "records": len(a),
          "same_keys": sorted(a) == sorted(b), "max_abs_kl_difference": diff}
print(json.dumps(result, indent=1))
Path(out).write_text(json.dumps(result, indent=1))
