"""DoRA vs LoRA vs base, side by side in one run: output tok/s of 16 streams over 8 distinct
rank-16 adapters (q, k, v, o of every layer, loadtest.synthetic's LoRA), the same adapters with
`use_dora` and a magnitude vector per module, the same adapters with LoRA on embed_tokens and
lm_head too, and the base model alone; the default model as `serve` runs it (in-process engine,
each measurement in a fresh process, median of 3).

    .venv/bin/python benchmarks/bench_dora.py [--output-len 64] [--json out.json]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # siblings; never the root (its kernels/ shadows HF's)

from bench_engine import isolated, make_prompts  # noqa: E402
from bench_quant import run, stream_args  # noqa: E402

from adapterserve.loadtest.synthetic import BaseDims, make_adapter, write_adapter  # noqa: E402
from adapterserve.server.config import Settings  # noqa: E402
from adapterserve.server.model.weights import resolve_model_dir  # noqa: E402


def write_adapters(folder: Path, model_dir: Path, count: int, rank: int) -> dict[str, list[str]]:
    """`count` LoRA adapters and their DoRA twins (same A, B; magnitude = the merged weight's
    row norms x (1 + noise), as a trained DoRA's stays near its init)."""
    dims = BaseDims.from_config(json.loads((model_dir / "config.json").read_text()))
    base = load_file(str(next(model_dir.glob("*.safetensors"))))
    flags: dict[str, list[str]] = {"lora": [], "dora": [], "embed-head": []}
    for i in range(count):
        config, tensors = make_adapter(dims, "lora", rank, seed=700 + i)
        flags["lora"].append(f"lora{i}={write_adapter(folder / f'lora{i}', config, tensors)}")
        rng = np.random.default_rng(900 + i)
        dora = dict(tensors)
        for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
            module = key.removesuffix(".lora_A.weight")
            weight = base[module.removeprefix("base_model.model.") + ".weight"].astype(np.float64)
            merged = weight + 2.0 * tensors[f"{module}.lora_B.weight"] @ tensors[key]  # alpha/r = 2
            norms = np.linalg.norm(merged, axis=1) * (
                1 + 0.1 * rng.standard_normal(merged.shape[0])
            )
            dora[f"{module}.lora_magnitude_vector"] = norms.astype(np.float32)
        path = write_adapter(folder / f"dora{i}", {**config, "use_dora": True}, dora)
        flags["dora"].append(f"dora{i}={path}")
        vocab, hidden = dims.vocab_size, dims.hidden_size
        shapes = {
            "base_model.model.model.embed_tokens.lora_embedding_A": (rank, vocab),
            "base_model.model.model.embed_tokens.lora_embedding_B": (hidden, rank),
            "base_model.model.lm_head.lora_A.weight": (rank, hidden),
            "base_model.model.lm_head.lora_B.weight": (vocab, rank),
        }
        model_level = {
            key: (0.01 * rng.standard_normal(shape)).astype(np.float32)
            for key, shape in shapes.items()
        }
        targets = [*config["target_modules"], "embed_tokens", "lm_head"]
        path = write_adapter(
            folder / f"emb{i}", {**config, "target_modules": targets}, {**tensors, **model_level}
        )
        flags["embed-head"].append(f"emb{i}={path}")
    return flags


def main() -> None:
    args = stream_args(__doc__, "dora.json").parse_args()
    base = Settings(
        device="cpu",
        log_level="warning",
        compile="off",
        max_num_seqs=16,
        adapter_slots=3 * args.adapters,
    )
    model_dir = resolve_model_dir(None, base.cache_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(16, args.prompt_len, vocab, 1)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        flags = write_adapters(Path(tmp), model_dir, args.adapters, args.rank)
        settings = base.model_copy(update={"adapters": [f for v in flags.values() for f in v]})
        for label, names in (
            ("base", [None] * 16),
            ("lora", [f"lora{i % args.adapters}" for i in range(16)]),
            ("dora", [f"dora{i % args.adapters}" for i in range(16)]),
            ("lora + embed_tokens + lm_head", [f"emb{i % args.adapters}" for i in range(16)]),
        ):
            rows[label] = isolated(run, settings, prompts, names, args.output_len, args.repeats)
    print(f"\n{'16 streams':<40} {'tok/s':>8} {'x base':>7}")
    for label, row in rows.items():
        print(f"{label:<40} {row['tok_s']:>8.1f} {row['tok_s'] / rows['base']['tok_s']:>7.2f}")
    ratio = rows["dora"]["tok_s"] / rows["lora"]["tok_s"]
    print(f"{'dora / lora':<40} {ratio:>8.2f}")
    model_level = rows["lora + embed_tokens + lm_head"]["tok_s"] / rows["lora"]["tok_s"]
    print(f"{'(lora + embed_tokens + lm_head) / lora':<40} {model_level:>8.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "rows": rows,
                "dora_over_lora": ratio,
                "embed_head_over_lora": model_level,
                "quantization": rows["base"]["quantization"],
            },
            indent=1,
        )
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
