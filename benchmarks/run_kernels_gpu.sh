#!/usr/bin/env bash
# The GPU benchmark, staged for a lent GPU's short budget (15 minutes of device time, 10 per
# command): stages run in the order below, most telling first, each bounded by STAGE_TIMEOUT_S
# (default 240 s) so that one slow stage cannot eat the rest. Every stage checks its numbers
# before it times anything (Triton vs the reference per op; the e2e step's logits through the
# Triton ops vs the reference ops; each quantized layer vs its own dequantized weights) and
# stops on a miss. Output is appended to $OUT/gpu_stages.log as it comes and each stage writes
# its JSON when it ends, so a run cut off anywhere still leaves the figures of what finished.
#
#   bash benchmarks/run_kernels_gpu.sh              # every stage, in order, QUICK tables
#   STAGE=e2e bash benchmarks/run_kernels_gpu.sh    # one stage (names below)
#   QUICK=0 bash benchmarks/run_kernels_gpu.sh      # the full kernel tables (lora: 240 cases)
#
# Stages, in order:
#   e2e           Llama-2-7B-shaped decode, eager: base vs 64 rank-16 LoRA vs 64 adapters of six
#                 kinds (the Triton attention and adapter kernels in the model, issue 28 item 2)
#   quant1        the same at batch 1, bf16 vs int8 vs int4 weight-only; before int8, the int8
#                 kernel vs dequantized-bf16 vs bf16 table by rows (where torch's naive CUDA int8
#                 kernel loses, issue 28 item 4)
#   others        bottleneck, IA3, paged attention kernels vs the reference
#   lora          the LoRA shrink/expand kernels vs the reference
#   quant32       the quantized decode at batch 32
#   compiled      the e2e runs through torch.compile + CUDA graphs per batch bucket
#
# Interpreter: $PYTHON, else .venv/bin/python when its torch sees a GPU, else python3 (on the
# lent device machines, python3 holds CUDA torch and triton). Output goes to $OUT (the device
# tool's folder) or bench-results/.
set -uo pipefail
script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$script")/.."
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    PYTHON=.venv/bin/python
  fi
fi
dest=${OUT:-bench-results}
export PYTHON OUT=$dest
mkdir -p "$dest"
log="$dest/gpu_stages.log"
export PYTHONUNBUFFERED=1
STAGES=(e2e quant1 others lora quant32 compiled)
quick=()
[[ "${QUICK:-1}" != 0 ]] && quick=(--quick)
limit=${STAGE_TIMEOUT_S:-240}
stage=${STAGE:-${ONLY:-all}}
if [[ "$stage" != all && ! " ${STAGES[*]} " =~ " $stage " ]]; then
  echo "STAGE must be one of: ${STAGES[*]} (or unset for all, in that order)" >&2
  exit 2
fi

bench() { "$PYTHON" benchmarks/bench_kernels.py "$@"; }
run_stage() {
  case "$1" in
    e2e) bench --ops e2e --e2e-runs base lora64 mixed --json "$dest/kernels_e2e.json" ;;
    quant1) bench --ops e2e --e2e-runs base lora64 --e2e-concurrency 1 \
              --e2e-quantization none int8 int4 --json "$dest/quant_e2e_c1.json" ;;
    others) bench --ops bottleneck ia3 attention --dtype bfloat16 "${quick[@]}" \
              --json "$dest/kernels_others.json" ;;
    lora) bench --ops lora --dtype bfloat16 "${quick[@]}" --json "$dest/kernels_lora.json" ;;
    quant32) bench --ops e2e --e2e-runs base lora64 --e2e-concurrency 32 \
               --e2e-quantization none int8 int4 --json "$dest/quant_e2e_c32.json" ;;
    compiled) bench --ops e2e --e2e-runs base lora64 mixed --e2e-compile \
                --json "$dest/kernels_e2e_compiled.json" ;;
  esac
}

if [[ "${1:-}" == __stage ]]; then  # one stage, in a child that `timeout` can stop whole
  run_stage "$2"
  exit $?
fi

echo "GPU stages, in order: ${STAGES[*]} (each at most ${limit} s; STAGE=name runs one)" | tee -a "$log"
failed=0
for name in "${STAGES[@]}"; do
  [[ "$stage" != all && "$stage" != "$name" ]] && continue
  echo "=== stage $name ($(date -u +%H:%M:%S))" | tee -a "$log"
  start=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" bash "$script" __stage "$name" 2>&1 | tee -a "$log"
  status=${PIPESTATUS[0]}
  case "$status" in
    0) echo "=== stage $name done in $((SECONDS - start)) s" | tee -a "$log" ;;
    124|130|137) echo "=== stage $name cut off at ${limit} s (status $status)" | tee -a "$log"; failed=1 ;;
    *) echo "=== stage $name FAILED (status $status): its check or run stopped it" | tee -a "$log"; failed=1 ;;
  esac
done
exit "$failed"
