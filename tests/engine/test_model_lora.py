"""LoRA on embed_tokens and lm_head through the whole engine, against peft.

peft's `Embedding` layer adds scaling * B @ A[:, token] to each token's embedding, and LoRA on
`lm_head` adds scaling * B A h to the logits; with tied embeddings peft keeps the base matrix
shared and, with `ensure_weight_tying`, ties the head's LoRA to the embedding's (both saved).
References are peft models loaded from the saved directories; log-probs are compared with fp32
tolerances (summation order only) and greedy tokens must be identical.
"""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path

import pytest
import torch

from adapterserve.adapters.errors import AdapterFormatError
from adapterserve.adapters.formats import load_adapter
from adapterserve.adapters.spec import BaseFingerprint
from adapterserve.server.config import Settings
from adapterserve.server.engine.sampling import SamplingParams
from tests.adapters.makers import hf_model, save_peft
from tests.engine.conftest import collect, serve
from tests.engine.test_adapters_engine import NEW_TOKENS, generate, prompt
from tests.helpers import make_tiny_llama

peft = pytest.importorskip("peft")


def configs(tied: bool) -> dict:
    made = {
        "embed-only-rs": peft.LoraConfig(
            r=16, lora_alpha=4, use_rslora=True, target_modules=["embed_tokens"]
        ),
        "head-pattern": peft.LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["lm_head", "v_proj"],
            rank_pattern={"lm_head": 2},
            alpha_pattern={"lm_head": 5},
        ),
        "embed-head": peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]
        ),
    }
    if tied:  # peft's two ways with a tied base: embeddings alone, or the head's LoRA tied to them
        made["tied-ensure"] = peft.LoraConfig(
            r=4, lora_alpha=8, ensure_weight_tying=True, target_modules=["embed_tokens", "o_proj"]
        )
    return made


class Base:
    def __init__(self, root: Path, tied: bool):
        self.dir = make_tiny_llama(root / "base", seed=5, tie_word_embeddings=tied)
        self.dirs: dict[str, Path] = {}
        self.references: dict[str, torch.nn.Module] = {}
        with warnings.catch_warnings():  # peft warns about tied layers and saved embeddings
            warnings.simplefilter("ignore")
            for seed, (name, cfg) in enumerate(configs(tied).items()):
                self.dirs[name] = save_peft(root / name, self.dir, cfg, seed + 40, scale=0.1)
                self.references[name] = peft.PeftModel.from_pretrained(
                    hf_model(self.dir), str(self.dirs[name])
                ).eval()
        self.vocab = hf_model(self.dir).config.vocab_size

    def settings(self, tmp: Path, **overrides) -> Settings:
        overrides.setdefault("num_kv_blocks", 256)
        return Settings(
            model=str(self.dir),
            device="cpu",
            cache_dir=tmp / "cache",
            adapters=[f"{n}={d}" for n, d in self.dirs.items()],
            max_adapter_rank=16,
            **overrides,
        )

    def greedy(self, name: str, ids: list[int]) -> tuple[list[int], list[float]]:
        model, seq = self.references[name], list(ids)
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            lp = model(input_ids=torch.tensor([seq[:-1]])).logits[0].float().log_softmax(-1)
        return seq[len(ids) :], lp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].tolist()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def base(request, tmp_path_factory) -> Base:
    return Base(tmp_path_factory.mktemp("model-lora"), tied=request.param)


def test_matches_peft_alone_and_mixed(base: Base, tmp_path: Path):
    """Each adapter alone == peft; all of them twice beside base requests, through chunked
    prefill, == each alone."""
    names = list(base.dirs)
    cases = [(n, prompt(70 + i, 6 + 3 * i, base.vocab)) for i, n in enumerate([*names, *names])]
    cases += [(None, prompt(90, 11, base.vocab))]

    async def plain(engine, ids, model):  # no prompt logprobs: logits of the last rows only
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        return (await collect(engine, ids, params, model))[0]

    async def go(engine):
        alone = [await generate(engine, ids, m) for m, ids in cases]
        mixed = await asyncio.gather(*[generate(engine, ids, m) for m, ids in cases])
        tokens = await asyncio.gather(*[plain(engine, ids, m) for m, ids in cases])
        return alone, mixed, tokens

    (alone, mixed, tokens_only), engine = serve(
        base.settings(tmp_path, max_num_batched_tokens=16, block_size=4), go
    )
    for (name, ids), (tokens, got, _) in zip(cases, alone, strict=True):
        if name is None:
            continue
        want_tokens, want = base.greedy(name, ids)
        assert tokens == want_tokens, name
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=2e-4, rtol=2e-4)
    for (name, _), (t1, lp1, _), (t2, lp2, _) in zip(cases, alone, mixed, strict=True):
        assert t1 == t2, name
        torch.testing.assert_close(torch.tensor(lp1), torch.tensor(lp2), atol=2e-4, rtol=2e-4)
    assert [t for t, _, _ in alone] == tokens_only
    assert max(len({m for _, m in step}) for step in engine.step_log) >= 3
    pool = engine.registry.pool
    assert pool.embed is not None and pool.head is not None


def test_adapters_act(base: Base):
    """Each adapter changes the reference's output from the base's: a test of it can fail."""
    ids = prompt(5, 9, base.vocab)
    plain = hf_model(base.dir)
    with torch.no_grad():
        want = plain(input_ids=torch.tensor([ids])).logits
        for name, model in base.references.items():
            assert (model(input_ids=torch.tensor([ids])).logits - want).abs().max() > 1e-2, name


@pytest.mark.parametrize("base", [True], indirect=True, ids=["tied"])
def test_tied_head_lora_is_the_embeddings(base: Base):
    """With ensure_weight_tying peft saves the head's LoRA as the embedding's, transposed and
    swapped; the reader serves both as saved."""
    fingerprint = BaseFingerprint.from_hf_config(hf_model(base.dir).config.to_dict())
    spec = load_adapter(base.dirs["tied-ensure"], "t", fingerprint, max_rank=16)
    embed, head = spec.model_modules["embed_tokens"], spec.model_modules["lm_head"]
    assert torch.equal(head.a, embed.b.t()) and torch.equal(head.b, embed.a.t())
    assert spec.targets[-2:] == ("embed_tokens", "lm_head")


def test_dora_on_the_head_is_refused(tmp_path: Path):
    base_dir = make_tiny_llama(tmp_path / "base", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        directory = save_peft(
            tmp_path / "d",
            base_dir,
            peft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "lm_head"]),
            seed=1,
        )
    fingerprint = BaseFingerprint.from_hf_config(hf_model(base_dir).config.to_dict())
    with pytest.raises(AdapterFormatError, match="DoRA on embed_tokens / lm_head is not served"):
        load_adapter(
            directory,
            "d",
            fingerprint,
            max_rank=16,
            base_weight=lambda layer, target: torch.ones(64, 64),
        )
