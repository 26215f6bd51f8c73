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

from adapters.formats import load_adapter  # noqa: E402
from adapters.hooks import PoolHooks  # noqa: E402
from adapters.pool import AdapterPool  # noqa: E402
from adapters.spec import AdapterKind, AdapterSpec, BaseFingerprint  # noqa: E402
from server.engine.kv_cache import BlockAllocator  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.scheduler import Scheduler, Sequence  # noqa: E402
from server.model.llama import KVCache, Transformer  # noqa: E402
from server.model.weights import load_model  # noqa: E402
from tests.adapters.conftest import bottleneck_config  # noqa: E402
from tests.adapters.makers import (  # noqa: E402
    bottleneck_dir,
    bottleneck_reference,
    hf_model,
    save_peft,
)
from tests.helpers import make_tiny_llama  # noqa: E402

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
        pool.load(slot, specs[name])
    model.hooks = PoolHooks(pool)
    return Setup(base_dir, model, fingerprint, specs, references, pool)


def prompt(seed: int, length: int, vocab: int) -> list[int]:
    return torch.randint(
        0, vocab, (length,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


def run(model: Transformer, requests: list[tuple[list[int], int]], budget: int = 512) -> list:
    """Logits at every prompt position of each (prompt, slot) request, all scheduled together
    under a per-step token budget (chunked prefill when it is small)."""
    block_size = 4
    cache = KVCache(model.args, 256, block_size, torch.float32, "cpu")
    scheduler = Scheduler(
        BlockAllocator(256, block_size), len(requests), budget, torch.device("cpu")
    )
    params = SamplingParams(prompt_logprobs=0)
    seqs = [Sequence(f"r{i}", p, params, "m", None, slot_id=s) for i, (p, s) in enumerate(requests)]
    rows: dict[Sequence, list[torch.Tensor]] = {seq: [] for seq in seqs}
    for seq in seqs:
        scheduler.add(seq)
    while scheduler.has_work():
        step = scheduler.schedule()
        logits, start = model(step.batch, cache), 0
        for seq, n in step.work:
            rows[seq].append(logits[start : start + n])
            start, seq.num_computed = start + n, seq.num_computed + n
            if seq.num_computed == len(seq.prompt_ids):
                scheduler.remove(seq)  # prompt done: no decode step needed
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
    """Storage of every allocated stack, by (family, layer, target)."""
    out: dict[tuple, tuple[int, ...]] = {}
    for family in ("post", "series_in", "series_out"):
        for key, s in getattr(pool, family).items():
            out[(family, *key)] = tuple(t.data_ptr() for t in (s.a, s.b, s.ranks, s.scalings))
    for family in ("ia3_in", "ia3_out"):
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
        pool.load(1, setup.specs[name])
    pointers = stack_pointers(pool)
    assert pointers
    for name in names:
        pool.load(1, setup.specs[name])  # replaces what slot 1 held
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
        AdapterPool(setup.fingerprint, 2, 4, "cpu", torch.float32).load(0, spec)
    other = dataclasses.replace(setup.fingerprint, hidden_size=32)
    with pytest.raises(ValueError, match="validated for base"):
        setup.pool.load(0, dataclasses.replace(spec, fingerprint=other))
    with pytest.raises(ValueError, match=r"expected an int in \[0, 8\), got 8"):
        setup.pool.load(8, spec)


def test_prefix_and_prompt_specs_only_record_their_kind(setup: Setup):
    pool = AdapterPool(setup.fingerprint, 2, MAX_RANK, "cpu", torch.float32)
    spec = setup.specs["lora-mlp"]
    for kind in (AdapterKind.PREFIX, AdapterKind.PROMPT):
        pool.load(0, dataclasses.replace(spec, kind=kind, modules={}, rank=0))
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


def test_hooks_skip_work_without_adapter_tokens(setup: Setup):
    """All-base batches, and batches whose slots touch no stack of a module, return the very
    tensors they were given (no op launched, no copy)."""
    from types import SimpleNamespace

    hooks = PoolHooks(setup.pool)
    x, y = torch.randn(3, 64), torch.randn(3, 32)
    base = SimpleNamespace(slot_ids=torch.full((3,), -1, dtype=torch.int32))
    assert hooks.pre(0, "q", x, base) is x and hooks.post(0, "k", x, y, base) is y
    lora_mlp = SimpleNamespace(
        slot_ids=torch.tensor([SLOTS["lora-mlp"], -1, -1], dtype=torch.int32)
    )
    assert hooks.pre(1, "q", x, lora_mlp) is x and hooks.post(1, "k", x, y, lora_mlp) is y
    assert hooks.post(1, "up", x, torch.randn(3, 128), lora_mlp).shape == (3, 128)


def test_fused_projections_take_one_adapter_op(setup: Setup, monkeypatch):
    """A batch of the LoRA and parallel adapters: q|k|v and gate|up each get one adapter op
    per layer over the pool's joint stack (n slices in one call), not one per target. (Series
    and IA3-input adapters act before gate|up, which then runs unfused, target by target.)"""
    import kernels

    calls = []
    real = kernels.add_delta

    def counting(y, u, a_stack, *args, **kwargs):
        calls.append(a_stack.dim())
        return real(y, u, a_stack, *args, **kwargs)

    monkeypatch.setattr(kernels, "add_delta", counting)
    vocab = setup.model.args.vocab_size
    names = ["lora-rslora-all", "lora-attn-patterns", "lora-mlp", "parallel"]
    run(setup.model, [(prompt(70 + SLOTS[name], 6, vocab), SLOTS[name]) for name in names])
    n_layers = setup.model.args.n_layers
    assert calls.count(4) == 2 * n_layers  # joint: q|k|v and gate|up, every layer
    assert not setup.pool.post_groups[(0, ("q", "k", "v"))].mixed


def test_post_fused_equals_target_by_target(setup: Setup):
    """The joint op == `post` on each slice (the path checked against peft above), on random
    inputs, for batches of every slot; a slot whose targets differ in scaling makes the whole
    batch go target by target, and still gives the same result."""
    from types import SimpleNamespace

    spec = setup.specs["lora-attn-patterns"]
    modules = dict(spec.modules)
    for (layer, target), w in spec.modules.items():
        if target == "v":  # an alpha pattern on v: q and v now differ in scaling
            modules[(layer, target)] = dataclasses.replace(w, scaling=w.scaling * 3)
    mixed_slot = len(SLOTS)
    pool = AdapterPool(setup.fingerprint, len(SLOTS) + 1, MAX_RANK, "cpu", torch.float32)
    for name, slot in SLOTS.items():
        pool.load(slot, setup.specs[name])
    pool.load(mixed_slot, dataclasses.replace(spec, name="mixed", modules=modules))
    group = pool.post_groups[(0, ("q", "k", "v"))]
    assert group.mixed == {mixed_slot} and mixed_slot in group.loaded
    hooks = PoolHooks(pool)
    fp = setup.fingerprint
    sizes = {("q", "k", "v"): tuple(fp.in_out(t)[1] for t in "qkv"),
             ("gate", "up"): (fp.intermediate_size,) * 2}  # fmt: skip
    g = torch.Generator().manual_seed(5)
    for slots in (list(SLOTS.values()), [*SLOTS.values(), mixed_slot, -1]):
        slot_ids = torch.tensor(slots * 2, dtype=torch.int32)
        T = slot_ids.numel()
        for layer in range(fp.num_layers):
            for targets, widths in sizes.items():
                batch = SimpleNamespace(slot_ids=slot_ids.clone())  # a fresh batch: new plan
                x = torch.randn(T, fp.hidden_size, generator=g)
                fused = torch.randn(T, sum(widths), generator=g)
                want, start = fused.clone(), 0
                for target, width in zip(targets, widths, strict=True):
                    want[:, start : start + width] = hooks.post(
                        layer, target, x, fused[:, start : start + width], batch
                    )
                    start += width
                got = hooks.post_fused(layer, targets, x, fused.clone(), widths, batch)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    pool.clear(mixed_slot)
    assert not group.mixed and mixed_slot not in group.loaded


def test_hooks_take_the_batch_slots_from_the_host(setup: Setup):
    """The scheduler's `adapter_slots` spares the hooks a device read per step: with slot ids
    on the meta device (no data to read), an all-base batch still passes untouched."""
    from types import SimpleNamespace

    hooks = PoolHooks(setup.pool)
    x = torch.randn(3, 64)
    batch = SimpleNamespace(slot_ids=torch.empty(3, dtype=torch.int32, device="meta"),
                            adapter_slots=frozenset())  # fmt: skip
    assert hooks.pre(0, "q", x, batch) is x
    sched = Scheduler(BlockAllocator(8, 4), 4, 16, torch.device("cpu"))
    for i, slot in enumerate([3, -1, 3, 1]):
        seq = Sequence(f"r{i}", [5, 6], SamplingParams(), "m", stream=None)
        seq.slot_id = slot
        sched.add(seq)
    assert sched.schedule().batch.adapter_slots == {1, 3}
