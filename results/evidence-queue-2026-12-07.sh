#!/bin/sh
# The evidence runs left (BENCHMARKS.md, "What is not measured yet"; notes parts 13 and 18), one after another, each
# resumable: rerun this script after an interruption and every step goes on where its log stopped. From the
# repository root, nothing else running: nohup nice -n 5 sh results/evidence-queue-2026-12-07.sh > queue.log 2>&1 &
# Sizes at the 5-6 Qwen2.5-Coder-1.5B generations a minute measured with --parallel 8 on 2 cores.
set -e
PY=${PY:-.venv/bin/python}
Q="--model qwen2.5-coder-1.5b --threads 2 --no-progress"

# Steps 1 to 3c are done (BENCHMARKS.md); their commands stay here as comments, so a restart does not rewrite
# their summaries.
# 1. The 300-question report run (GSM8K 500-799, budget 128), to its end. It read every prompt itself when it began:
#    --no-fork keeps it so. Ended 09:30 UTC on 7 Dec; steps 1 and 2 are done (BENCHMARKS), step 3 began 10:33.
# $PY -m evaluation tasks --task decode-pressure $Q --offset 500 --limit 300 --budget 128 --parallel 8 --no-fork \
#     --policies full,infokv,infokv-rkv,rkv,snapkv,h2o,streaming \
#     --out results/decode-pressure-qwen2.5-coder-1.5b-b128-q500-799.json

# 2. The rule for the default (notes part 18, written before these runs): accuracy on GSM8K 400-499 (200 generations,
#    about 40 minutes), fidelity on essays 9-16, decode rate.
# $PY -m evaluation tasks --task decode-pressure $Q --offset 400 --limit 100 --budget 128 --parallel 8 \
#     --policies infokv,infokv-rkv --out results/selection-default-qwen2.5-coder-1.5b-b128-q400-499.json
# $PY -m infokv_local bench docs --out docs.jsonl --min-tokens 2000 && sed -n 9,16p docs.jsonl > docs-stride.jsonl
# $PY -m infokv_local bench fidelity --docs docs-stride.jsonl --max-tokens 2048 --ratio 0.25,0.125 --threads 2 \
#     --policies "infokv,infokv-rkv" --json results/default-heldout-smollm2-135m.json
# $PY -m infokv_local bench fidelity --model qwen2.5-coder-0.5b --docs docs-stride.jsonl --max-tokens 2048 \
#     --ratio 0.25,0.125 --threads 2 --policies "infokv,infokv-rkv" --json results/default-heldout-qwen2.5-coder-0.5b.json
# $PY -m infokv_local bench throughput --policies infokv,infokv-rkv --budget 256 --buffer 64 --prompt-tokens 1024 \
#     --max-tokens 512 --rounds 3 --threads 2 --json results/throughput-default-rule-smollm2.json

# 3. The other policies at budget 128 and every policy at 256, on the first 100 report questions, into the report
#    log (the full cache's records are there already): 400 + 1,000 generations, about 4 hours. Each run rewrites
#    the log's .json summary with its own policies: `python -m evaluation summary <log>.jsonl` summarizes them all.
# $PY -m evaluation tasks --task decode-pressure $Q --offset 500 --limit 100 --budget 128 --parallel 8 \
#     --policies full,tova,keydiff,context-shift,random \
#     --out results/decode-pressure-qwen2.5-coder-1.5b-b128-q500-799.json
# $PY -m evaluation tasks --task decode-pressure $Q --offset 500 --limit 100 --budget 256 --parallel 8 \
#     --policies full,infokv,infokv-rkv,rkv,snapkv,h2o,tova,streaming,keydiff,context-shift,random \
#     --out results/decode-pressure-qwen2.5-coder-1.5b-b128-q500-799.json

# 3b. KeyDiff, TOVA and random at budget 128 on the rest of the report questions (600-799), so that every policy
#     within 10 points of the default at 500-599 (keydiff +2, random +6, tova +7; context-shift is 18 below) is
#     compared on all 300: 600 generations, about 1.8 hours. Decided at 13:00 UTC on 7 Dec from the 100-question
#     intervals (lower bounds -6, -3, -2 points), before any of these runs.
# $PY -m evaluation tasks --task decode-pressure $Q --offset 600 --limit 200 --budget 128 --parallel 8 \
#     --policies full,keydiff,tova,random \
#     --out results/decode-pressure-qwen2.5-coder-1.5b-b128-q500-799.json

# 3c (added 7 Dec 18:17, changed 19:25 before it ran): the full cache through the batched kernel path. The harness
#     runs `full` one at a time and records a budget of at least prompt + max_tokens as skipped (nothing to evict),
#     so the 18:17 form (`random` at 1024) would have measured nothing. `random` at budget 471, the largest no
#     question here skips (shortest prompt 72 tokens + 400 - 1), in batches of 8 is the full cache as the evicting
#     policies were computed, except in the last tokens of the longest replies: compression starts above 535 cells
#     (budget + buffer), which 15 of the full cache's 300 replies reached (5 of 500-599), all near the 400-token
#     limit (12 ran into it, 3 ended at 378-396 tokens). Its records say `evicted_tokens`; the floor is read on all
#     and on the replies that evicted nothing.
#     On all 300 report questions (about 52 minutes), so that the budget-128 table can be set beside a full cache
#     on the same kernel path: its wins / losses against `full` are the noise floor of every comparison with the
#     full cache. Into the report log, whose `full` records it resumes. Nothing is chosen on it.
# $PY -m evaluation tasks --task decode-pressure $Q --offset 500 --limit 300 --budget 471 --parallel 8 \
#     --policies full,random \
#     --out results/decode-pressure-qwen2.5-coder-1.5b-b128-q500-799.json

# 4. Decode-time fidelity on 48 fresh traces (GSM8K 800-847), one by one as the 12 in BENCHMARKS were.
$PY -m evaluation fidelity-decode $Q --offset 800 --limit 48 --max-tokens 400 --ratio 0.25,0.125 --parallel 1 \
    --by-distance --policies infokv,infokv-rkv,rkv,snapkv,h2o,tova,streaming,keydiff \
    --out results/fidelity-decode-qwen2.5-coder-1.5b-q800-847.json

# 5. Longer reasoning: six GSM8K questions in one reply (notes part 13), about 4 hours, then its fidelity.
$PY -m evaluation tasks --task multi-step --group 6 $Q --offset 1000 --limit 96 --max-tokens 2400 --budget 232,464 \
    --policies full,infokv,infokv-rkv,rkv,snapkv,h2o,streaming --parallel 8 \
    --out results/multi-step-qwen2.5-coder-1.5b-q1000-1095.json
# 5a (added 7 Dec 19:50, before any of step 5 ran): the full cache through the batched kernels, as step 3c for the
#     report questions, so that step 5's comparisons with the full cache can be read beside one on the same kernel
#     path: `random` at budget 2790, below the 2794 at which the first group would be skipped (shortest prompt 395
#     tokens with the chat template, + 2400 - 1); compression starts above 2854 cells, which only a reply of 2,258
#     tokens or more can reach (longest prompt 597). 16 generations. Nothing is chosen on it.
$PY -m evaluation tasks --task multi-step --group 6 $Q --offset 1000 --limit 96 --max-tokens 2400 --budget 2790 \
    --policies full,random --parallel 8 \
    --out results/multi-step-qwen2.5-coder-1.5b-q1000-1095.json
$PY -m evaluation fidelity-decode $Q --group 6 --offset 1000 --limit 48 --max-tokens 2400 --ratio 0.25,0.125 \
    --by-distance --policies infokv,infokv-rkv,rkv,snapkv,h2o,streaming \
    --out results/fidelity-decode-multi-step-qwen2.5-coder-1.5b.json

# 4b. keep_prompt=1 on questions no run has used (GSM8K 1096-1195), by the rule written at 13:50 UTC on 7 Dec before
#     this run (notes part 20): 400 generations, about 1.2 hours. Flash attention off, as in the selection look.
#     Moved after step 5 on 7 Dec 23:30, before either ran: the multi-step evidence first.
$PY -m evaluation tasks --task decode-pressure $Q --offset 1096 --limit 100 --budget 128 --flash-attn off --parallel 8 \
    --policies "full;infokv-rkv;infokv-rkv:keep_prompt=1;streaming:keep_prompt=1" \
    --out results/keep-prompt-heldout-qwen2.5-coder-1.5b-b128-q1096-1195.json

# 6 (added 8 Dec 00:10). Fidelity on compressed prompts (BENCHMARKS' first table) with every baseline: those runs
#    had H2O, SnapKV and TOVA only, so StreamingLLM, KeyDiff and R-KV were not in its "best baseline", and the default
#    (`infokv-rkv`) was not in it. The same 8 settings (2 models x essays / Python reference x 25% / 12.5%, 8
#    documents each), every policy afresh with today's defaults (stride 4) on one machine: about 2.5 hours.
$PY -m infokv_local bench docs --out docs.jsonl --min-tokens 2000 && head -8 docs.jsonl > docs-report.jsonl
F="--max-tokens 2048 --ratio 0.25,0.125 --threads 2 --no-progress"
FP="--policies infokv-rkv,infokv,h2o,snapkv,tova,streaming,keydiff,rkv"
$PY -m infokv_local bench fidelity --docs docs-report.jsonl $F $FP --json results/prompt-fidelity-essays-smollm2-135m.json
$PY -m infokv_local bench fidelity --docs results/docs-python.jsonl $F $FP \
    --json results/prompt-fidelity-python-docs-smollm2-135m.json
$PY -m infokv_local bench fidelity --model qwen2.5-coder-1.5b --docs docs-report.jsonl $F $FP \
    --json results/prompt-fidelity-essays-qwen2.5-coder-1.5b.json
$PY -m infokv_local bench fidelity --model qwen2.5-coder-1.5b --docs results/docs-python.jsonl $F $FP \
    --json results/prompt-fidelity-python-docs-qwen2.5-coder-1.5b.json
