#!/usr/bin/env bash
# Trains every variant (two queues in parallel, one torch thread each), writes the parameters to
# $OUT_DIR/<variant>.json (default bench/out/transfer/params; the shipped ones are
# csq_ext/hf/pretrained/all-MiniLM-L6-v2) and logs each run to bench/out/transfer/logs.
# Extra arguments go to transfer.train, e.g. the reduced budget of bench/results/transfer.md:
#   bash transfer/run_all.sh --steps 120 --e2e-steps 30 --max-tokens 64
# Rerunning resumes unfinished runs from their checkpoints.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-bench/out/transfer/params}
LOGS=bench/out/transfer/logs
mkdir -p "$LOGS"
queue() { for v in "$@"; do python -m transfer.train --variant "$v" --out "$OUT_DIR/$v.json" \
                              "${ARGS[@]}" >"$LOGS/$v.log" 2>&1; done; }
ARGS=("$@")
queue ${QUEUE_A:-csq csq_no_center rebased} &
queue ${QUEUE_B:-csq_fixed_shift taylor linear} &
wait
