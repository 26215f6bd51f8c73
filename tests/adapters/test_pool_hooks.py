"""AdapterPool + PoolHooks on our model against real peft (LoRA, IA3) and an independent torch
implementation of the LLM-Adapters bottleneck math (series, parallel); mixed-slot batches and
hot-swap. fp32 throughout: differences are summation order only."""

from __future__ import annotations

import os
import sys

# The Triton test runs on CPU through the interpreter, which must be on before triton is first
# imported (peft imports it); a triton already imported without it cannot run CPU tensors.
TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1" or "triton" not in sys.modules
TRITON_ON_CPU &= os.environ.setdefault("TRITON_INTERPRET", "1") == "1"

import dataclasses  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from adapterserve.adapters.formats import load_adapter  # noqa: E402
from adapterserve.adapters.hooks import PoolHooks  # noqa: E402
from adapterserve.adapters.kinds import kind_for  # noqa: E402
from adapterserve.adapters.pool import AdapterPool  # noqa: E402
from adapterserve.adapters.spec import AdapterKind, AdapterSpec, BaseFingerprint  # noqa: E402
from adapterserve.server.engine.sampling import SamplingParams  # noqa: E402
from adapterserve.server.engine.scheduler import Sequence  # noqa: E402
from adapterserve.server.model.llama import Transformer  # noqa: E402
from adapterserve.server.model.weights import load_model  # noqa: E402
from tests.adapters.conftest import bottleneck_config  # noqa: E402
from tests.adapters.makers import (  # noqa: E402
    bottleneck_dir,
    bottleneck_reference,
    hf_model,
    save_peft,
)
from tests.helpers import Stepper, make_tiny_llama  # noqa: E402

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

MAX_RANK = 16
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_CONFIGS = {
    "lora-rslora-all": peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL),
    "lora-attn-patterns": peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], rank_pattern={"o_proj": 2}
    ),
    "lora-mlp": peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=["gate_proj", "up_proj", "down_proj"]
    ),
    "ia3": peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    ),
    "ia3-up-input": peft.IA3Config(
        target_modules=["v_proj", "up_proj"], feedforward_modules=["up_proj"]
    ),
}
BOTTLENECK_CONFIGS = {
    "series": bottleneck_config(bottleneck_size=6, non_linearity="tanh", scaling=0.5),
    "parallel": bottleneck_config(
        bottleneck_size=4,
        non_linearity="relu",
        scaling=2.0,
        use_parallel_adapter=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
    ),
}
SLOTS = {name: slot for slot, name in enumerate([*PEFT_CONFIGS, *BOTTLENECK_CONFIGS])}


@dataclasses.dataclass
class Setup:
    base_dir: Path
    model: Transformer
    fingerprint: BaseFingerprint
    specs: dict[str, AdapterSpec]
    references: dict  # adapter name -> a transformers model computing the expected logits
    pool: AdapterPool  # every adapter loaded, at SLOTS[name]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("pool-hooks")
    base_dir = make_tiny_llama(root / "base")
    config = json.loads((base_dir / "config.json").read_text())
    fingerprint = BaseFingerprint.from_hf_config(config)
    dirs, references = {}, {}
    for seed, (name, peft_config) in enumerate(PEFT_CONFIGS.items()):
        dirs[name] = save_peft(root / name, base_dir, peft_config, seed)
        references[name] = peft.PeftModel.from_pretrained(
            hf_model(base_dir), str(dirs[name])
        ).eval()
    for seed, (name, bottleneck) in enumerate(BOTTLENECK_CONFIGS.items()):
        dirs[name] = bottleneck_dir(root / name, fingerprint, bottleneck, seed)
        references[name] = bottleneck_reference(base_dir, dirs[name])
    references["base"] = hf_model(base_dir)
    specs = {name: load_adapter(d, name, fingerprint, MAX_RANK) for name, d in dirs.items()}
    model = load_model(base_dir, torch.device("cpu"), torch.float32)
    pool = AdapterPool(fingerprint, len(SLOTS) + 1, MAX_RANK, "cpu", torch.float32)
    for name, slot in SLOTS.items():
        load(pool, slot, specs[name])
    model.hooks = PoolHooks(pool)
    return Setup(base_dir, model, fingerprint, specs, references, pool)


def load(pool: AdapterPool, slot: int, spec: AdapterSpec) -> None:
    """What the registry does: the spec's kind loads it into the slot."""
    kind_for(spec.kind).load(pool, slot, spec)


def prompt(seed: int, length: int, vocab: int) -> list[int]:
    return torch.randint(
        0, vocab, (length,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


def run(model: Transformer, requests: list[tuple[list[int], int]], budget: int = 512) -> list:
    """Logits at every prompt position of each (prompt, slot) request, all scheduled together
    under a per-step token budget (chunked prefill when it is small)."""
    stepper = Stepper(
        model.args, 256, 4, len(requests), budget, num_adapter_slots=model.hooks.pool.num_slots
    )
    params = SamplingParams(prompt_logprobs=0)
    seqs = [Sequence(f"r{i}", p, params, "m", None, slot_id=s) for i, (p, s) in enumerate(requests)]
    rows: dict[Sequence, list[torch.Tensor]] = {seq: [] for seq in seqs}
    for seq in seqs:
        stepper.scheduler.add(seq)
    while stepper.scheduler.has_work():
        plan, batch = stepper.step()
        logits, start = model(batch, stepper.cache), 0
        for seq, n in plan.work:
            rows[seq].append(logits[start : start + n])
            start, seq.num_computed = start + n, seq.num_computed + n
            if seq.num_computed == len(seq.prompt_ids):
                stepper.scheduler.remove(seq)  # prompt done: no decode step needed
    return [torch.cat(rows[seq]) for seq in seqs]


def expected(setup: Setup, name: str, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return setup.references[name](torch.tensor([ids])).logits[0]


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(SLOTS))
def test_adapter_matches_reference(setup: Setup, name: str):
    """LoRA (rsLoRA, patterns, ranks 2/4/8) and IA3 vs peft; series/parallel vs the torch math."""
    ids = prompt(SLOTS[name], 13, setup.model.args.vocab_size)
    (got,) = run(setup.model, [(ids, SLOTS[name])])
    want = expected(setup, name, ids)
    close(got, want)
    assert (got - expected(setup, "base", ids)).abs().max() > 1e-2  # the adapter does act


def test_base_tokens_untouched_with_hooks(setup: Setup):
    ids = prompt(99, 11, setup.model.args.vocab_size)
    (got,) = run(setup.model, [(ids, -1)])
    close(got, expected(setup, "base", ids))
    empty_slot = len(SLOTS)  # allocated, never loaded: acts as the base
    (got_empty,) = run(setup.model, [(ids, empty_slot)])
    close(got_empty, got)


def test_mixed_batch_matches_each_alone(setup: Setup):
    """Every kind in the pool plus base requests in one batch, and chunked over steps (budget 9),
    == each request run alone == its reference."""
    vocab = setup.model.args.vocab_size
    slots = [*SLOTS.values(), -1, SLOTS["lora-mlp"], -1, SLOTS["series"]]
    requests = [(prompt(100 + i, 4 + i, vocab), slot) for i, slot in enumerate(slots)]
    alone = [run(setup.model, [request])[0] for request in requests]
    for budget in (512, 9):
        together = run(setup.model, requests, budget)
        for got, want in zip(together, alone, strict=True):
            close(got, want)
    names = {slot: name for name, slot in SLOTS.items()} | {-1: "base"}
    for (ids, slot), got in zip(requests, alone, strict=True):
        close(got, expected(setup, names[slot], ids))


def stack_pointers(pool: AdapterPool) -> dict[tuple, tuple[int, ...]]:
    """Storage of every allocated stack, by (family, layer, site or target)."""
    out: dict[tuple, tuple[int, ...]] = {}
    for family in ("post", "series_in", "series_out"):
        for key, stacks in getattr(pool, family).items():
            for s in stacks.stacks():
                ptrs = tuple(t.data_ptr() for t in (s.a, s.b, s.ranks, s.scalings))
                out[(family, *key, s.rank)] = ptrs
    for family in ("ia3_in", "post_scale"):
        for key, s in getattr(pool, family).items():
            out[(family, *key)] = (s.vectors.data_ptr(),)
    return out


def test_hot_swap_follows_slot_contents(setup: Setup):
    pool = AdapterPool(setup.fingerprint, 2, MAX_RANK, "cpu", torch.float32)
    model = load_model(setup.base_dir, torch.device("cpu"), torch.float32)
    model.hooks = PoolHooks(pool)
    ids = prompt(7, 9, model.args.vocab_size)
    names = ["lora-rslora-all", "series", "ia3", "lora-attn-patterns", "parallel"]
    for name in names:  # allocate every stack these adapters use once
        load(pool, 1, setup.specs[name])
    pointers = stack_pointers(pool)
    assert pointers
    for name in names:
        load(pool, 1, setup.specs[name])  # replaces what slot 1 held
        assert pool.kind_of(1) is setup.specs[name].kind and pool.kind_of(0) is None
        (got,) = run(model, [(ids, 1)])
        close(got, expected(setup, name, ids))
        pool.clear(1)
        assert pool.kind_of(1) is None
        (cleared,) = run(model, [(ids, 1)])
        close(cleared, expected(setup, "base", ids))
    assert stack_pointers(pool) == pointers  # no reallocation, no new stacks


def test_load_refuses_what_does_not_fit(setup: Setup):
    spec = setup.specs["lora-rslora-all"]
    with pytest.raises(ValueError, match="expected rank <= 4, got 8"):
        load(AdapterPool(setup.fingerprint, 2, 4, "cpu", torch.float32), 0, spec)
    other = dataclasses.replace(setup.fingerprint, hidden_size=32)
    with pytest.raises(ValueError, match="validated for base"):
        load(setup.pool, 0, dataclasses.replace(spec, fingerprint=other))
    with pytest.raises(ValueError, match=r"expected an int in \[0, 8\), got 8"):
        load(setup.pool, 8, spec)


def test_prefix_and_prompt_specs_only_record_their_kind(setup: Setup):
    pool = AdapterPool(setup.fingerprint, 2, MAX_RANK, "cpu", torch.float32)
    spec = setup.specs["lora-mlp"]
    for kind in (AdapterKind.PREFIX, AdapterKind.PROMPT):
        load(pool, 0, dataclasses.replace(spec, kind=kind, modules={}, rank=0))
        assert pool.kind_of(0) is kind
        assert not any(
            stack.loaded
            for stack in [*pool.post.values(), *pool.series_in.values(), *pool.series_out.values()]
        )


def test_triton_interpreter_matches_reference(setup: Setup, monkeypatch):
    """One LoRA, one series and one parallel slot beside a base request through the Triton ops
    on CPU (TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    if not TRITON_ON_CPU:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    vocab = setup.model.args.vocab_size
    slots = [SLOTS["lora-attn-patterns"], SLOTS["series"], SLOTS["parallel"], -1]
    requests = [(prompt(200 + i, 4, vocab), slot) for i, slot in enumerate(slots)]
    want = run(setup.model, requests)
    monkeypatch.setenv("ADAPTERSERVE_KERNELS", "triton")
    got = run(setup.model, requests)
    for g, w in zip(got, want, strict=True):
        close(g, w)


def record_ops(monkeypatch, hooks: PoolHooks) -> list[tuple]:
    """Every adapter op the hooks launch, as (op, shapes of its weights, slices)."""
    calls: list[tuple] = []
    ops = hooks.ops

    class Recording:
        def add_delta(self, y, u, weights, batch, *slices):
            calls.append(("add_delta", tuple(weights.a.shape), tuple(map(tuple, slices))))
            return ops.add_delta(y, u, weights, batch, *slices)

        def ia3_scale(self, x, vectors, batch, loaded=None):
            calls.append(("ia3_scale", tuple(vectors.shape)))
            return ops.ia3_scale(x, vectors, batch, loaded)

    monkeypatch.setattr(hooks, "ops", Recording())
    return calls


def test_a_step_without_adapter_tokens_runs_no_hook(setup: Setup, monkeypatch):
    calls = record_ops(monkeypatch, setup.model.hooks)
    vocab = setup.model.args.vocab_size
    run(setup.model, [(prompt(50 + i, 5, vocab), -1) for i in range(3)])
    assert calls == []


def test_op_sequence_depends_on_the_pool_not_the_batch(setup: Setup, monkeypatch):
    """Batches of entirely different adapters (LoRA only; series and IA3; one parallel token
    beside base tokens) launch the very same ops with the same weights: what a compiled, captured
    decode step needs."""
    calls = record_ops(monkeypatch, setup.model.hooks)
    vocab = setup.model.args.vocab_size
    sequences = []
    for slots in (
        [SLOTS["lora-rslora-all"]] * 2,
        [SLOTS["series"], SLOTS["ia3"]],
        [SLOTS["parallel"], -1],
    ):
        calls.clear()
        run(setup.model, [(prompt(60 + i, 1, vocab), slot) for i, slot in enumerate(slots)])
        sequences.append(list(calls))
    assert sequences[0] and sequences[0] == sequences[1] == sequences[2]


def test_fused_projections_take_one_adapter_op(setup: Setup, monkeypatch):
    """With LoRA and parallel adapters (no input-side stack), q|k|v and gate|up each get one
    adapter op per layer over all their targets (n slices in one call), not one per target."""
    pool = AdapterPool(setup.fingerprint, 4, MAX_RANK, "cpu", torch.float32)
    model = load_model(setup.base_dir, torch.device("cpu"), torch.float32)
    model.hooks = PoolHooks(pool)
    names = ["lora-rslora-all", "lora-attn-patterns", "lora-mlp", "parallel"]
    for slot, name in enumerate(names):
        load(pool, slot, setup.specs[name])
    calls = record_ops(monkeypatch, model.hooks)
    vocab = model.args.vocab_size
    run(model, [(prompt(70 + slot, 6, vocab), slot) for slot in range(len(names))])
    slices = [shape[0] for op, shape, *_ in calls if op == "add_delta"]
    assert slices.count(3) == slices.count(2) == model.args.n_layers  # q|k|v, gate|up
    assert slices.count(1) == 2 * model.args.n_layers  # o, down


def test_fused_site_equals_target_by_target(setup: Setup):
    """The joint op over a site == each target's slice alone, on random inputs, for batches of
    every slot (decode rows and a prefill segment), including a slot whose targets differ in
    scaling (an alpha pattern: q and v scaled differently) and base rows."""
    from adapterserve.kernels import AdapterBatch

    spec = setup.specs["lora-attn-patterns"]
    modules = dict(spec.modules)
    for (layer, target), w in spec.modules.items():
        if target == "v":  # an alpha pattern on v: q and v now differ in scaling
            modules[(layer, target)] = dataclasses.replace(w, scaling=w.scaling * 3)
    mixed_slot = len(SLOTS)
    pool = AdapterPool(setup.fingerprint, len(SLOTS) + 1, MAX_RANK, "cpu", torch.float32)
    for name, slot in SLOTS.items():
        load(pool, slot, setup.specs[name])
    load(pool, mixed_slot, dataclasses.replace(spec, name="mixed", modules=modules))
    hooks = PoolHooks(pool)
    g = torch.Generator().manual_seed(5)
    slot_ids = [*SLOTS.values(), mixed_slot, -1, mixed_slot, mixed_slot, mixed_slot]
    batch = AdapterBatch.build(slot_ids, pool.num_slots, num_decode=len(slot_ids) - 3)
    for layer in range(setup.fingerprint.num_layers):
        for site in hooks.layer(layer).sites:
            for stack in site.post:
                x = torch.randn(len(slot_ids), stack.d_in, generator=g)
                y = torch.randn(len(slot_ids), sum(site.sizes), generator=g)
                got = hooks.ops.add_delta(y.clone(), x, stack, batch, site.offsets, site.sizes)
                want = y.clone()
                for i, (off, size) in enumerate(zip(site.offsets, site.sizes, strict=True)):
                    hooks.ops.add_delta(
                        want[:, off : off + size], x, stack.slice(i), batch, (0,), (size,)
                    )
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_structure_changes_whenever_a_stack_s_activations_change(setup: Setup):
    """A compiled step (a CUDA graph) is keyed by `pool.structure`, and whether a stack's
    activation runs is traced from its `codes`: loading a relu bottleneck into stacks that
    already exist, or clearing it, must change the structure although nothing is allocated."""
    pool = AdapterPool(setup.fingerprint, 2, MAX_RANK, "cpu", torch.float32)

    def codes() -> dict[tuple, tuple[int, ...]]:
        return {
            (key, stack.rank): stack.codes
            for table in (pool.post, pool.series_in, pool.series_out)
            for key, stacks in table.items()
            for stack in stacks.stacks()
        }

    load(pool, 1, setup.specs["parallel"])
    pool.clear(1)  # its stacks stay allocated, now without the relu
    quiet = codes()
    assert not any(quiet.values())
    for step in ("load", "clear"):
        before = pool.structure
        if step == "load":
            load(pool, 1, setup.specs["parallel"])
        else:
            pool.clear(1)
        now = codes()
        assert now.keys() == quiet.keys(), "nothing was allocated"
        assert (now != quiet) == (step == "load")
        assert pool.structure != before, step
