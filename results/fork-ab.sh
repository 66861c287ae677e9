#!/bin/sh
# A question's prompt read once and forked (the default) against read by every policy (--no-fork):
# evaluation tasks --parallel 8 on the same questions, runs alternating, wall time of each.
# Usage: sh results/fork-ab.sh MODEL ("" for the embedded SmolLM2) LIMIT MAX_TOKENS ORDER OUTDIR   (ORDER e.g. "fork read read fork")
set -e
model=$1; limit=$2; max=$3; order=$4; dir=$5
mkdir -p "$dir"
i=0
for how in $order; do
  i=$((i + 1))
  extra=""; [ "$how" = read ] && extra="--no-fork"
  t0=$(date +%s.%N)
  python -m evaluation tasks --task decode-pressure ${model:+--model "$model"} --limit "$limit" --max-tokens "$max" \
    --budget 128 --policies infokv,infokv-rkv,rkv,snapkv,h2o,streaming --parallel 8 --threads 2 \
    --flash-attn off --no-progress --out "$dir/$i-$how.json" $extra > "$dir/$i-$how.out" 2>&1
  t1=$(date +%s.%N)
  echo "$i $how $(echo "$t1 - $t0" | bc) s"
done
