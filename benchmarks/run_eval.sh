#!/usr/bin/env bash
# The BENCHMARKS.md evaluation run in one command: the default model (SmolLM2-135M-Instruct,
# base, no adapter) on every shipped LLM-Adapters dataset under both protocols, in-process:
#   generate       greedy decoding + the paper's answer extraction, all 13 sets
#                  (max new tokens 256 arithmetic / 32 commonsense, as in the paper);
#   loglikelihood  the best-scored answer word, the 8 sets with choices (AQuA + commonsense).
# Writes $OUT/generate/results.{json,csv,md,jsonl}, $OUT/loglikelihood/..., and $OUT/eval.md
# (both tables, with the settings and the command).
#
#   benchmarks/run_eval.sh                    # LIMIT=100 records per dataset
#   LIMIT=0 benchmarks/run_eval.sh            # the full test sets (hours on a 2-core CPU)
#   DEVICE=cuda LIMIT=0 benchmarks/run_eval.sh
#
# Knobs (environment): LIMIT (default 100; 0 = all), DEVICE (default auto), MODELS (default
# base), MODEL (default: the embedded model), MAX_NUM_SEQS (default 64), MAX_TOKENS (default:
# the paper's), DATA_DIR (default: the server's, ../shared/datasets/llm-adapters), OUT (default
# bench-results/eval), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-bench-results/eval}
LIMIT=${LIMIT:-100}
DEVICE=${DEVICE:-auto}
MODELS=${MODELS:-base}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-64}

common=(--models "$MODELS" --device "$DEVICE" --max-num-seqs "$MAX_NUM_SEQS"
        --eval-max-inflight "$MAX_NUM_SEQS" --max-num-batched-tokens 2048)
[[ "$LIMIT" != "0" ]] && common+=(--limit "$LIMIT")
[[ -n "${DATA_DIR:-}" ]] && common+=(--data-dir "$DATA_DIR")
[[ -n "${MODEL:-}" ]] && common+=(--model "$MODEL")
[[ -n "${MAX_TOKENS:-}" ]] && common+=(--max-tokens "$MAX_TOKENS")

started=$(date +%s)
for protocol in generate loglikelihood; do
  echo "== protocol $protocol" >&2
  "$PYTHON" -P -m adapterserve eval --datasets all --protocol "$protocol" "${common[@]}" \
    --out "$OUT/$protocol"
done
elapsed=$(( $(date +%s) - started ))

"$PYTHON" - "$OUT" "$LIMIT" "$DEVICE" "$elapsed" <<'PY'
import sys
from pathlib import Path
out, limit, device, elapsed = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
parts = [
    "# Evaluation: default model on the LLM-Adapters datasets\n",
    f"Limit: {'full test sets' if limit == '0' else f'first {limit} records per dataset'}; "
    f"device {device}; wall time {elapsed} s. Command: `LIMIT={limit} DEVICE={device} "
    f"benchmarks/run_eval.sh`. Accuracy in %.\n",
]
for protocol in ("generate", "loglikelihood"):
    parts.append(f"## Protocol `{protocol}`\n")
    parts.append((out / protocol / "results.md").read_text())
(out / "eval.md").write_text("\n".join(parts))
print((out / "eval.md").read_text())
PY
