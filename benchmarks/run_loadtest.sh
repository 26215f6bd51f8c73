#!/usr/bin/env bash
# The BENCHMARKS.md load-test runs in one command: starts adapterserve (default model) and the
# transformers + PEFT baseline on the same weights, then replays workloads A (8/32/128 LoRA
# adapters), B (four Punica mixes) and C (six adapter kinds) against
#   ours  = adapterserve with adapters,
#   base  = adapterserve with every request on the base model (--base-only),
#   peft  = the PEFT baseline (one request at a time, set_adapter per request),
# and writes JSON, tables and PNGs under $OUT (default bench-results/loadtest/).
#
#   benchmarks/run_loadtest.sh            # the full set (tens of minutes on a 2-core CPU)
#   QUICK=1 benchmarks/run_loadtest.sh    # a smoke run of the same pipeline (a few minutes)
#
# Knobs (environment): RATE, CV, ALPHA, DURATION, INPUT_LEN, OUTPUT_LEN, SWEEP, B_REQUESTS,
# B_CONCURRENCY, C_ADAPTERS, SLOTS, OUT, PYTHON, OURS_PORT, PEFT_PORT, DEVICE, and MODEL (an HF
# model directory for both servers; default: adapterserve's embedded model, and its converted
# copy for the baseline) or HF_MODEL_DIR (the baseline's model only).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-bench-results/loadtest}
OURS_PORT=${OURS_PORT:-8100}
PEFT_PORT=${PEFT_PORT:-8101}
DEVICE=${DEVICE:-cpu}
if [[ -n "${QUICK:-}" ]]; then
  RATE=${RATE:-1}; DURATION=${DURATION:-8}; INPUT_LEN=${INPUT_LEN:-8,24}
  OUTPUT_LEN=${OUTPUT_LEN:-8,24}; SWEEP=${SWEEP:-2,4}; B_REQUESTS=${B_REQUESTS:-9}
  B_CONCURRENCY=${B_CONCURRENCY:-3}; C_ADAPTERS=${C_ADAPTERS:-6}; OUT=$OUT/quick
fi
RATE=${RATE:-1}                # req/s offered (open loop, workloads A and C)
CV=${CV:-1}                    # arrival CV: 1 = Poisson, as in S-LoRA's main table
ALPHA=${ALPHA:-1}              # adapter popularity: 1 = uniform over the adapters
DURATION=${DURATION:-60}       # seconds of arrivals per run
INPUT_LEN=${INPUT_LEN:-8,64}   # U[8, 64): U[8, 512) scaled down for a CPU
OUTPUT_LEN=${OUTPUT_LEN:-8,64}
SWEEP=${SWEEP:-8,32,128}       # workload A: number of adapters
B_REQUESTS=${B_REQUESTS:-64}   # workload B: N requests (distinct needs N adapters)
B_CONCURRENCY=${B_CONCURRENCY:-8}
C_ADAPTERS=${C_ADAPTERS:-36}   # workload C: six kinds x six each
SLOTS=${SLOTS:-128}            # adapterserve device slots (>= the largest sweep point)

mkdir -p "$OUT"
STORE=$(mktemp -d "${TMPDIR:-/tmp}/loadtest-store.XXXXXX")  # fresh adapter stores per run
HF_MODEL_DIR=${HF_MODEL_DIR:-${MODEL:-}}
if [[ -z "${HF_MODEL_DIR:-}" ]]; then
  # the embedded GGUF as a complete HF checkpoint (converted once under the cache dir; the
  # server's own conversion of a quantized start leaves the projections in the GGUF)
  HF_MODEL_DIR=$(.venv/bin/python -P -c 'from adapterserve.server.config import Settings
from adapterserve.server.model.weights import resolve_model_dir
print(resolve_model_dir(None, Settings().cache_dir, complete=True))') || {
    echo "the default model could not be converted; set HF_MODEL_DIR to an HF model directory" >&2
    exit 2
  }
fi

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$STORE"
}
trap cleanup EXIT

wait_healthy() {  # URL PID LOG
  for _ in $(seq 1 600); do
    if ! kill -0 "$2" 2>/dev/null; then echo "server exited; log: $3" >&2; tail -20 "$3" >&2; exit 1; fi
    if curl -sf "$1/health" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "server at $1 not healthy after 300 s; log: $3" >&2
  exit 1
}

BASE_NAME=SmolLM2-135M-Instruct  # the baseline reports the same base id as adapterserve
if [[ -n "${MODEL:-}" ]]; then BASE_NAME=$(basename "$MODEL"); fi
OURS=http://127.0.0.1:$OURS_PORT
PEFT=http://127.0.0.1:$PEFT_PORT
"$PYTHON" -P -m adapterserve serve ${MODEL:+--model "$MODEL"} --port "$OURS_PORT" --device "$DEVICE" \
  --adapter-slots "$SLOTS" \
  --adapter-store-dir "$STORE/ours" --log-level warning >"$OUT/ours-server.log" 2>&1 &
PIDS+=($!)
wait_healthy "$OURS" "${PIDS[-1]}" "$OUT/ours-server.log"
"$PYTHON" -P -m adapterserve.loadtest.baselines.peft_server --model "$HF_MODEL_DIR" --port "$PEFT_PORT" \
  --device "$DEVICE" --served-model-name "$BASE_NAME" --storage-dir "$STORE/peft" \
  --log-level warning >"$OUT/peft-server.log" 2>&1 &
PIDS+=($!)
wait_healthy "$PEFT" "${PIDS[-1]}" "$OUT/peft-server.log"

COMPARE="ours=$OURS,base=$OURS#base-only,peft=$PEFT"
COMMON=(--compare "$COMPARE" --setup --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN"
        --seed 0 --out-dir "$OUT")
run() { echo "+ loadtest $*" >&2; "$PYTHON" -P -m adapterserve.loadtest run "$@" | tee -a "$OUT/tables.txt"; }

: >"$OUT/tables.txt"
# A: Gamma arrivals at RATE (CV), power-law popularity, LoRA ranks 64/32/16/8 round-robin.
run --workload A --num-adapters "$SWEEP" --rate "$RATE" --cv "$CV" --alpha "$ALPHA" \
  --duration "$DURATION" --kinds lora "${COMMON[@]}" --name workload-A
# B: N requests, shuffled FCFS, closed loop; distinct / uniform / skewed / identical.
run --workload B --num-requests "$B_REQUESTS" --concurrency "$B_CONCURRENCY" --kinds lora \
  "${COMMON[@]}" --name workload-B
# C: like A over LoRA, series, parallel, prefix, prompt and IA3 in equal shares (the PEFT
# baseline refuses the two bottleneck kinds: those requests are reported as failed).
run --workload C --num-adapters "$C_ADAPTERS" --rate "$RATE" --cv "$CV" --alpha "$ALPHA" \
  --duration "$DURATION" "${COMMON[@]}" --name workload-C
echo "results: $OUT/workload-{A,B,C}.json, tables in $OUT/tables.txt, plots $OUT/*.png" >&2
