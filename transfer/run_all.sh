#!/usr/bin/env bash
# Trains every variant (two queues in parallel, one torch thread each) and logs each run to
# bench/results/transfer/logs/<variant>.log. Extra arguments go to transfer.train, e.g. the
# reduced budget of bench/results/transfer.md:
#   bash transfer/run_all.sh --steps 120 --e2e-steps 30 --max-tokens 64
# Rerunning resumes unfinished runs from their checkpoints.
set -u
cd "$(dirname "$0")/.."
LOGS=bench/results/transfer/logs
mkdir -p "$LOGS"
queue() { for v in "$@"; do python -m transfer.train --variant "$v" "${ARGS[@]}" \
                              >"$LOGS/$v.log" 2>&1; done; }
ARGS=("$@")
queue ${QUEUE_A:-csq csq_no_center rebased} &
queue ${QUEUE_B:-csq_fixed_shift taylor linear} &
wait
