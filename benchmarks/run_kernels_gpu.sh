#!/usr/bin/env bash
# The GPU benchmark in one command: Triton kernels vs the reference (correctness, then time,
# bandwidth as a fraction of a device-to-device copy, speedup) and the end-to-end decode of a
# Llama-2-7B-shaped model: base only vs 64 distinct rank-16 LoRA adapters vs 64 adapters of six
# kinds, each eager and through the compiled decode step (torch.compile + CUDA graphs per batch
# bucket; E2E_COMPILE=0 skips it). Needs a CUDA GPU with torch and triton; nothing else (no web
# stack).
#
#   bash benchmarks/run_kernels_gpu.sh              # everything, full tables
#   QUICK=1 bash benchmarks/run_kernels_gpu.sh      # a few shapes per op
#   ONLY=lora bash benchmarks/run_kernels_gpu.sh    # one part: lora | others | e2e | quant
#
# quant (issue 14): the same 7B-shaped decode, bf16 vs int8 vs int4 weight-only (projections
# quantized as --quantization serves them, head int8), base and 64 LoRA, at batch 1 and 32,
# eager (the CUDA int4/int8 paths have never run: this is their first check; bench_kernels first
# checks each quantized layer, Q8_0's group-scaled int8 included, against its dequantized
# weights on the GPU and stops on a miss).
#
# Three separate runs (lora; bottleneck, ia3, attention; e2e), each with its own JSON, so that
# a machine with a per-command time limit (10 minutes on the lent device machines) can take
# them one call each with ONLY=... (the full lora table is the longest; QUICK=1 shortens it).
# Interpreter: $PYTHON, else .venv/bin/python when its torch sees a GPU, else python3 (on the
# lent device machines, python3 holds CUDA torch and triton). JSON goes to $OUT (the device
# tool's folder) or bench-results/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    PYTHON=.venv/bin/python
  fi
fi
dest=${OUT:-bench-results}
mkdir -p "$dest"
export PYTHONUNBUFFERED=1
quick=()
[[ -n "${QUICK:-}" ]] && quick=(--quick)
only=${ONLY:-all}
case "$only" in all|lora|others|e2e|quant) ;; *) echo "ONLY must be lora, others, e2e or quant" >&2; exit 2 ;; esac
if [[ "$only" == all || "$only" == lora ]]; then
  "$PYTHON" benchmarks/bench_kernels.py --ops lora --dtype bfloat16 "${quick[@]}" \
    --json "$dest/kernels_lora.json"
fi
if [[ "$only" == all || "$only" == others ]]; then
  "$PYTHON" benchmarks/bench_kernels.py --ops bottleneck ia3 attention --dtype bfloat16 \
    "${quick[@]}" --json "$dest/kernels_others.json"
fi
if [[ "$only" == all || "$only" == e2e ]]; then
  compile=(--e2e-compile)
  [[ "${E2E_COMPILE:-1}" == 0 ]] && compile=()
  "$PYTHON" benchmarks/bench_kernels.py --ops e2e --e2e-runs base lora64 mixed "${compile[@]}" \
    --json "$dest/kernels_e2e.json"
fi
if [[ "$only" == all || "$only" == quant ]]; then
  for conc in 1 32; do
    "$PYTHON" benchmarks/bench_kernels.py --ops e2e --e2e-runs base lora64 --e2e-concurrency "$conc" \
      --e2e-quantization none int8 int4 --json "$dest/quant_e2e_c$conc.json"
  done
fi
