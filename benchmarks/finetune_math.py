"""Fine-tune a LoRA on the LLM-Adapters math data through the server's own API, then score the
base and the adapter on held-out arithmetic sets with an evaluation job (issue 27, "It learns"),
and measure serving latency while the job trains.

Starts `adapterserve serve` (the default model unless --model) with its adapter store and jobs
in a temporary folder, uploads `math_data.json` (POST /v1/files) without the records whose
question is one of the evaluation sets' (math_data.json holds about 80% of the questions of
each of the six arithmetic test sets, AddSub, SingleEq, MultiArith, gsm8k, SVAMP and AQuA:
trained on as they are, the "held-out" sets would not be; `--keep-overlap` keeps them), creates
a fine-tuning job on the first --records records left, with `evaluations` (AddSub, SingleEq, MultiArith by default; the
paper's prompt, greedy decoding, numbers extracted as the paper does), and waits. Meanwhile a
probe sends one short completion to the base every --probe-every seconds: its latency before
the job (idle), while the job trains, and the ratio. Prints the table, writes JSON, and draws
the loss curve.

    .venv/bin/python -P benchmarks/finetune_math.py                     # ~15 min of training
    .venv/bin/python -P benchmarks/finetune_math.py --records 3260 --epochs 3 --warmup auto
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # siblings; never the root (its kernels/ shadows HF's)

from bench_engine import free_port, start_server  # noqa: E402


def question(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def held_out_records(
    data: Path, eval_dir: Path, datasets: list[str], max_output_chars: int | None = None
) -> tuple[bytes, int, int]:
    """math_data.json as JSON Lines without the records whose question (the instruction, its
    spacing and case aside) is one of `datasets`' test questions; with `max_output_chars`, also
    only the records whose answer is a number (AQuA's are option letters, which the arithmetic
    sets' scoring never asks for) and whose rationale is at most that long (the one- and
    two-step problems, and more of them in a short run); (data, kept, dropped)."""
    seen = set()
    for name in datasets:
        for record in json.loads((eval_dir / name / "test.json").read_text()):
            seen.add(question(record["instruction"]))
    records = json.loads(data.read_text())
    kept = [r for r in records if question(r["instruction"]) not in seen]
    if max_output_chars:
        kept = [
            r
            for r in kept
            if len(r["output"]) <= max_output_chars and is_number(str(r.get("answer", "")))
        ]
    lines = "".join(json.dumps(r) + "\n" for r in kept)
    return lines.encode(), len(kept), len(records) - len(kept)


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROBE = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}


class Probe(threading.Thread):
    """One completion every `every` seconds; (time sent, latency, phase) each."""

    def __init__(self, url: str, model: str, every: float) -> None:
        super().__init__(daemon=True)
        self.url, self.model, self.every = url, model, every
        self.phase, self.samples, self.done = "idle", [], threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self.done.is_set():
                began = time.perf_counter()
                r = client.post(f"{self.url}/v1/completions", json={"model": self.model, **PROBE})
                if r.status_code == 200:
                    self.samples.append((time.time(), time.perf_counter() - began, self.phase))
                self.done.wait(self.every)

    def latencies(self, phase: str) -> list[float]:
        return [s[1] for s in self.samples if s[2] == phase]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="HF dir or .gguf; default: the embedded model")
    ap.add_argument(
        "--data",
        type=Path,
        default=ROOT.parent / "shared" / "datasets" / "llm-adapters-train" / "math_data.json",
    )
    ap.add_argument(
        "--eval-dir",
        type=Path,
        default=ROOT.parent / "shared" / "datasets" / "llm-adapters",
        help="the evaluation sets (<name>/test.json), to leave their questions out of training",
    )
    ap.add_argument("--keep-overlap", action="store_true", help="train on every record")
    ap.add_argument(
        "--max-output-chars",
        type=int,
        default=300,
        help="only records with a numeric answer and a rationale this short; 0: every record",
    )
    ap.add_argument("--records", type=int, default=960, help="the first N records kept; 0: all")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--lr-multiplier", type=float, default=3.0, help="of 3e-4")
    ap.add_argument("--warmup", default="5")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--targets", nargs="+", default=ALL_LINEAR)
    ap.add_argument(
        "--train-on-inputs", action="store_true", help="the prompt's tokens in the loss too"
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="the job's threads")
    ap.add_argument("--datasets", nargs="+", default=["AddSub", "SingleEq", "MultiArith"])
    ap.add_argument("--limit", type=int, default=None, help="first N examples of each set")
    ap.add_argument("--probe-every", type=float, default=10.0, help="0: no latency probe")
    ap.add_argument("--idle-probes", type=int, default=6)
    ap.add_argument("--json", type=Path, default=ROOT / "bench-results" / "finetune_math.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "finetune-loss.png")
    args = ap.parse_args()
    if not args.data.is_file():
        sys.exit(f"no training data at {args.data} (--data)")

    work = Path(tempfile.mkdtemp(prefix="finetune-math-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(
        args.model,
        port,
        32,
        (
            "--finetune-threads",
            str(args.threads),
            "--finetune-dir",
            str(work / "jobs"),
            "--adapter-store-dir",
            str(work / "store"),
            "--max-adapter-rank",
            str(max(64, args.rank)),
        ),
    )
    try:
        client = httpx.Client(base_url=url, timeout=600)
        base = client.get("/v1/models").json()["data"][0]["id"]
        probe = Probe(url, base, args.probe_every) if args.probe_every else None
        if probe:
            probe.start()
            while len(probe.latencies("idle")) < args.idle_probes:
                time.sleep(0.5)
            probe.phase = "training"
        if args.keep_overlap:
            content, kept, dropped = args.data.read_bytes(), None, 0
        else:
            content, kept, dropped = held_out_records(
                args.data, args.eval_dir, args.datasets, args.max_output_chars
            )
            why = "evaluation questions" + (
                f", letter answers, rationales over {args.max_output_chars} characters"
                if args.max_output_chars
                else ""
            )
            print(f"training data: {kept} records kept, {dropped} left out ({why})")
        uploaded = client.post(
            "/v1/files",
            files={"file": (args.data.stem + ".jsonl", content)},
            data={"purpose": "fine-tune"},
        )
        uploaded.raise_for_status()
        body = {
            "model": base,
            "training_file": uploaded.json()["id"],
            "suffix": "math",
            "seed": 42,
            "method": {
                "type": "supervised",
                "supervised": {
                    "hyperparameters": {
                        "n_epochs": args.epochs,
                        "batch_size": args.batch_size,
                        "learning_rate_multiplier": args.lr_multiplier,
                    }
                },
            },
            "adapter": {
                "kind": "lora",
                "r": args.rank,
                "alpha": args.alpha,
                "target_modules": args.targets,
            },
            "training": {
                "train_on_inputs": args.train_on_inputs,
                "max_records": args.records or None,
                "micro_batch_size": args.micro_batch_size,
                "warmup_steps": args.warmup if args.warmup == "auto" else int(args.warmup),
            },
            "evaluations": {"datasets": args.datasets, "limit": args.limit},
        }
        created = client.post("/v1/fine_tuning/jobs", json=body)
        if created.status_code != 200:
            sys.exit(f"job refused: {created.text}")
        job = created.json()
        began = time.time()
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(5)
            job = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
            print(
                f"  {job['status']} step {job['progress']['step']}/{job['progress']['total_steps']}"
            )
        train_s = time.time() - began
        if probe:
            probe.phase = "evaluation"
        if job["status"] != "succeeded":
            sys.exit(f"job {job['status']}: {job['error']}")
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=10000").json()["data"]
        metrics = [e["data"] for e in events[::-1] if e["type"] == "metrics"]
        evaluation = client.get(f"/v1/evaluations/{job['evaluation_job_id']}").json()
        while evaluation["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(10)
            evaluation = client.get(f"/v1/evaluations/{job['evaluation_job_id']}").json()
            print(
                f"  evaluation {evaluation['progress']['done']}/{evaluation['progress']['total']}"
            )
        if probe:
            probe.done.set()
    finally:
        server.terminate()
        server.wait(60)
        shutil.rmtree(work, ignore_errors=True)

    table = {(c["model"], c["dataset"]): c for c in evaluation["results"]}
    print(f"\njob {job['id']}: {len(metrics)} steps in {train_s:.0f} s, settings {job['training']}")
    print(f"{'dataset':<12}{'base':>10}{'adapter':>10}")
    rows = []
    for name in args.datasets:
        b, a = table[("base", name)], table[(job["fine_tuned_model"], name)]
        rows.append({"dataset": name, "base": b, "adapter": a})
        print(f"{name:<12}{b['accuracy']:>10.3f}{a['accuracy']:>10.3f}   (n={a['total']})")
    latency = {}
    if probe:
        for phase in ("idle", "training"):
            got = probe.latencies(phase)
            latency[phase] = {
                "n": len(got),
                "median_s": statistics.median(got) if got else None,
                "p90_s": statistics.quantiles(got, n=10)[-1] if len(got) > 2 else None,
            }
        print(f"probe latency (16 tokens): {json.dumps(latency)}")
    out = {
        "job": job,
        "train_seconds": train_s,
        "metrics": metrics,
        "evaluation": evaluation,
        "rows": rows,
        "left_out_records": dropped,
        "probe_latency": latency,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    plot(metrics, args.plot, job, kept)
    print(f"wrote {args.json} and {args.plot}")


def plot(metrics: list[dict], path: Path, job: dict, kept: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.plot([m["step"] for m in metrics], [m["train_loss"] for m in metrics], lw=1.2)
    ax.set_xlabel(f"optimizer step (batch {job['training']['batch_size']})")
    ax.set_ylabel("training loss (token mean)")
    adapter = job["adapter"]
    ax.set_title(
        f"LoRA r={adapter['r']} on math_data.json "
        f"({job['training']['max_records'] or kept or 'all'} records), "
        f"lr {job['training']['learning_rate']:.0e}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
