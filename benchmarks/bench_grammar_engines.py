"""llguidance vs xgrammar on this machine: the choice behind server/engine/constraint.py.

Both engines are given the default model's tokenizer and one JSON schema (bench_structured's), and
are teacher-forced through the same valid document (its token ids): per token, the time to fill
the next-token bitmask (what a constrained row costs the engine each step) and to advance past
the token; plus the time to compile the schema. One thread, median over the document's tokens
and `--repeats` passes.

xgrammar is not a dependency of the project (its wheel requires torch, which on a fresh machine
pulls a CUDA build); run this from a scratch venv that has both, e.g.

    python3 -m venv /tmp/xg && /tmp/xg/bin/pip install torch==2.13.0 && \\
        /tmp/xg/bin/pip install xgrammar transformers llguidance==1.9.1
    /tmp/xg/bin/python benchmarks/bench_grammar_engines.py --tokenizer <model dir> [--json out.json]

(<model dir>: the default model's converted folder, printed by `adapterserve serve` at start, or
any Hugging Face model folder with tokenizer files.) An engine that is not installed is skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SCHEMA = {  # long enough to run bench_structured's whole budget: short strings and numbers
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "count": {"type": "integer", "minimum": 0},
                },
                "required": ["name", "count"],
            },
        }
    },
    "required": ["items"],
}
DOCUMENT = json.dumps(
    {"items": [{"name": f"item number {i}"[:12], "count": 3 * i + 1} for i in range(12)]},
    separators=(",", ":"),
)


def bench_llguidance(hf, ids: list[int], vocab: int, repeats: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
    started = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), defaults={"whitespace_flexible": False}
    )
    failed, _ = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)  # as served
    assert not failed
    compile_s = time.perf_counter() - started
    bitmask = llt.allocate_token_bitmask(1, vocab)
    fills, advances, makes = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        makes.append(time.perf_counter() - t0)
        for token in ids:
            t0 = time.perf_counter()
            llt.fill_next_token_bitmask(matcher, bitmask, 0)
            t1 = time.perf_counter()
            assert matcher.consume_token(token), "the document left the grammar"
            fills.append(t1 - t0)
            advances.append(time.perf_counter() - t1)
    return summary("llguidance", compile_s, makes, fills, advances)


def bench_xgrammar(hf, ids: list[int], vocab: int, repeats: int) -> dict:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    started = time.perf_counter()
    compiled = compiler.compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":")
    )  # as llguidance: compact
    compile_s = time.perf_counter() - started
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    fills, advances, makes = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        matcher = xgr.GrammarMatcher(compiled)
        makes.append(time.perf_counter() - t0)
        for token in ids:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            t1 = time.perf_counter()
            assert matcher.accept_token(token), "the document left the grammar"
            fills.append(t1 - t0)
            advances.append(time.perf_counter() - t1)
    return summary("xgrammar", compile_s, makes, fills, advances)


def summary(
    name: str, compile_s: float, makes: list[float], fills: list[float], advances: list[float]
) -> dict:
    fills_ms = sorted(1e3 * f for f in fills)
    return {
        "engine": name,
        "compile_ms": 1e3 * compile_s,
        "matcher_ms": 1e3 * statistics.median(makes),
        # a request's wait for its first mask: compile, a matcher, the first fill (first pass)
        "first_mask_ms": 1e3 * (compile_s + makes[0] + fills[0]),
        "fill_median_ms": statistics.median(fills_ms),
        "fill_p99_ms": fills_ms[int(0.99 * (len(fills_ms) - 1))],
        "fill_mean_ms": statistics.fmean(fills_ms),
        "advance_median_ms": 1e3 * statistics.median(advances),
        "tokens": len(fills),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokenizer", type=Path, required=True, help="a folder with tokenizer files")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    hf = AutoTokenizer.from_pretrained(str(args.tokenizer))
    config = json.loads((args.tokenizer / "config.json").read_text())
    vocab = int(config["vocab_size"])
    ids = hf.encode(DOCUMENT, add_special_tokens=False) + [hf.eos_token_id]
    rows = []
    for bench in (bench_llguidance, bench_xgrammar):
        try:
            rows.append(bench(hf, ids, vocab, args.repeats))
        except ImportError as exc:
            print(f"skipped {bench.__name__.removeprefix('bench_')}: {exc}")
    print(f"\nvocab {vocab}, {len(ids)} document tokens x {args.repeats}, one thread")
    print(
        f"{'engine (ms)':<12} {'compile':>8} {'matcher':>8} {'1st mask':>9} {'fill med':>9} "
        f"{'fill p99':>9} {'fill mean':>10} {'advance':>8}"
    )
    for r in rows:
        print(
            f"{r['engine']:<12} {r['compile_ms']:>8.2f} {r['matcher_ms']:>8.3f} "
            f"{r['first_mask_ms']:>9.2f} {r['fill_median_ms']:>9.3f} {r['fill_p99_ms']:>9.3f} "
            f"{r['fill_mean_ms']:>10.3f} {r['advance_median_ms']:>8.3f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"vocab": vocab, "rows": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
