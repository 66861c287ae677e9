#!/bin/bash
# batch --parallel 1 against 8 on Qwen2.5-Coder-1.5B, 32 prompts x 128 tokens (BENCHMARKS.md), order 1, 8, 8, 1;
# from the repository root; the last output of each setting stays in /tmp/bench
mkdir -p /tmp/bench
PY=${PY:-.venv/bin/python}
for p in 1 8 8 1; do
  rm -f /tmp/bench/batch-p$p.jsonl
  s=$(date +%s.%N)
  $PY -m infokv_local batch --model qwen2.5-coder-1.5b --input results/batch-prompts32.jsonl --output /tmp/bench/batch-p$p.jsonl --threads 2 --ignore-eos --parallel $p 2>/dev/null
  e=$(date +%s.%N)
  echo "batch --parallel $p: $(python3 -c "print(round($e-$s,1))") s"
done
