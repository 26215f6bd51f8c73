"""The grammar sandbox's worker: one process that compiles client grammars with llguidance, so
that a grammar that crashes it (a stack overflow in a 1000-deep `$ref` chain, a panic), runs
for too long or asks for too much memory costs this process, never the server
(server/engine/constraint.py, GrammarSandbox, starts and kills it).

Run as a script with `python -I`: it imports only the standard library and llguidance (no
adapterserve, no torch), so it starts in a fraction of a second. It speaks length-prefixed JSON
frames on the pipe it was given as stdout (anything native code prints goes to stderr):
  -> {"tokenizer": <HF tokenizer.json text>, "n_vocab": int, "eos": [ids], "memory_bytes": int,
      "stack_bytes": int, "limits": {LLParserLimits keywords}}
  <- {"ready": true}
  -> {"kind": "json_schema" | "json_object" | "regex" | "choice" | "grammar", "spec": ...}
  <- {"grammar": <llguidance grammar>} or {"error": <why, for the client>}
  (repeated; EOF on stdin ends it)

Each job is compiled, validated against the tokenizer, made into a matcher and asked for its
first token mask: whatever the server does with the grammar in-process afterwards has been done
here first. The job runs on a thread whose stack is `stack_bytes` (smaller than the server's
threads', so what fits here fits there) under an address-space limit of `memory_bytes` above
what the worker held once ready.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import sys
import threading
from typing import Any, BinaryIO

HEADER = struct.Struct(">I")


def read_frame(stream: BinaryIO) -> Any:
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    return json.loads(stream.read(size))


def write_frame(stream: BinaryIO, message: Any) -> None:
    data = json.dumps(message).encode()
    stream.write(HEADER.pack(len(data)) + data)
    stream.flush()


def compile_grammar(kind: str, spec: Any, tokenizer: Any, limits: Any) -> dict[str, str]:
    import llguidance

    try:
        if kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                '{"type": "object"}', defaults={"whitespace_flexible": False}
            )
        elif kind == "json_schema":
            text = spec if isinstance(spec, str) else json.dumps(spec)
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                text, defaults={"whitespace_flexible": False}
            )
        elif kind == "regex":
            grammar = llguidance.grammar_from("regex", spec)
        elif kind == "choice":
            grammar = llguidance.grammar_from("choice", json.dumps(list(spec)))
        elif kind == "grammar":
            grammar = llguidance.grammar_from("grammar", spec)
        else:
            return {"error": f"unknown constraint kind {kind!r}"}
    except (ValueError, TypeError, RecursionError) as exc:
        return {"error": str(exc)[:500] or type(exc).__name__}
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, tokenizer, limits=limits
    )
    if failed:
        return {"error": "; ".join(str(m).strip() for m in messages)[:500] or "invalid grammar"}
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=limits)
    if not matcher.is_error():
        matcher.compute_bitmask()  # the first mask: what the engine asks for first
    if matcher.is_error():
        return {"error": str(matcher.get_error())[:500]}
    return {"grammar": grammar}


def run_job(kind: str, spec: Any, tokenizer: Any, limits: Any) -> dict[str, str]:
    result: dict[str, str] = {}

    def work() -> None:
        try:
            result.update(compile_grammar(kind, spec, tokenizer, limits))
        except MemoryError:
            result["error"] = "grammar too complex: compiling it ran out of memory"
        except BaseException as exc:  # noqa: BLE001 - a Rust panic is a BaseException (pyo3)
            result["error"] = f"the grammar compiler failed: {str(exc)[:300] or type(exc).__name__}"

    thread = threading.Thread(target=work, name="compile")
    thread.start()
    thread.join()
    return result


def main() -> None:
    # the protocol owns the original stdout; fd 1 becomes stderr for whatever native code prints
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    # below the engine: on a machine with few cores a compile must not take the cores the
    # engine's OpenMP team spins on (at nice 0 a 5000-way anyOf stalled every stream;
    # BENCHMARKS.md, 'Figures quoted from the code')
    os.nice(10)
    requests = sys.stdin.buffer
    init = read_frame(requests)
    if init is None:
        return
    import llguidance

    tokenizer = llguidance.LLTokenizer(
        init["tokenizer"], n_vocab=init["n_vocab"], eos_token=init["eos"]
    )
    limits = llguidance.LLParserLimits(**init["limits"])
    threading.stack_size(init["stack_bytes"])
    with open("/proc/self/statm") as statm:
        held = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = held + init["memory_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    write_frame(channel, {"ready": True})
    while (job := read_frame(requests)) is not None:
        write_frame(channel, run_job(job["kind"], job["spec"], tokenizer, limits))


if __name__ == "__main__":
    main()
