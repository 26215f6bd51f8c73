"""Read an adapter directory (config + safetensors only) into a validated AdapterSpec.

Order of checks: file names (the allow-listed files must be plain files, never links; every
other entry, such as a hub download's tokenizer.json, training_args.bin or checkpoint-100/, is
ignored without being opened, in one log line; pickle weights alone are refused) ->
adapter_config.json (a JSON object nested
at most 64 deep with a supported peft_type; every regex in it bounded and RE2-compatible,
adapters.formats.patterns) -> the safetensors header (its length and tensor count capped before
it is read and parsed, then every entry checked, all before any large allocation) -> the
tensors, through the safetensors library only (never pickle) -> the format's own checks
(shapes against the base fingerprint, rank, finiteness, unsupported options), which belong to
the adapter's kind (adapters.kinds), chosen from the config's peft_type.
`base_model_name_or_path`, `auto_map`, `auto_mapping` and any other path or code named in the
config are never read or followed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

import torch

from adapterserve.adapters.formats.bounded_json import parse_json
from adapterserve.adapters.formats.patterns import check_config_patterns
from adapterserve.adapters.spec import TARGETS, AdapterFormatError, AdapterSpec, BaseFingerprint

__all__ = [
    "ALLOWED_FILES",
    "load_adapter",
    "pickle_only",
    "pickle_only_message",
    "read_safetensors",
    "shown_names",
]

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ALLOWED_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, "README.md"})
# Names of files torch.load would read: never opened; named when they are the only weights.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_SHOWN_NAMES = 8
MAX_CONFIG_BYTES = 1 << 20
# A header entry is ~130 bytes; the largest real adapter, a LoRA on all 7 projections of an
# 80-layer model, has 80 * 7 * 2 = 1,120 entries (~150 KB). 4 MiB is far above that, and caps
# what json.loads parses before the entries are counted (a huge header of zero-size tensors
# was slow to refuse and stalled a concurrent stream; BENCHMARKS.md, 'Figures quoted from the
# code').
MAX_HEADER_BYTES = 4 << 20
# Tensors per projection any format stores (DoRA: A, B and the magnitude vector; LoRA A/B,
# bottleneck down/up; IA3 has one, prefix and prompt tuning one in all), and slack. The tensor
# cap is derived from the base (max_tensors) rather than fixed, so that it stays exact for small
# and large models alike.
TENSORS_PER_PROJECTION = 3
TENSOR_SLACK = 8
MAX_WEIGHTS_BYTES = 4 << 30

# Bytes per element of the dtypes an adapter's weights may have (floats only).
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def load_adapter(
    directory: Path,
    name: str,
    fingerprint: BaseFingerprint,
    max_rank: int,
    base_weight: Callable[[int, str], torch.Tensor] | None = None,
) -> AdapterSpec:
    """Parse and validate the adapter in `directory`; AdapterFormatError names what to fix."""
    # adapters.kinds imports this package's modules (patterns, modules): imported when used.
    from adapterserve.adapters.kinds import AdapterFiles, kind_for_config

    directory = Path(directory)
    ignored = check_files(directory)
    if ignored:
        log.info(
            "adapter %r: ignoring %d entries outside the allow-list %s: %s",
            name,
            len(ignored),
            sorted(ALLOWED_FILES),
            shown_names(ignored),
        )
    config = read_config(directory / CONFIG_FILE)
    kind = kind_for_config(config)
    check_config_patterns(config)
    tensors = read_safetensors(directory / WEIGHTS_FILE, max_tensors(fingerprint))
    return kind.parse(AdapterFiles(config, tensors, name, fingerprint, max_rank, base_weight))


def check_files(directory: Path) -> list[str]:
    """The allow-listed files are plain files (never links) and both required ones are there.
    Returns every other entry (folders end in "/"), ignored: never opened, never followed."""
    if not directory.is_dir():
        raise AdapterFormatError("directory", "expected an adapter directory, got none")
    ignored = []
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if entry.name not in ALLOWED_FILES:
            folder = entry.is_dir() and not entry.is_symlink()
            ignored.append(entry.name + ("/" if folder else ""))
        elif entry.is_symlink() or not entry.is_file():
            raise AdapterFormatError(
                entry.name,
                f"{entry.name}: expected a plain file, got a link, folder or special file",
            )
    kept = {name for name in ALLOWED_FILES if (directory / name).is_file()}
    pickles = pickle_only(kept, ignored)
    if pickles:
        raise AdapterFormatError(WEIGHTS_FILE, pickle_only_message(pickles))
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / required).is_file():
            raise AdapterFormatError(required, f"missing {required}: expected it in the adapter")
    return ignored


def pickle_only(kept: Collection[str], ignored: Iterable[str]) -> list[str]:
    """The pickle files among `ignored` when the files `kept` hold no safetensors weights."""
    if WEIGHTS_FILE in kept:
        return []
    return [name for name in ignored if name.lower().endswith(PICKLE_SUFFIXES)]


def pickle_only_message(pickles: list[str]) -> str:
    return (
        f"missing {WEIGHTS_FILE}: got only pickle weights {shown_names(pickles)}, which are "
        "never read (weights as safetensors, never pickle .bin/.pt); convert them once, "
        f"offline, to {WEIGHTS_FILE} (the README shows how)"
    )


def shown_names(names: list[str]) -> str:
    """Names for a message or a log line: the first MAX_SHOWN_NAMES, each truncated."""
    shown = [name[:80] + ("..." if len(name) > 80 else "") for name in names[:MAX_SHOWN_NAMES]]
    more = len(names) - MAX_SHOWN_NAMES
    return repr(shown) + (f" and {more} more" if more > 0 else "")


def max_tensors(fingerprint: BaseFingerprint) -> int:
    """The most tensor entries an adapter for this base may hold (see TENSORS_PER_PROJECTION)."""
    return fingerprint.num_layers * len(TARGETS) * TENSORS_PER_PROJECTION + TENSOR_SLACK


def read_config(path: Path) -> dict:
    """adapter_config.json as a dict (size- and depth-capped, must be a JSON object)."""
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterFormatError(CONFIG_FILE, f"expected at most {MAX_CONFIG_BYTES} bytes")
    config = parse_json(path.read_bytes(), CONFIG_FILE, CONFIG_FILE)
    if not isinstance(config, dict):
        raise AdapterFormatError(
            CONFIG_FILE, f"expected a JSON object, got {type(config).__name__}"
        )
    return config


def read_safetensors(path: Path, max_tensors: int) -> dict[str, torch.Tensor]:
    """Validate the header against the file size, then load through the safetensors library."""
    import safetensors.torch  # here: see adapters.formats.patterns._compile_re2

    check_safetensors_header(path, max_tensors)
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # the library's own refusals (SafetensorError and friends)
        raise AdapterFormatError(WEIGHTS_FILE, f"unreadable safetensors: {e}") from None


def check_safetensors_header(path: Path, max_tensors: int) -> None:
    """Refuse a lying header (SECURITY row 3) reading only the header itself: its length is
    checked before it is read, its nesting before it is parsed, its tensor count before the
    entries are."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _header_error(f"expected at least 8 bytes, got {len(prefix)}")
        header_len = int.from_bytes(prefix, "little")
        if header_len > MAX_HEADER_BYTES:
            raise _header_error(
                f"expected a header length <= {MAX_HEADER_BYTES} bytes (far above any real "
                f"adapter's), got {header_len}"
            )
        if header_len > size - 8:
            raise _header_error(f"expected a header length <= {size - 8}, got {header_len}")
        raw = f.read(header_len)
    header = parse_json(raw, WEIGHTS_FILE, "invalid safetensors header")
    if not isinstance(header, dict):
        raise _header_error(f"expected a JSON object header, got {type(header).__name__}")
    count = len(header) - ("__metadata__" in header)
    if count > max_tensors:
        raise _header_error(
            f"expected at most {max_tensors} tensors for this base model "
            f"({TENSORS_PER_PROJECTION} per projection and layer, {TENSOR_SLACK} more), got {count}"
        )
    check_header_entries(header, size - 8 - header_len)


def check_header_entries(header: dict, data_bytes: int) -> None:
    spans = []
    for key, entry in header.items():
        if key != "__metadata__":
            spans.append(_entry_span(key, entry, data_bytes))
    spans.sort()
    for (_, end), (begin, _) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise _header_error("tensor data_offsets overlap")
    if sum(end - begin for begin, end in spans) > MAX_WEIGHTS_BYTES:
        raise _header_error(f"expected at most {MAX_WEIGHTS_BYTES} bytes of tensors")


def _entry_span(key: str, entry: object, data_bytes: int) -> tuple[int, int]:
    """(begin, end) of one tensor's bytes after checking dtype, shape and offsets."""
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_BYTES:
        got = entry.get("dtype") if isinstance(entry, dict) else entry
        raise _header_error(f"tensor {key!r}: expected dtype in {sorted(DTYPE_BYTES)}, got {got!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not _int_list(shape) or not _int_list(offsets) or len(offsets) != 2:
        raise _header_error(f"tensor {key!r}: expected integer shape and two data_offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        raise _header_error(
            f"tensor {key!r}: expected data_offsets within the {data_bytes} data bytes, "
            f"got {offsets}"
        )
    expected = math.prod(shape) * DTYPE_BYTES[entry["dtype"]]
    if end - begin != expected:
        raise _header_error(
            f"tensor {key!r}: shape {shape} as {entry['dtype']} needs {expected} bytes, "
            f"got {end - begin}"
        )
    return begin, end


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def _header_error(detail: str) -> AdapterFormatError:
    return AdapterFormatError(WEIGHTS_FILE, f"invalid safetensors header: {detail}")
