"""The compiled decode step (server/model/compiled.py) against the eager step: the same logits
on random decode batches (base rows, adapters of every kind, padding rows), no recompilation
while the batch changes, and the engine's fallback and cache. fp32: compiled kernels reorder
sums (and fuse the RMSNorm/rope math), so logits agree to fp32 round-off accumulated over the
layers, not bit for bit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from adapterserve.server.config import Settings
from adapterserve.server.engine.sampling import SamplingParams
from adapterserve.server.engine.scheduler import Sequence
from adapterserve.server.model.compiled import CompiledDecode
from tests.adapters.test_pool_hooks import SLOTS, Setup, prompt, setup  # noqa: F401
from tests.engine.conftest import serve
from tests.helpers import Stepper

ATOL, RTOL = 2e-4, 2e-4  # fp32 logits of a random 2-layer model: |logit| ~ 1-5


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


class Decoder:
    """A Stepper whose decode-only steps run both eagerly and compiled (same cache)."""

    def __init__(self, pool_setup: Setup, buckets: tuple[int, ...] | None) -> None:
        self.model = pool_setup.model
        self.stepper = Stepper(
            self.model.args, 256, 4, 8, 64, num_adapter_slots=pool_setup.pool.num_slots
        )
        self.compiled = CompiledDecode(
            self.model, self.stepper.cache, self.stepper.builder, buckets
        )

    def add(self, ids: list[int], slot: int, name: str) -> Sequence:
        seq = Sequence(name, ids, SamplingParams(), "m", None, slot_id=slot)
        self.stepper.scheduler.add(seq)
        return seq

    def step(self, check: bool = True) -> int:
        """One step; decode-only steps are compared (compiled vs eager). Returns its decodes."""
        plan = self.stepper.scheduler.schedule()
        eager = self.model(self.stepper.builder.build(plan), self.stepper.cache)
        D = plan.num_decodes
        if check and len(plan.work) == D:
            batch = self.stepper.builder.build(plan, self.compiled.pad_to(D), dense=True)
            got = self.compiled.forward(batch)
            assert got.shape[0] == (self.compiled.pad_to(D) or D)
            torch.testing.assert_close(got[:D], eager[:D], atol=ATOL, rtol=RTOL)
        row = 0
        for seq, n in plan.work:
            seq.num_computed += n
            if seq.num_computed == seq.num_tokens:
                seq.output_ids.append(int(eager[row].argmax()))
                row += 1
        return D if len(plan.work) == D else 0


SLOT_CHOICES = [*SLOTS.values(), -1]


@pytest.mark.parametrize("buckets", [None, (3, 8)], ids=["dynamic", "padded"])
def test_compiled_decode_equals_eager(setup: Setup, buckets) -> None:  # noqa: F811
    """Random decode batches over every adapter kind and base rows: same logits. `padded`
    pads each step to a bucket (padding rows: slot -1, K/V into the trash block)."""
    g = torch.Generator().manual_seed(3)
    decoder = Decoder(setup, buckets)
    vocab = setup.model.args.vocab_size
    for i in range(6):
        slot = SLOT_CHOICES[int(torch.randint(len(SLOT_CHOICES), (1,), generator=g))]
        decoder.add(prompt(i, 3 + i, vocab), slot, f"s{i}")
    decodes = sum(decoder.step() for _ in range(12))
    assert decodes >= 6 * 8  # most steps were decode-only, and compared


def test_no_recompilation_while_the_batch_changes(setup: Setup) -> None:  # noqa: F811
    """After the first steps of each variant (no adapter, adapters), 50 decode steps whose
    adapter mix, batch size and context lengths change compile nothing new. fullgraph=True:
    a graph break would have raised."""
    torch._dynamo.reset()
    decoder = Decoder(setup, None)
    vocab = setup.model.args.vocab_size
    for i, slot in enumerate([-1, -1, SLOTS["lora-rslora-all"]]):
        decoder.add(prompt(40 + i, 4, vocab), slot, f"warm{i}")
    for _ in range(4):  # prefill, then decode steps of 3 rows with and without adapters
        decoder.step(check=False)
    decoder.stepper.scheduler.remove(decoder.stepper.scheduler.running[-1])
    decoder.step(check=False)  # 2 rows, no adapter
    compiled_so_far = graphs()
    assert compiled_so_far > 0
    g = torch.Generator().manual_seed(11)
    steps = 0
    while steps < 50:
        running = decoder.stepper.scheduler.running
        if len(running) > 2 and int(torch.randint(3, (1,), generator=g)) == 0:
            decoder.stepper.scheduler.remove(
                running[int(torch.randint(len(running), (1,), generator=g))]
            )
        if len(running) < 7:
            slot = SLOT_CHOICES[int(torch.randint(len(SLOT_CHOICES), (1,), generator=g))]
            decoder.add(prompt(100 + steps, 2, vocab), slot, f"n{steps}")
            decoder.step(check=False)  # its prefill runs eagerly
        steps += bool(decoder.step(check=False))
    assert graphs() == compiled_so_far, "a decode step recompiled"


def engine_tokens(
    model_dir: Path, tmp_path: Path, compile: str, prompts, quantization: str = "auto"
) -> tuple[list, object]:
    settings = Settings(
        model=str(model_dir),
        device="cpu",
        num_kv_blocks=128,
        max_model_len=256,
        cache_dir=tmp_path,
        compile=compile,
        quantization=quantization,
    )
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)

    async def go(engine):
        async def one(ids):
            return [t async for out in engine.add_request(ids, params) for t in out.token_ids]

        return await asyncio.gather(*[one(p) for p in prompts])

    return serve(settings, go)


def test_default_model_greedy_text_identical(default_model_dir: Path, tmp_path: Path) -> None:
    prompts = [[1, 504, 3458, 282, 4649, 314], [2, 9519, 29], [7, 7, 7, 7, 7, 7, 7, 7, 11]]
    eager, _ = engine_tokens(default_model_dir, tmp_path / "eager", "off", prompts)
    compiled, engine = engine_tokens(default_model_dir, tmp_path / "compiled", "on", prompts)
    assert engine.compiled is not None, "the decode step did not compile"
    assert compiled == eager
    assert any((tmp_path / "compiled" / "inductor").rglob("*")), "no inductor cache written"


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_a_quantized_base_compiles_to_the_same_tokens(
    tiny_model_dir: Path, tmp_path: Path, quantization
) -> None:
    """torch's weight-only kernels inside the compiled block: the same greedy tokens as eager."""
    prompts = [[1, 50, 34, 28, 46, 31], [2, 95, 29], [7, 7, 7, 7, 7, 7, 7, 7, 11]]
    eager, _ = engine_tokens(tiny_model_dir, tmp_path / "eager", "off", prompts, quantization)
    compiled, engine = engine_tokens(
        tiny_model_dir, tmp_path / "compiled", "on", prompts, quantization
    )
    assert engine.compiled is not None and engine.model.quantization == quantization
    assert compiled == eager


def test_a_failing_compiled_step_falls_back_to_eager(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    prompts = [[5, 17, 99], [42] * 7]
    eager, _ = engine_tokens(tiny_model_dir, tmp_path / "eager", "off", prompts)

    def broken(self, batch):
        raise RuntimeError("injected compile failure")

    monkeypatch.setattr(CompiledDecode, "warm_up", lambda self: (0, 0.0))
    monkeypatch.setattr(CompiledDecode, "forward", broken)
    got, engine = engine_tokens(tiny_model_dir, tmp_path / "broken", "on", prompts)
    assert got == eager and engine.compiled is None
    assert sum("running eagerly from now on" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("buckets", [None, (3, 8)], ids=["dynamic", "padded"])
def test_an_activation_adapter_loaded_into_a_warm_rank_class(setup: Setup, buckets) -> None:  # noqa: F811
    """The step is compiled (and, padded, bucketed as CUDA graphs are) while its rank classes
    hold only a LoRA; then a relu bottleneck joins the same classes: the compiled step must apply
    its activation, as the eager one does (on CUDA a graph replayed from before would not: the
    pool's structure changes with the stacks' activations, issue 28)."""
    import dataclasses

    from adapterserve.adapters.hooks import PoolHooks
    from adapterserve.adapters.kinds import kind_for
    from adapterserve.adapters.pool import AdapterPool

    pool = AdapterPool(setup.fingerprint, 2, setup.pool.max_rank, "cpu", torch.float32)
    parallel, lora = setup.specs["parallel"], setup.specs["lora-attn-patterns"]
    kind_for(parallel.kind).load(pool, 0, parallel)
    pool.clear(0)  # its stacks stay allocated: the relu leaves them
    kind_for(lora.kind).load(pool, 0, lora)
    saved = setup.model.hooks
    setup.model.hooks = PoolHooks(pool)
    try:
        decoder = Decoder(dataclasses.replace(setup, pool=pool), buckets)
        vocab = setup.model.args.vocab_size
        decoder.add(prompt(60, 4, vocab), 0, "lora")
        assert sum(decoder.step() for _ in range(4)) >= 3  # compiled and compared, LoRA only
        structure = pool.structure
        kind_for(parallel.kind).load(pool, 1, parallel)
        assert pool.structure != structure
        decoder.add(prompt(61, 4, vocab), 1, "relu")
        assert sum(decoder.step() for _ in range(6)) >= 8  # both rows, compared
    finally:
        setup.model.hooks = saved
