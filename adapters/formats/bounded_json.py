"""JSON read from adapter files (adapter_config.json, the safetensors header), nesting checked
before parsing.

json.loads recurses once per level, so a text nested 100,000 deep is only stopped by a
RecursionError, at a depth that depends on the caller's stack. The nesting is measured on the raw
bytes first, in passes that run in C and never recurse, and anything deeper than MAX_JSON_DEPTH
(the limit of the server's JSON bodies, server.main) is refused naming the limit.
"""

from __future__ import annotations

import itertools
import json

from adapterserve.adapters.spec import AdapterFormatError

__all__ = ["MAX_JSON_DEPTH", "json_depth", "parse_json"]

MAX_JSON_DEPTH = 64
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'"[]{}')))
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes


def json_depth(raw: bytes) -> int:
    """Deepest nesting of [ and { outside strings (1 for `{"a": 1}`), without parsing.

    Backslash pairs go first, then escaped quotes, left to right as JSON reads them; what is
    left between quotes is string content. Where the text is not JSON, json.loads stops at the
    first error, and up to there this reading and its own agree.
    """
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    outside_strings = b"".join(text.split(b'"')[::2])
    steps = memoryview(outside_strings.translate(_DEPTH_STEP)).cast("b")
    return max(itertools.accumulate(steps), default=0)


def parse_json(raw: bytes, param: str, what: str) -> object:
    """`raw` parsed, or AdapterFormatError(param, "<what>: ...") when too deep or not JSON."""
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise AdapterFormatError(
            param, f"{what}: expected JSON nested at most {MAX_JSON_DEPTH} levels deep, got {depth}"
        )
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterFormatError(param, f"{what}: not valid JSON: {e}") from None
