#!/bin/bash
# the batched evidence runs measured late on 6 Dec 2026 (notes part 16), one after another with nothing else
# running; from the repository root; scratch outputs go to /tmp/bench-late
mkdir -p /tmp/bench-late
PY=.venv/bin/python
SMOL=$($PY -c "from infokv_local.models.embedded import default_model_path; print(default_model_path())")
echo "== evaluation tasks, SmolLM2, decode-pressure 16 questions x 4 policies, budget 128: parallel 1, 8, 8, 1"; date
i=0
for p in 1 8 8 1; do
  i=$((i+1)); rm -f /tmp/bench-late/tasks-p$p-$i.json /tmp/bench-late/tasks-p$p-$i.jsonl
  s=$(date +%s.%N)
  $PY -m evaluation tasks --task decode-pressure --limit 16 --budget 128 --policies infokv,snapkv,tova,streaming --threads 2 --parallel $p --no-progress --out /tmp/bench-late/tasks-p$p-$i.json > /tmp/bench-late/tasks-p$p-$i.txt 2>&1
  e=$(date +%s.%N)
  echo "tasks --parallel $p (run $i): $(python3 -c "print(round($e-$s,1))") s"
done
$PY - <<'PY'
import json
texts = {}
for name in ("p1-1", "p8-2", "p8-3", "p1-4"):
    texts[name] = {(r["item_id"], r["policy"]): r.get("text") for r in map(json.loads, open(f"/tmp/bench-late/tasks-{name}.jsonl"))}
ref = texts["p1-1"]
for name, t in texts.items():
    print(name, "replies equal to p1-1's:", sum(t[k] == ref[k] for k in ref), "of", len(ref))
PY
echo "== fidelity-decode, SmolLM2, 4 traces x 200 tokens, 7 policies x 2 ratios: parallel 1, 8, 8, 1"; date
$PY results/fidelity-decode-parallel-ab.py "$SMOL" 4 200 2 results/fidelity-decode-parallel-smollm2.json
echo "== fidelity-decode, Qwen2.5-Coder-1.5B, 2 traces x 200 tokens: parallel 1, 8"; date
$PY results/fidelity-decode-parallel-ab.py qwen2.5-coder-1.5b 2 200 1 results/fidelity-decode-parallel-qwen2.5-coder-1.5b.json
date
