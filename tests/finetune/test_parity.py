"""Issue 27, deliverable 4: what a fine-tuning job trains is what the server serves, one step of
ours is one step of an independent reference, and a resumed run is an uninterrupted one; for
every kind (LoRA, DoRA, rsLoRA, series with a fixed and a learned scaling, parallel, prefix,
prompt, IA3) on a tiny random Llama.

1. Served = trained: a few high-learning-rate steps of `train(...)`, then the written adapter
   folder served by the engine (--adapter, fp32 reference kernels): its greedy tokens equal the
   trained model's own and its log-probs (prompt and generated positions, a function of the
   whole logits row) agree to fp32 summation-order tolerances. One case on an int4 base: the
   training forward is a dense bf16 matmul over the dequantized codes, the server the int4
   kernel (bf16 products, fp32 accumulation), so the tolerance there is bf16 rounding.
2. One step = reference: `Run.step` against plain transformers + peft (or the LLM-Adapters math
   in hooks for bottlenecks) with the same initial adapter tensors, the loss written here as the
   token mean of the cross entropy over the whole batch (ours goes in micro-batches), AdamW,
   clipping and the linear warm-up schedule written independently.
3. Resume: a run cancelled after its checkpoint and resumed ends at the uninterrupted run's
   adapter, bit for bit; `should_stop` raises `Cancelled`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from adapterserve.server.config import Settings
from adapterserve.server.finetune import trainer
from adapterserve.server.finetune.adapters import (
    BottleneckOptions,
    Ia3Options,
    LoraOptions,
    PrefixOptions,
    PromptOptions,
    attach,
    trainable_state,
)
from adapterserve.server.finetune.base import FrozenLinear, load_training_base
from adapterserve.server.finetune.data import IGNORE, parse_record
from adapterserve.server.finetune.trainer import Cancelled, Run, TrainSettings, tokenize_all
from tests.engine.conftest import serve
from tests.engine.test_adapters_engine import NEW_TOKENS, generate
from tests.helpers import make_tiny_llama

peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = {
    "lora": LoraOptions(kind="lora", r=4, alpha=8, dropout=0.0, target_modules=ALL),
    "dora": LoraOptions(
        kind="dora", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]
    ),
    "rslora": LoraOptions(
        kind="lora", r=8, alpha=4, dropout=0.0, use_rslora=True, target_modules=ALL
    ),
    "series": BottleneckOptions(kind="series", bottleneck_size=8, scaling=0.5),
    "series-learned": BottleneckOptions(
        kind="series", bottleneck_size=6, non_linearity="gelu", scaling="learned"
    ),
    "parallel": BottleneckOptions(
        kind="parallel",
        bottleneck_size=12,
        non_linearity="relu",
        scaling=2.0,
        target_modules=["q_proj", "v_proj", "down_proj"],
    ),
    "prefix": PrefixOptions(kind="prefix", num_virtual_tokens=5),
    "prompt": PromptOptions(kind="prompt", num_virtual_tokens=4),
    "ia3": Ia3Options(kind="ia3"),
}
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "once",
    "upon",
    "a",
    "time",
    "small",
    "model",
    "adapters",
]


def records(n: int, seed: int) -> list:
    """Prompt / completion records of a few words each (a handful of tokens)."""
    rng = random.Random(seed)
    return [
        parse_record(
            {
                "prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 3))),
                "completion": " " + " ".join(rng.choices(WORDS, k=rng.randint(1, 4))),
            }
        )
        for _ in range(n)
    ]


def train_settings(**overrides) -> TrainSettings:
    values = dict(
        n_epochs=1,
        batch_size=4,
        micro_batch_size=2,
        learning_rate=2e-2,  # high: a few steps take the adapter far from its init
        warmup_steps=0,
        checkpoint_every=0,
        seed=7,
    )
    values.update(overrides)
    return TrainSettings(**values)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """Hidden 64, intermediate 128, kv dim 32, vocab 384: multiples of 32, so int4 fits."""
    return make_tiny_llama(tmp_path_factory.mktemp("ft-parity") / "base", seed=5)


def base_settings(tiny_dir: Path, tmp: Path, **overrides) -> Settings:
    return Settings(model=str(tiny_dir), device="cpu", cache_dir=tmp / "cache", **overrides)


def train_capturing(monkeypatch, base, options, settings, recs, out: Path, **kw):
    """`trainer.train`, and the trainable model it built (for prefix / prompt tuning the
    PeftModel that wraps `base.model`) with its initial tensors."""
    made = []

    def capture(model, opts, model_dir):
        made.append(attach(model, opts, model_dir))
        made.append({k: v.clone() for k, v in trainable_state(made[0]).items()})
        return made[0]

    monkeypatch.setattr(trainer, "attach", capture)
    folder = trainer.train(base, options, settings, recs, out, **kw)
    return folder, made[0], made[1]


def prompt_ids(seed: int, length: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


@torch.no_grad()
def greedy(model, ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """The model's greedy continuation and the log-prob of every token after the first, by full
    forward passes (the logits' last rows: prompt tuning prepends its virtual ones)."""
    seq = list(ids)
    for _ in range(new_tokens):
        seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    logits = model(input_ids=torch.tensor([seq[:-1]])).logits[0, -(len(seq) - 1) :]
    lp = logits.float().log_softmax(-1)
    return seq[len(ids) :], lp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].tolist()


def served(settings: Settings, ids: list[int]):
    """The engine's greedy tokens and log-probs with the adapter "ft", and the base's log-probs
    of the prompt."""

    async def go(engine):
        with_adapter = await generate(engine, ids, "ft")  # NEW_TOKENS greedy tokens
        return with_adapter, await generate(engine, ids, None)

    ((tokens, lps, last), (_, base_lps, _)), _ = serve(settings, go)
    assert last.error is None, last.error
    return tokens, lps, base_lps[: len(ids) - 1]


def assert_served_equals_trained(
    model, settings: Settings, ids: list[int], rtol: float, atol: float, ties: bool = False
) -> None:
    """The engine's greedy tokens and log-probs with the adapter == the trained model's (eval
    mode: dropout off), and the adapter moves the base's prompt log-probs by several times the
    tolerance (so the check could fail). `ties`: greedy tokens may part at a near-tie (bf16);
    positions up to there are compared."""
    model.eval()
    want_tokens, want = greedy(model, ids, NEW_TOKENS)
    tokens, got, base = served(settings, ids)
    assert len(got) == len(want)
    assert len(tokens) == len(want_tokens) == NEW_TOKENS
    parted = [i for i, (a, b) in enumerate(zip(tokens, want_tokens, strict=True)) if a != b]
    same = parted[0] if parted else NEW_TOKENS
    if not ties:
        assert tokens == want_tokens
    elif same < len(tokens):  # parted: the two candidates are a near-tie for the trained model
        with torch.no_grad():
            context = torch.tensor([ids + want_tokens[:same]])
            lp = model(input_ids=context).logits[0, -1].float().log_softmax(-1)
        assert float(lp[want_tokens[same]] - lp[tokens[same]]) <= 2 * atol, same
    upto = len(ids) - 1 + same  # the log-probs of the prompt and of the common tokens
    for i, (g, w) in enumerate(zip(got[:upto], want[:upto], strict=True)):
        if g is None:  # prefix tuning: the first prompt token's successor has no log-prob
            assert i == 0
            continue
        assert abs(g - w) <= atol + rtol * abs(w), (i, g, w)
    prompt = zip(got[: len(base)], base, strict=True)
    moved = max(abs(g - b) for g, b in prompt if g is not None and b is not None)
    assert moved > 3 * (atol + rtol * max(abs(w) for w in want)), moved


# ---------------------------------------------------------------- 1. served = trained


@pytest.mark.parametrize("kind", list(KINDS))
def test_served_equals_trained(kind: str, tiny_dir: Path, tmp_path: Path, monkeypatch):
    """4 steps at lr 5e-2, then the adapter folder through the engine == the training model.

    fp32 everywhere (base, adapter, server's reference kernels): the two differ only in the
    order of their sums (fused vs split projections, the paged-attention kernel, the adapter
    applied as a separate low-rank product), ~1e-7 relative per op, which 2 layers and a
    log-softmax over 384 entries keep near 1e-6 of a log-prob (measured: at most 1e-6): held
    to 1e-5 absolute + 1e-5 relative, while the adapter moves the log-probs by 0.1 to 1.8."""
    options = KINDS[kind]
    base = load_training_base(base_settings(tiny_dir, tmp_path))
    folder, model, before = train_capturing(
        monkeypatch,
        base,
        options,
        train_settings(max_steps=4, n_epochs=2, learning_rate=5e-2),
        records(12, seed=1),
        tmp_path / "job",
    )
    after = trainable_state(model)
    moved = max((after[k] - before[k]).abs().max().item() for k in after)
    assert moved > 1e-2, moved  # the adapter is far from its init
    vocab = json.loads((tiny_dir / "config.json").read_text())["vocab_size"]
    settings = base_settings(
        tiny_dir,
        tmp_path,
        adapters=[f"ft={folder}"],
        max_adapter_rank=16,
        num_kv_blocks=256,
        compile="off",
    )
    assert_served_equals_trained(model, settings, prompt_ids(3, 11, vocab), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_served_equals_trained_on_int4(kind: str, tiny_dir: Path, tmp_path: Path, monkeypatch):
    """On an int4 base the training forward dequantizes the codes to bf16 and runs a dense bf16
    matmul; the server runs its int4 kernel (bf16 products, fp32 accumulation). Same weights,
    same dtypes, different kernels: both round activations to bf16 (8 bits of mantissa, ~4e-3
    relative) at every projection, so log-probs agree to a few bf16 ulps of a log-prob of ~6:
    3e-2 absolute (measured up to 1.6e-2). Greedy tokens may part where two candidates are
    that close; log-probs are compared over the prompt and the tokens before any parting."""
    options = KINDS[kind]
    settings = base_settings(tiny_dir, tmp_path, quantization="int4")
    base = load_training_base(settings)
    frozen = [m for m in base.model.modules() if isinstance(m, FrozenLinear)]
    assert len(frozen) == 15 and all(m.quantized for m in frozen)  # 2 layers x 7, the head
    folder, model, _ = train_capturing(
        monkeypatch,
        base,
        options,
        train_settings(max_steps=4, n_epochs=2, learning_rate=5e-2),
        records(12, seed=2),
        tmp_path / "job",
    )
    vocab = json.loads((tiny_dir / "config.json").read_text())["vocab_size"]
    serve_settings = base_settings(
        tiny_dir,
        tmp_path,
        quantization="int4",
        adapters=[f"ft={folder}"],
        max_adapter_rank=16,
        num_kv_blocks=256,
        compile="off",
    )
    ids = prompt_ids(4, 11, vocab)
    assert_served_equals_trained(model, serve_settings, ids, rtol=0.0, atol=3e-2, ties=True)


# ---------------------------------------------------------------- 2. one step = reference


def reference_peft_config(kind: str):
    """The peft config of each kind, written here (not through adapters.peft_config)."""
    lora = dict(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none")
    return {
        "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL, **lora),
        "dora": lambda: peft.LoraConfig(
            r=4,
            lora_alpha=8,
            use_dora=True,
            target_modules=["q_proj", "v_proj", "down_proj"],
            **lora,
        ),
        "rslora": lambda: peft.LoraConfig(
            r=8, lora_alpha=4, use_rslora=True, target_modules=ALL, **lora
        ),
        "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "ia3": lambda: peft.IA3Config(
            task_type="CAUSAL_LM",
            target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
        ),
    }[kind]()


REF_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu}


def reference_bottleneck(hf, options: BottleneckOptions, initial: dict[str, torch.Tensor]):
    """The LLM-Adapters math in hooks on transformers' Llama, trainable tensors of their own
    (a copy of `initial`): series on gate/up y = W(x + s U f(D x)), on down z = W x,
    y = z + s U f(D z); parallel y = W x + s U f(D x); s a number or a learned scalar."""
    params = {k: torch.nn.Parameter(v.clone()) for k, v in initial.items()}
    f = REF_ACTIVATIONS[options.non_linearity]

    def delta(module: str, u: torch.Tensor) -> torch.Tensor:
        h = F.linear(
            f(F.linear(u, params[f"{module}.adapter_down.weight"])),
            params[f"{module}.adapter_up.weight"],
        )
        s = params[f"{module}.adapter_scaling"] if options.scaling == "learned" else options.scaling
        return h * s

    modules = sorted({k.rsplit(".adapter_", 1)[0] for k in initial})
    for name in modules:
        target = hf.get_submodule(name)
        if options.kind == "parallel":
            target.register_forward_hook(lambda m, a, out, p=name: out + delta(p, a[0]))
        elif name.endswith("down_proj"):
            target.register_forward_hook(lambda m, a, out, p=name: out + delta(p, out))
        else:
            target.register_forward_pre_hook(lambda m, a, p=name: (a[0] + delta(p, a[0]),))
    return hf, params


def schedule(step: int, warmup: int, total: int) -> float:
    """transformers' linear warm-up then linear decay to 0, as a factor of the learning rate."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def reference_step(model, params, examples, pad_id: int, max_grad_norm: float) -> float:
    """Token-mean cross entropy over the whole batch (one forward, no micro-batches), backward,
    clip, AdamW step; the gradient norm before clipping."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -width:]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )
    loss.backward()
    return float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))


@pytest.mark.parametrize("kind", list(KINDS))
def test_one_step_equals_reference(kind: str, tiny_dir: Path, tmp_path: Path):
    """3 optimizer steps of `Run.step` (batches of 4 in micro-batches of 2; warm-up 1, so the
    first step's lr is 0 and only AdamW's moments move, then lr 1 and 1/2 of 2e-2; weight decay
    0.1; gradients clipped at 0.05, below their norm) == 3 steps of the reference from the same
    initial adapter tensors.

    Both are fp32 with the same math; they differ in summation order (micro-batches summed vs
    one batch, fused vs separate kernels): ~1e-7 of the gradients' scale. AdamW divides each
    entry's moment by its own root mean square, so an entry whose gradient is small next to that
    rounding (a cancelling sum) moves by lr * m / sqrt(v) with a relative error that is not small:
    such entries (a few in a thousand, measured up to 3e-4 of the lr) are held to 1e-3 * lr;
    every other entry to rtol 1e-5 / atol 1e-6."""
    options = KINDS[kind]
    settings = train_settings(
        warmup_steps=1, weight_decay=0.1, max_grad_norm=0.05, batch_size=4, micro_batch_size=2
    )
    base = load_training_base(base_settings(tiny_dir, tmp_path))
    torch.manual_seed(settings.seed)
    model = attach(base.model, options, base.model_dir)
    initial = {k: v.clone() for k, v in trainable_state(model).items()}
    examples = tokenize_all(records(12, seed=3), base.tokenizer, settings)
    assert len(examples) == 12
    pad_id = base.tokenizer.pad_token_id
    run = Run(model, options, settings, examples, [], pad_id, tmp_path / "job")
    batches = [list(range(i, i + 4)) for i in (0, 4, 8)]
    total = run.progress.total_steps
    assert total == 3

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    hf.requires_grad_(False)
    if isinstance(options, BottleneckOptions):
        reference, named = reference_bottleneck(hf, options, initial)
    else:
        reference = peft.get_peft_model(hf, reference_peft_config(kind))
        named = {n: p for n, p in reference.named_parameters() if p.requires_grad}
        assert set(named) == set(initial)
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(initial[name])
    reference.train()
    params = list(named.values())
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.1)

    for step, indices in enumerate(batches):
        run.step(indices)
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * schedule(step, 1, total)
        batch = [examples[i] for i in indices]
        norm = reference_step(reference, params, batch, pad_id, settings.max_grad_norm)
        assert norm > settings.max_grad_norm  # clipping is exercised
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ours = trainable_state(model)
    moved = max((ours[k] - initial[k]).abs().max().item() for k in ours)
    assert moved > 1e-2, moved  # the steps did move the adapter (the test can fail)
    strict = loose = 0
    for name, param in named.items():
        want = param.detach()
        # every entry within 1e-3 of one step's lr (see the docstring) ...
        torch.testing.assert_close(
            ours[name], want, rtol=1e-5, atol=1e-3 * settings.learning_rate, msg=name
        )
        # ... and all but a handful within fp32 noise
        close = torch.isclose(ours[name], want, rtol=1e-5, atol=1e-6)
        strict, loose = strict + int(close.sum()), loose + int((~close).sum())
    assert loose <= 1e-3 * (strict + loose), (loose, strict)


# ---------------------------------------------------------------- 3. resume, cancel

RESUME_KINDS = {
    "lora-dropout": LoraOptions(kind="lora", r=4, alpha=8, dropout=0.3, target_modules=ALL),
    "series-learned": KINDS["series-learned"],
    "prompt": KINDS["prompt"],
}


@pytest.mark.parametrize("kind", list(RESUME_KINDS))
def test_resumed_run_equals_uninterrupted(kind: str, tiny_dir: Path, tmp_path: Path):
    """6 steps (2 epochs of 3 batches; warm-up 2; checkpoint every 2) straight through, and the
    same run cancelled in step 5 (after the step-4 checkpoint) then resumed: the same adapter,
    bit for bit (same data order, AdamW moments, schedule and RNG: LoRA dropout 0.3 draws from
    the restored torch RNG), and the same losses for the steps after the checkpoint."""
    options = RESUME_KINDS[kind]
    settings = train_settings(n_epochs=2, warmup_steps=2, checkpoint_every=2)
    recs = records(12, seed=4)

    def fresh():
        return load_training_base(base_settings(tiny_dir, tmp_path))

    def losses(into: list):
        return lambda e: into.append(e["train_loss"]) if e["type"] == "metrics" else None

    straight: list[float] = []
    whole = trainer.train(fresh(), options, settings, recs, tmp_path / "a", emit=losses(straight))
    assert len(straight) == 6

    calls = []  # should_stop is asked before each micro-batch: 2 a step

    def stop_in_step_5() -> bool:
        calls.append(1)
        return len(calls) > 2 * 4 + 1

    first: list[float] = []
    with pytest.raises(Cancelled):
        trainer.train(
            fresh(),
            options,
            settings,
            recs,
            tmp_path / "b",
            emit=losses(first),
            should_stop=stop_in_step_5,
        )
    assert len(first) == 4 and not (tmp_path / "b" / "adapter").exists()
    assert trainer.latest_checkpoint(tmp_path / "b").name == "step-000004"
    resumed: list[float] = []
    events: list[dict] = []
    again = trainer.train(
        fresh(),
        options,
        settings,
        recs,
        tmp_path / "b",
        emit=lambda e: (events.append(e), losses(resumed)(e)),
    )
    assert any(e["type"] == "resumed" and e["step"] == 4 for e in events)
    assert first + resumed == straight
    want = load_file(str(whole / "adapter_model.safetensors"))
    got = load_file(str(again / "adapter_model.safetensors"))
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # the checkpoint's own servable adapter is not the final one (the steps after it counted)
    at4 = load_file(str(tmp_path / "b/checkpoints/step-000004/adapter/adapter_model.safetensors"))
    assert any(not torch.equal(at4[name], want[name]) for name in want)


def test_should_stop_cancels_the_run(tiny_dir: Path, tmp_path: Path):
    """`should_stop` true before the first micro-batch: Cancelled, no adapter, no checkpoint."""
    base = load_training_base(base_settings(tiny_dir, tmp_path))
    with pytest.raises(Cancelled):
        trainer.train(
            base,
            KINDS["lora"],
            train_settings(checkpoint_every=1),
            records(8, seed=5),
            tmp_path / "job",
            should_stop=lambda: True,
        )
    assert not (tmp_path / "job" / "adapter").exists()
    assert trainer.latest_checkpoint(tmp_path / "job") is None
