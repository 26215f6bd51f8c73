"""Adapters through the whole engine (registry -> pool -> scheduler -> model), on the reference
kernels path, fp32.

References are independent: real `peft` models loaded from the saved adapter directories (LoRA
with rsLoRA and rank/alpha patterns, IA3, prefix tuning, prompt tuning), and transformers with
the LLM-Adapters math in torch hooks (series, parallel). Logits are compared through log-probs
(prompt positions via prompt_logprobs, generated ones via logprobs) with fp32 tolerances
(differences are summation order only), and greedy tokens must be identical.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from adapterserve.adapters.spec import BaseFingerprint
from adapterserve.server.config import Settings
from adapterserve.server.engine.engine import Engine
from adapterserve.server.engine.errors import InvalidRequestError, ModelNotFoundError
from adapterserve.server.engine.sampling import SamplingParams
from tests.adapters.conftest import bottleneck_config
from tests.adapters.makers import bottleneck_dir, bottleneck_reference, hf_model, save_peft
from tests.engine.conftest import serve
from tests.helpers import make_tiny_llama

peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW_TOKENS = 8
MAX_RANK = 16


def peft_configs() -> dict:
    return {
        "lora-r8-rs": peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL),
        "lora-r4-pat": peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "o_proj"],
            rank_pattern={"o_proj": 2},
            alpha_pattern={"v_proj": 3},
        ),
        "ia3": peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        "prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "dora": peft.LoraConfig(
            r=4,
            lora_alpha=8,
            use_dora=True,
            target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
        ),
        "lora-embed-head": peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "k_proj"]
        ),
    }


BOTTLENECKS = {
    "series": bottleneck_config(bottleneck_size=6, non_linearity="tanh", scaling=0.5),
    "parallel": bottleneck_config(
        bottleneck_size=12,
        non_linearity="relu",
        scaling=2.0,
        use_parallel_adapter=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
    ),
    "series-learned": bottleneck_config(bottleneck_size=4, non_linearity="gelu", scaling="learned"),
}


class Adapters:
    """Every kind saved on one tiny base, with a reference model per adapter (and the base)."""

    def __init__(self, root: Path):
        self.root = root
        self.base_dir = make_tiny_llama(root / "base", seed=3)
        config = json.loads((self.base_dir / "config.json").read_text())
        self.fingerprint = BaseFingerprint.from_hf_config(config)
        self.vocab = config["vocab_size"]
        self.dirs: dict[str, Path] = {}
        self.references: dict[str, torch.nn.Module] = {"base": hf_model(self.base_dir)}
        for seed, (name, cfg) in enumerate(peft_configs().items()):
            # the embedding / head LoRA at 0.3 would swamp the base (one token repeated)
            scale = 0.1 if name == "lora-embed-head" else 0.3
            self.dirs[name] = save_peft(root / name, self.base_dir, cfg, seed, scale=scale)
            self.references[name] = peft.PeftModel.from_pretrained(
                hf_model(self.base_dir), str(self.dirs[name])
            ).eval()
        for seed, (name, cfg) in enumerate(BOTTLENECKS.items()):
            self.dirs[name] = bottleneck_dir(root / name, self.fingerprint, cfg, seed)
            self.references[name] = bottleneck_reference(self.base_dir, self.dirs[name])

    @property
    def names(self) -> list[str]:
        return list(self.dirs)

    def settings(self, tmp: Path, names: list[str] | None = None, **overrides) -> Settings:
        """An engine's settings with `names` (default: all) given as --adapter flags."""
        names = self.names if names is None else names
        overrides.setdefault("num_kv_blocks", 512)
        overrides.setdefault("model", str(self.base_dir))
        return Settings(
            device="cpu",
            cache_dir=tmp / "cache",
            adapters=[f"{n}={self.dirs[n]}" for n in names],
            max_adapter_rank=MAX_RANK,
            **overrides,
        )

    def greedy(self, name: str, ids: list[int]) -> tuple[list[int], list[float]]:
        """Reference greedy continuation and the log-prob of every token after the first
        (prompt tokens 1.., then each generated token), by full forward passes (no cache)."""
        model, seq = self.references[name], list(ids)
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
                seq.append(int(logits.argmax()))
            logits = model(input_ids=torch.tensor([seq[:-1]])).logits[0]
        logits = logits[-(len(seq) - 1) :]  # prompt tuning's output also has its virtual rows
        lp = logits.float().log_softmax(-1)
        return seq[len(ids) :], lp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].tolist()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Adapters:
    return Adapters(tmp_path_factory.mktemp("engine-adapters"))


def prompt(seed: int, length: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


async def generate(engine: Engine, ids: list[int], model: str | None, **params):
    """(tokens, logprobs of prompt tokens 1.. then generated tokens, last output)."""
    params = SamplingParams(
        max_tokens=NEW_TOKENS,
        temperature=0.0,
        ignore_eos=True,
        logprobs=0,
        prompt_logprobs=0,
        **params,
    )
    tokens, lps, prompt_lps, last = [], [], None, None
    async for out in engine.add_request(ids, params, model=model):
        tokens += out.token_ids
        lps += [lp.logprob for lp in out.logprobs]
        prompt_lps = out.prompt_logprobs if out.prompt_logprobs is not None else prompt_lps
        last = out
    assert last is not None and last.finished, last
    if last.error:
        return tokens, None, last
    assert prompt_lps is not None and len(prompt_lps) == len(ids)
    got = [None if lp is None else lp.logprob for lp in prompt_lps[1:]] + lps
    return tokens, got, last


def assert_matches(adapters: Adapters, name: str, ids, tokens, got) -> None:
    want_tokens, want_lps = adapters.greedy(name, ids)
    assert tokens == want_tokens, name
    assert len(got) == len(want_lps)
    for i, (g, w) in enumerate(zip(got, want_lps, strict=True)):
        if g is None:  # prefix tuning: no logprob for the first prompt token's successor
            assert name == "prefix" and i == 0
            continue
        assert abs(g - w) <= 2e-4 + 2e-4 * abs(w), (name, i, g, w)


def test_every_kind_matches_its_reference(adapters: Adapters, tmp_path: Path):
    """Each adapter alone (and the base) == peft / the LLM-Adapters math: log-probs and text."""
    cases = [(name, prompt(i, 9 + i, adapters.vocab)) for i, name in enumerate(adapters.names)]

    async def go(engine):
        return [await generate(engine, ids, name) for name, ids in cases]

    results, engine = serve(adapters.settings(tmp_path), go)
    base_ids = cases[0][1]
    base = adapters.greedy("base", base_ids)
    for (name, ids), (tokens, got, _) in zip(cases, results, strict=True):
        assert_matches(adapters, name, ids, tokens, got)
    assert adapters.greedy(adapters.names[0], base_ids) != base  # the adapter does act
    assert engine.allocator.num_used == 0


def test_mixed_batch_equals_each_alone(adapters: Adapters, tmp_path: Path):
    """Every kind twice plus base requests, concurrently (and through chunked prefill with a
    small token budget): the same tokens and log-probs as each request run alone."""
    settings = adapters.settings(tmp_path, max_num_batched_tokens=32, block_size=4)
    models = [*adapters.names, None, *adapters.names, None]
    cases = [(m, prompt(100 + i, 5 + (3 * i) % 17, adapters.vocab)) for i, m in enumerate(models)]
    assert len(cases) >= 8

    async def both(engine):
        together = await asyncio.gather(*[generate(engine, ids, m) for m, ids in cases])
        alone = [await generate(engine, ids, m) for m, ids in cases]
        return together, alone

    (mixed, single), engine = serve(settings, both)
    for (model, _), (t1, lp1, _), (t2, lp2, _) in zip(cases, mixed, single, strict=True):
        assert t1 == t2, model
        torch.testing.assert_close(
            torch.tensor([x or 0.0 for x in lp1]),
            torch.tensor([x or 0.0 for x in lp2]),
            atol=2e-4,
            rtol=2e-4,
        )
    steps = [{m for _, m in step} for step in engine.step_log]
    assert max(len(s) for s in steps) >= 6  # many adapters really shared steps
    assert engine.allocator.num_used == 0
    assert all(e.refs == 0 for e in engine.registry.list())


def test_eviction_with_few_slots_and_no_host_cache(adapters: Adapters, tmp_path: Path):
    """2 device slots, no host cache, 7 adapters requested concurrently and in turn: every one
    is served correctly; loads come from disk; slots are evicted LRU."""
    settings = adapters.settings(tmp_path, adapter_slots=2, host_adapter_cache=0)
    cases = [(name, prompt(200 + i, 7, adapters.vocab)) for i, name in enumerate(adapters.names)]

    async def go(engine):
        first = await asyncio.gather(*[generate(engine, ids, name) for name, ids in cases])
        again = [await generate(engine, ids, name) for name, ids in reversed(cases)]
        return first, again[::-1]

    (first, again), engine = serve(settings, go)
    for (name, ids), (t1, lp1, _), (t2, _, _) in zip(cases, first, again, strict=True):
        assert_matches(adapters, name, ids, t1, lp1)
        assert t1 == t2
    text = engine.metrics.render().decode()
    assert 'adapterserve_adapter_loads_total{source="disk"}' in text
    assert 'adapterserve_adapter_evictions_total{tier="device"}' in text
    assert engine.registry.tier_counts()["host"] == 0
    assert engine.allocator.num_used == 0


def stage_copy(engine: Engine, src: Path) -> Path:
    staging = engine.registry.store.new_staging()
    for f in src.iterdir():
        shutil.copy(f, staging / f.name)
    return staging


def test_uploads_survive_restart_and_replace_delete(adapters: Adapters, tmp_path: Path):
    settings = adapters.settings(tmp_path, names=[])
    ids = prompt(300, 8, adapters.vocab)

    async def first(engine):
        await asyncio.to_thread(
            engine.registry.add_upload, stage_copy(engine, adapters.dirs["lora-r8-rs"]), "up"
        )
        with pytest.raises(Exception, match="already exists"):
            engine.registry.add_upload(stage_copy(engine, adapters.dirs["ia3"]), "up")
        return await generate(engine, ids, "up")

    async def restarted(engine):  # the same store under cache_dir
        assert [e.name for e in engine.registry.list()] == ["up"]
        registry = engine.registry
        after = await generate(engine, ids, "up")
        await asyncio.to_thread(
            registry.add_upload, stage_copy(engine, adapters.dirs["ia3"]), "up", True
        )
        replaced = await generate(engine, ids, "up")
        await asyncio.to_thread(registry.remove, "up")
        with pytest.raises(ModelNotFoundError):
            await generate(engine, ids, "up")
        return after, replaced

    before, _ = serve(settings, first)
    (after, replaced), _ = serve(settings, restarted)
    assert after[0] == before[0]
    assert_matches(adapters, "lora-r8-rs", ids, after[0], after[1])
    assert_matches(adapters, "ia3", ids, replaced[0], replaced[1])
    assert not (tmp_path / "cache" / "adapters" / "up").exists()


def test_hot_swap_under_traffic(adapters: Adapters, tmp_path: Path):
    """Replace and delete `hot` in a loop while requests stream: every request is either
    refused when it is submitted (404, the adapter is deleted at that moment) or served on one
    version's weights exactly (tokens of version A or of version B, never a mix), never
    accepted and then failed; no deadlock; KV blocks and slot holds return to zero."""
    versions = {"lora-r8-rs": None, "series": None}
    ids = prompt(400, 6, adapters.vocab)
    for name in versions:
        versions[name] = tuple(adapters.greedy(name, ids)[0])
    stop = threading.Event()
    swaps = {"n": 0}

    def swapper(engine):
        order = ["lora-r8-rs", "series"]
        while not stop.is_set():
            src = order[swaps["n"] % 2]
            engine.registry.add_upload(stage_copy(engine, adapters.dirs[src]), "hot", replace=True)
            swaps["n"] += 1
            if swaps["n"] % 5 == 0:
                engine.registry.remove("hot")
                stop.wait(0.01)

    async def traffic(engine):
        engine.registry.add_upload(stage_copy(engine, adapters.dirs["series"]), "hot")
        thread = threading.Thread(target=swapper, args=(engine,))
        thread.start()
        outcomes = []
        try:
            for _ in range(6):
                batch = [generate(engine, ids, "hot") for _ in range(6)]
                for result in await asyncio.gather(*batch, return_exceptions=True):
                    outcomes.append(result)
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)
        return outcomes

    outcomes, engine = serve(adapters.settings(tmp_path, names=[], adapter_slots=3), traffic)
    finished = [o for o in outcomes if not isinstance(o, BaseException)]
    for o in outcomes:
        assert isinstance(o, ModelNotFoundError) or not isinstance(o, BaseException), o
    served = [tuple(tokens) for tokens, _, last in finished if not last.error]
    errors = [last.error for _, _, last in finished if last.error]
    assert served, "no request was served"
    assert all(t in versions.values() for t in served)  # one version's weights, never mixed
    assert not errors  # accepted requests are served on the version they were accepted for
    assert swaps["n"] >= 3
    assert engine.allocator.num_used == 0
    assert all(e.refs == 0 for e in engine.registry.list())
    # retired versions (replaced or deleted) are not listed: their slots' leases must be gone too
    assert all(holder is None or holder.refs == 0 for holder in engine.registry._slots)


@pytest.mark.parametrize("host_cache", [0, 64], ids=["on-disk", "on-host"])
def test_accepted_requests_survive_a_delete_or_replace(
    adapters: Adapters, tmp_path: Path, host_cache: int
):
    """Requests accepted for an adapter that is deleted (or replaced) before the engine admits
    them are served on the version they were accepted for, not failed after their response
    started; requests submitted after the delete are refused (404)."""
    ids = prompt(450, 7, adapters.vocab)
    admit = threading.Event()

    async def go(engine):
        registry = engine.registry
        acquire = registry.acquire

        def gated(entry):  # the engine thread waits here: no admission until `admit`
            admit.wait(60)
            return acquire(entry)

        registry.acquire = gated
        registry.add_upload(stage_copy(engine, adapters.dirs["lora-r8-rs"]), "gone")
        registry.add_upload(stage_copy(engine, adapters.dirs["series"]), "swapped")
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        held = [engine.add_request(ids, params, model=name) for name in ("gone", "swapped")]
        await asyncio.to_thread(registry.remove, "gone")
        new = stage_copy(engine, adapters.dirs["ia3"])
        await asyncio.to_thread(registry.add_upload, new, "swapped", True)
        with pytest.raises(ModelNotFoundError):
            engine.add_request(ids, params, model="gone")
        admit.set()  # admission happens only now
        results = []
        for stream in held:
            outs = [out async for out in stream]
            results.append((sum((o.token_ids for o in outs), []), outs[-1]))
        return results, await generate(engine, ids, "swapped")

    settings = adapters.settings(tmp_path, names=[], host_adapter_cache=host_cache)
    ((gone, swapped), replaced), engine = serve(settings, go)
    assert gone[1].error is None and swapped[1].error is None, (gone[1], swapped[1])
    assert gone[0] == adapters.greedy("lora-r8-rs", ids)[0]
    assert swapped[0] == adapters.greedy("series", ids)[0]
    assert replaced[0] == adapters.greedy("ia3", ids)[0]  # new requests get the new version
    assert engine.allocator.num_used == 0
    assert all(holder is None or holder.refs == 0 for holder in engine.registry._slots)


def test_unknown_adapter_is_refused(adapters: Adapters, tmp_path: Path):
    async def go(engine):
        with pytest.raises(ModelNotFoundError):
            await generate(engine, [5, 6, 7], "nope")

    serve(adapters.settings(tmp_path, names=["ia3"]), go)


def test_virtual_tokens_count_against_the_context(adapters: Adapters, tmp_path: Path):
    ids = prompt(500, 20, adapters.vocab)

    async def go(engine):
        with pytest.raises(InvalidRequestError, match="virtual tokens"):
            await generate(engine, ids, "prefix")  # 5 + 20 + 8 > 32
        return await generate(engine, ids[:15], "prefix")

    (tokens, got, last), _ = serve(
        adapters.settings(tmp_path, names=["prefix"], max_model_len=32), go
    )
    assert last.num_prompt_tokens == 15 and len(tokens) == NEW_TOKENS


def test_default_model_peft_parity(default_model_dir: Path, tmp_path: Path):
    """SmolLM2-135M with a LoRA (all targets, rsLoRA), a LoRA on its tied embeddings and LM head
    (peft's ensure_weight_tying), IA3, prefix and prompt tuning saved by peft: greedy text
    identical and log-probs close to peft's (fp32 through 30 layers: 1e-3)."""
    configs = {
        "lora": peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL),
        "embed-head": peft.LoraConfig(
            r=8,
            lora_alpha=16,
            ensure_weight_tying=True,
            target_modules=["embed_tokens", "lm_head", "v_proj"],
        ),
        "ia3": peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        "prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
        "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
    }
    dirs = {
        name: save_peft(tmp_path / name, default_model_dir, cfg, seed, scale=0.05)
        for seed, (name, cfg) in enumerate(configs.items())
    }
    settings = Settings(
        model=str(default_model_dir),
        device="cpu",
        cache_dir=tmp_path / "cache",
        adapters=[f"{n}={d}" for n, d in dirs.items()],
        max_adapter_rank=MAX_RANK,
        num_kv_blocks=256,
        max_model_len=1024,
    )
    text = []

    async def go(engine):
        text.extend(engine.tokenizer.encode("The three primary colors are"))
        models = [*dirs, None]
        return await asyncio.gather(*[generate(engine, text, m) for m in models])

    results, _ = serve(settings, go)
    outputs = {}
    for (name, directory), (tokens, got, _) in zip(dirs.items(), results[:-1], strict=True):
        reference = peft.PeftModel.from_pretrained(hf_model(default_model_dir), str(directory))
        reference.eval()
        seq = list(text)
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                seq.append(int(reference(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            logits = reference(input_ids=torch.tensor([seq[:-1]])).logits[0]
        assert tokens == seq[len(text) :], name
        lp = logits[-(len(seq) - 1) :].log_softmax(-1)
        want = lp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]
        mask = torch.tensor([g is not None for g in got])
        have = torch.tensor([g or 0.0 for g in got])
        torch.testing.assert_close(have[mask], want[mask], atol=1e-3, rtol=1e-3)
        outputs[name] = tokens
    assert len({tuple(t) for t in outputs.values()} | {tuple(results[-1][0])}) >= 3
