"""Regexes that come with an adapter config, matched in time linear in the module name.

peft matches `rank_pattern` / `alpha_pattern` keys, `target_modules` / `exclude_modules` /
`feedforward_modules` given as one string, and `layers_pattern` with Python's backtracking `re`.
A crafted key such as `(?:[a-z_.0-9]|[a-z_.0-9]){0,22}Z` takes exponential time there, and `re`
holds the GIL while it runs: one upload froze every request of the server (SECURITY row 21;
BENCHMARKS.md, 'Figures quoted from the code'). So every such pattern is, before use:
- bounded: at most MAX_PATTERN_CHARS characters, MAX_PATTERN_KEYS per field, and
  MAX_PROGRAM_SIZE RE2 instructions once compiled (which bounds each match's time and memory);
- accepted by Python's `re` (what peft itself would load; compiled here, never matched) and by
  RE2 (google-re2: no backreferences, lookaround, possessive or atomic groups, `\\Z`);
- free of `{,` and `[:`, the two constructs the engines read differently (`a{,3}` repeats in
  Python but is literal in RE2; `[[:alpha:]]` is a POSIX class in RE2 only);
then matched with RE2 only. The subjects are module names that adapters.spec.MODULE_KEY builds
from ASCII, on which `\\d \\w \\s \\b . $` mean the same in both engines, so a match here is a
match in peft.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from adapterserve.adapters.spec import AdapterFormatError

__all__ = ["compile_pattern", "pattern_table", "first_match", "check_config_patterns"]

MAX_PATTERN_CHARS = 256
MAX_PATTERN_KEYS = 1024
# Real keys compile to a few dozen instructions (`layers\.1\.self_attn\.o_proj`: 43, a 260-char
# alternation of 8 module names: 151); nested counted repeats reach thousands, and 1024 keys of
# thousands of instructions each filled hundreds of MB of DFA caches matching the module names
# (BENCHMARKS.md, 'Figures quoted from the code').
MAX_PROGRAM_SIZE = 1024
# The expressions peft 0.21 builds around a config's pattern ("{}" = the pattern itself):
PEFT_KEY = r"(.*\.)?({})$"  # get_pattern_key, with re.match: rank_pattern / alpha_pattern
FULL = "{}"  # re.fullmatch: target_modules, exclude_modules, feedforward_modules as a str
LAYERS = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."  # check_target_module_exists, with re.match
DIVERGENT = ("{,", "[:")

Regex = Any  # a compiled re2 pattern (re2 ships no type stubs)


def compile_pattern(field: str, pattern: object, template: str = FULL) -> Regex:
    """`pattern` placed in `template` (peft's expression around it), checked, compiled by RE2."""
    if not isinstance(pattern, str):
        raise AdapterFormatError(field, f"{field}: expected a regex string, got {pattern!r:.80}")
    shown = _show(pattern)
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterFormatError(
            field,
            f"{field}: expected patterns of at most {MAX_PATTERN_CHARS} characters, "
            f"got {len(pattern)} ({shown})",
        )
    if any(token in pattern for token in DIVERGENT):
        raise AdapterFormatError(
            field,
            f"{field}: expected a pattern without '{{,' or '[:' (Python and RE2 read them "
            f"differently: write {{0,n}}, no POSIX classes), got {shown}",
        )
    expression = template.format(pattern)
    try:
        re.compile(expression)  # what peft would accept; compiled only, never matched
    except re.error as e:
        raise AdapterFormatError(field, f"{field}: invalid pattern {shown}: {e}") from None
    return _compile_re2(field, expression, shown)


def _compile_re2(field: str, expression: str, shown: str) -> Regex:
    # Imported here: the engine's step path (adapters.pool -> adapters.kinds) imports this module
    # and must run where only torch and triton are installed (the benchmark device image).
    import re2

    options = re2.Options()
    options.log_errors = False  # the refusal below says it; no stderr echo of client input
    try:
        regex = re2.compile(expression, options)
    except re2.error as e:
        reason = (
            e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else e
        )
        raise AdapterFormatError(
            field,
            f"{field}: expected a pattern RE2 can match in linear time (no backreferences, "
            f"lookaround, possessive or atomic groups, \\Z, repeats over 1000), got {shown}: "
            f"{reason}",
        ) from None
    if regex.programsize > MAX_PROGRAM_SIZE:
        raise AdapterFormatError(
            field,
            f"{field}: expected a pattern of at most {MAX_PROGRAM_SIZE} RE2 instructions, "
            f"got {regex.programsize} ({shown})",
        )
    return regex


def pattern_table(
    config: Mapping, field: str, check: Callable[[str, object], float]
) -> list[tuple[Regex, float]]:
    """rank_pattern / alpha_pattern {regex: value} -> [(compiled, checked value)], config order."""
    table = config.get(field) or {}
    if not isinstance(table, dict):
        raise AdapterFormatError(field, f"{field}: expected an object, got {table!r:.80}")
    _check_count(field, len(table))
    return [
        (compile_pattern(field, key, PEFT_KEY), check(field, value)) for key, value in table.items()
    ]


def first_match(table: list[tuple[Regex, float]], module: str, default: float) -> float:
    """peft.utils.other.get_pattern_key: the value of the first key matching the name's end."""
    for regex, value in table:
        if regex.match(module):
            return value
    return default


def check_config_patterns(config: Mapping) -> None:
    """The patterns this server does not match (the saved weights name their modules) are still
    checked, so that no pattern an adapter brings escapes the bounds above."""
    for field in ("target_modules", "exclude_modules"):
        if isinstance(config.get(field), str):
            compile_pattern(field, config[field], FULL)
    layers = config.get("layers_pattern")
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(layers, list):
        _check_count("layers_pattern", len(layers))
        for pattern in layers:
            compile_pattern("layers_pattern", pattern, LAYERS)


def _check_count(field: str, count: int) -> None:
    if count > MAX_PATTERN_KEYS:
        raise AdapterFormatError(
            field, f"{field}: expected at most {MAX_PATTERN_KEYS} patterns, got {count}"
        )


def _show(pattern: str, limit: int = 60) -> str:
    return repr(pattern[:limit] + ("..." if len(pattern) > limit else ""))
