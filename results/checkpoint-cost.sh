#!/bin/sh
# Interleaved rounds of results/checkpoint-cost-gemma.py: the commit before checkpoints (a worktree at $BEFORE,
# with the built infokv_local/_kernels*.so copied in) and this one. Run alone (nothing else on the machine).
#   BEFORE=/tmp/before GEMMA=gemma-3-270m-q4_k_m.gguf sh results/checkpoint-cost.sh
for round in 1 2 3; do
  PYTHONPATH=$BEFORE .venv/bin/python results/checkpoint-cost-gemma.py "$GEMMA" before 2>/dev/null
  PYTHONPATH=$PWD .venv/bin/python results/checkpoint-cost-gemma.py "$GEMMA" after 2>/dev/null
done
