#!/bin/bash
# the parallel-sequence benchmarks of 6 Dec 2026 (BENCHMARKS.md), one after another on a quiet machine;
# run from the repository root; scratch outputs go to /tmp/bench
mkdir -p /tmp/bench
PY=.venv/bin/python
LS=${LLAMA_SERVER:?set LLAMA_SERVER to a llama-server built from the vendored llama.cpp (docs/benchmarks.md)}
Q=$($PY -c "from infokv_local.models.registry import resolve_model_path; print(resolve_model_path('qwen2.5-coder-1.5b'))")
echo "== server throughput, SmolLM2"; date
$PY -m evaluation.server_throughput --slots 4 --threads 2 --llama-server $LS --json results/serve-throughput-smollm2.json
echo "== server throughput, Qwen2.5-Coder-1.5B"; date
$PY -m evaluation.server_throughput --model qwen2.5-coder-1.5b --slots 4 --threads 2 --rounds 2 --llama-server $LS --json results/serve-throughput-qwen2.5-coder-1.5b.json
echo "== batch, Qwen2.5-Coder-1.5B, 32 prompts x 128 tokens: parallel 1, 8, 8, 1"; date
PY=$PY bash results/batch-parallel-ab.sh
echo "== bench tasks, SmolLM2, decode-pressure 16 questions x 4 policies, budget 128: parallel 1, 8, 8, 1"; date
i=0
for p in 1 8 8 1; do
  i=$((i+1)); rm -f /tmp/bench/tasks-p$p-$i.json /tmp/bench/tasks-p$p-$i.jsonl
  s=$(date +%s.%N)
  $PY -m infokv_local bench tasks --task decode-pressure --limit 16 --budget 128 --policies infokv,snapkv,tova,streaming --threads 2 --parallel $p --no-progress --out /tmp/bench/tasks-p$p-$i.json > /tmp/bench/tasks-p$p-$i.txt 2>&1
  e=$(date +%s.%N)
  echo "bench tasks --parallel $p (run $i): $(python3 -c "print(round($e-$s,1))") s"
done
date
