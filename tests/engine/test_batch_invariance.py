"""Batch invariance (issue 24, item 6): a token's log-prob does not depend on what else is in
the step, on how its prompt was chunked, or on a prefix-cache hit, bit for bit, for every
adapter kind on the fp32, int8 and int4 bases.

The yardstick is each request alone on an engine without prefix caching, its prompt in one
step. The sweep sends the same requests in random waves of concurrent ones (random adapters of
every kind and the base, prompts cut from shared stems, some repeated so that the cache hits)
to engines with the prefix cache on and a small random token budget (prompts go in chunks
whose sizes depend on what else is in the step), and compares with `torch.equal`: a matmul
whose reduction order depends on its number of rows fails it.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch

from adapterserve.server.engine.engine import Engine
from tests.engine.conftest import serve
from tests.engine.test_adapters_engine import Adapters
from tests.engine.test_prefix_cache import metric, run, shared_prefix_cases

pytest.importorskip("peft")

REQUESTS = 16


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Adapters:
    return Adapters(tmp_path_factory.mktemp("invariance-adapters"))


def assert_bitwise(got, want, what) -> None:
    """Tokens, generated log-probs and prompt log-probs identical, bit for bit."""
    (t1, lp1, p1), (t2, lp2, p2) = got, want
    assert t1 == t2, what
    assert torch.equal(torch.tensor(lp1), torch.tensor(lp2)), (what, lp1, lp2)
    assert (p1 is None) == (p2 is None), what
    if p1 is not None:
        assert p1 == p2, (what, p1, p2)  # floats from fp32 logits: == is bitwise here


def record_prefills(engine: Engine) -> dict[str, int]:
    """Counts, per request, the steps that computed a chunk of its prompt."""
    counts: dict[str, int] = {}
    schedule = engine.scheduler.schedule

    def recording():
        plan = schedule()
        for seq, _ in plan.work[plan.num_decodes :] if plan is not None else ():
            counts[seq.request_id] = counts.get(seq.request_id, 0) + 1
        return plan

    engine.scheduler.schedule = recording
    return counts


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_logprobs_are_bitwise_equal_alone_mixed_chunked_and_cached(
    adapters: Adapters, tmp_path: Path, quantization: str
):
    """16 requests over the base and every kind, each alone (cache off, whole prompt), then
    each twice in random waves of 2-8 concurrent ones on an engine with the prefix cache on and a
    random step budget of 16-28 tokens: every token and log-prob (prompt log-probs too, for a
    few) identical, bit for bit; the cache did hit, steps were shared, prompts were chunked."""
    rng = random.Random(quantization)
    models = [None, *adapters.names]  # every kind, each at least once
    cases = [
        (models[i % len(models)], ids)
        for i, (_, ids) in enumerate(shared_prefix_cases(adapters, REQUESTS, seed=11))
    ]
    with_prompt_lps = set(rng.sample(range(REQUESTS), 3))  # these prefill every prompt row
    common = dict(block_size=4, quantization=quantization, compile="off", max_model_len=64)

    def request(engine: Engine, i: int):
        model, ids = cases[i]
        return run(
            engine, ids, model, max_tokens=4, prompt_logprobs=0 if i in with_prompt_lps else None
        )

    async def alone(engine: Engine):
        return [await request(engine, i) for i in range(REQUESTS)]

    want, _ = serve(
        adapters.settings(tmp_path / "alone", enable_prefix_caching=False, **common), alone
    )

    async def waves(engine: Engine):
        prefills = record_prefills(engine)
        order = (
            rng.sample(range(REQUESTS), REQUESTS) * 2
        )  # each twice: the second can hit the cache
        got, start = [], 0
        while start < len(order):
            wave = order[start : start + rng.randint(2, 8)]
            got += zip(wave, await asyncio.gather(*[request(engine, i) for i in wave]), strict=True)
            start += len(wave)
        return got, prefills

    budget = rng.choice([16, 20, 24, 28])
    settings = adapters.settings(tmp_path / "mixed", max_num_batched_tokens=budget, **common)
    (got, prefills), engine = serve(settings, waves)
    for i, result in got:
        assert_bitwise(result, want[i], (quantization, budget, i, cases[i][0]))
    assert metric(engine, "adapterserve_prefix_cache_hits_total") > 0
    assert any(len(step) > 1 for step in engine.step_log)  # requests shared steps
    assert max(prefills.values()) > 1  # a prompt went in chunks
