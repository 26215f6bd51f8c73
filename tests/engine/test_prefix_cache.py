"""Prefix caching through the whole engine: cached blocks change nothing but the work done.

The reference for every output is the same engine with `enable_prefix_caching=False` (which
never shares a block) and, for single requests, a fresh engine. Tokens must be identical;
log-probs agree to fp32 summation-order tolerance (a prompt prefilled in other chunk sizes, or
attending to cached K/V computed in another batch, rounds differently: ~1e-6, bounded at 2e-4 as
in the other engine parity tests).
"""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

import pytest
import torch

from adapterserve.server.engine.engine import Engine
from adapterserve.server.engine.sampling import SamplingParams
from tests.engine.conftest import serve
from tests.engine.test_adapters_engine import Adapters, prompt, stage_copy

pytest.importorskip("peft")

TOL = dict(atol=2e-4, rtol=2e-4)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Adapters:
    return Adapters(tmp_path_factory.mktemp("prefix-cache-adapters"))


async def run(
    engine: Engine,
    ids: list[int],
    model: str | None,
    max_tokens: int = 5,
    prompt_logprobs: int | None = None,
):
    """(tokens, generated log-probs, prompt log-probs or None) of a greedy request."""
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
        logprobs=0,
        prompt_logprobs=prompt_logprobs,
    )
    tokens, lps, prompt_lps = [], [], None
    async for out in engine.add_request(ids, params, model=model):
        assert out.error is None, out.error
        tokens += out.token_ids
        lps += [lp.logprob for lp in out.logprobs]
        prompt_lps = out.prompt_logprobs if out.prompt_logprobs is not None else prompt_lps
    plps = None if prompt_lps is None else [None if x is None else x.logprob for x in prompt_lps]
    return tokens, lps, plps


def metric(engine: Engine, name: str) -> float:
    """A sample of the engine's Prometheus text (what /metrics serves)."""
    text = engine.metrics.render().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, name
    return float(match.group(1))


def assert_same(a, b, what) -> None:
    (t1, lp1, p1), (t2, lp2, p2) = a, b
    assert t1 == t2, what
    torch.testing.assert_close(torch.tensor(lp1), torch.tensor(lp2), **TOL, msg=str(what))
    assert (p1 is None) == (p2 is None), what
    if p1 is not None:
        assert len(p1) == len(p2) and [x is None for x in p1] == [x is None for x in p2], what
        torch.testing.assert_close(
            torch.tensor([x or 0.0 for x in p1]),
            torch.tensor([x or 0.0 for x in p2]),
            **TOL,
            msg=str(what),
        )


def shared_prefix_cases(
    adapters: Adapters, count: int, seed: int
) -> list[tuple[str | None, list[int]]]:
    """Prompts cut from three stems (so that many share their first blocks, some are exact
    repeats) plus random tails, each for the base or a random adapter of any kind."""
    rng = random.Random(seed)
    stems = [prompt(seed * 10 + i, n, adapters.vocab) for i, n in enumerate((23, 14, 9))]
    cases = []
    for i in range(count):
        stem = rng.choice(stems)
        head = stem[: rng.randint(len(stem) // 2, len(stem))]
        tail = (
            prompt(seed * 1000 + i, rng.randint(0, 5), adapters.vocab) if rng.random() < 0.7 else []
        )
        cases.append((rng.choice([None, *adapters.names]), head + tail))
    return cases


def test_cache_on_equals_cache_off_over_every_kind_with_preemption_and_chunks(
    adapters: Adapters, tmp_path: Path
):
    """36 requests in three waves of 12 concurrent ones, over the base and every adapter kind,
    on a cache small enough to preempt and a step budget small enough to chunk prompts: the same
    tokens and log-probs with the prefix cache as without, and the cache did hit."""
    cases = shared_prefix_cases(adapters, 36, seed=1)
    with_prompt_lps = set(range(0, 36, 7))  # these never look up, and still register

    async def waves(engine):
        out = []
        for w in range(3):
            batch = list(enumerate(cases))[w * 12 : (w + 1) * 12]
            out += await asyncio.gather(
                *[
                    run(engine, ids, m, prompt_logprobs=0 if i in with_prompt_lps else None)
                    for i, (m, ids) in batch
                ]
            )
        return out

    small = dict(
        block_size=4, max_num_batched_tokens=24, num_kv_blocks=20, max_num_seqs=8, max_model_len=64
    )
    on, engine_on = serve(adapters.settings(tmp_path / "on", **small), waves)
    off, engine_off = serve(
        adapters.settings(tmp_path / "off", enable_prefix_caching=False, **small), waves
    )
    for i, (case, a, b) in enumerate(zip(cases, on, off, strict=True)):
        assert_same(a, b, (i, case[0]))
    hits = metric(engine_on, "adapterserve_prefix_cache_hits_total")
    assert hits >= 40 and engine_on.scheduler.prefix_hits == hits
    assert metric(engine_off, "adapterserve_prefix_cache_hits_total") == 0
    assert metric(engine_on, "adapterserve_preemptions_total") > 0
    assert metric(engine_off, "adapterserve_preemptions_total") > 0
    for engine in (engine_on, engine_off):
        a = engine.allocator
        assert a.num_used == 0 and a.num_free == a.num_blocks
        assert metric(engine, 'adapterserve_prefix_cache_blocks{state="used"}') == 0
    assert engine_on.allocator.num_cached > 0
    assert metric(engine_on, 'adapterserve_prefix_cache_blocks{state="cached"}') == (
        engine_on.allocator.num_cached
    )


def test_prompt_logprobs_are_complete_when_the_prefix_is_cached(adapters: Adapters, tmp_path: Path):
    """echo + logprobs (lm-evaluation-harness): a request asking for prompt log-probs after the
    same prompt was cached gets every prompt token's log-prob, equal to a cache-off engine's."""
    ids = prompt(700, 19, adapters.vocab)

    async def go(engine):
        await run(engine, ids, "lora-r8-rs")  # caches the prompt's blocks
        hits = engine.scheduler.prefix_hits
        got = await run(engine, ids, "lora-r8-rs", prompt_logprobs=1)
        return got, hits

    settings = dict(block_size=4)
    (got, hits_before), engine = serve(adapters.settings(tmp_path / "on", **settings), go)
    want, _ = serve(
        adapters.settings(tmp_path / "off", enable_prefix_caching=False, **settings),
        lambda e: run(e, ids, "lora-r8-rs", prompt_logprobs=1),
    )
    assert len(got[2]) == len(ids) and got[2][0] is None and None not in got[2][1:]
    assert_same(got, want, "prompt logprobs")
    assert engine.scheduler.prefix_hits == hits_before  # computed in full, not looked up


def test_no_block_is_shared_across_adapters_or_adapter_versions(adapters: Adapters, tmp_path: Path):
    """One prompt under the base, two adapters, then one adapter replaced: no request hits
    another's blocks (hits stay 0), and each output equals a fresh engine's; the same request
    repeated does hit."""
    ids = prompt(800, 21, adapters.vocab)
    settings = adapters.settings(tmp_path / "main", names=["lora-r8-rs", "series"], block_size=4)

    async def go(engine):
        out = {}
        for model in (None, "lora-r8-rs", "series"):
            out[model] = await run(engine, ids, model)
        cold = engine.scheduler.prefix_hits
        await asyncio.to_thread(
            engine.registry.add_upload, stage_copy(engine, adapters.dirs["ia3"]), "lora-r8-rs", True
        )
        out["replaced"] = await run(engine, ids, "lora-r8-rs")
        after_replace = engine.scheduler.prefix_hits
        out["again"] = await run(engine, ids, "lora-r8-rs")
        return out, cold, after_replace, engine.scheduler.prefix_hits

    (out, cold, after_replace, warm), _ = serve(settings, go)
    assert cold == 0 and after_replace == 0  # no sharing across weights
    assert warm == (len(ids) - 1) // 4 * 4  # the replaced version's own blocks are shared
    fresh = adapters.settings(
        tmp_path / "fresh", names=["lora-r8-rs", "series", "ia3"], block_size=4
    )

    async def reference(engine):
        return {m: await run(engine, ids, m) for m in (None, "lora-r8-rs", "series", "ia3")}

    want, _ = serve(fresh, reference)
    for model in (None, "lora-r8-rs", "series"):
        assert_same(out[model], want[model], model)
    assert_same(out["replaced"], want["ia3"], "replaced")
    assert_same(out["again"], want["ia3"], "again")
    assert out["replaced"][0] != out["lora-r8-rs"][0]  # the versions really differ


def test_a_thousand_requests_with_aborts_leave_only_cached_and_free_blocks(
    adapters: Adapters, tmp_path: Path
):
    """1000 random requests (shared prefixes, base and two adapters) in waves of 50 on a cache
    that evicts all the time, about a quarter aborted mid-stream: after every wave no block is
    in use, used + cached + free is the whole cache, and the metrics say the same."""
    rng = random.Random(5)
    stems = [prompt(900 + i, 40, adapters.vocab) for i in range(4)]
    settings = adapters.settings(
        tmp_path,
        names=["lora-r8-rs", "prefix"],
        block_size=4,
        num_kv_blocks=48,
        max_num_seqs=16,
        max_model_len=64,
    )

    async def one(engine: Engine, ids, model, max_tokens, abort_after):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        stream = engine.add_request(ids, params, model=model)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == abort_after:
                stream.abort()
                break

    async def go(engine: Engine):
        checks = []
        for _ in range(20):
            wave = []
            for _ in range(50):
                ids = rng.choice(stems)[: rng.randint(1, 40)] + prompt(
                    rng.randrange(10**6), rng.randint(0, 6), adapters.vocab
                )
                abort_after = rng.randint(1, 3) if rng.random() < 0.25 else 0
                model = rng.choice([None, "lora-r8-rs", "prefix"])
                wave.append(one(engine, ids, model, rng.randint(1, 6), abort_after))
            await asyncio.gather(*wave)
            for _ in range(200):  # aborts reach the engine thread through its inbox
                if not engine.scheduler.has_work():
                    break
                await asyncio.sleep(0.01)
            a = engine.allocator
            checks.append((a.num_used, a.num_cached + (a.num_free - a.num_cached), a.num_blocks))
        return checks

    checks, engine = serve(settings, go)
    assert all(used == 0 and free_or_cached == total for used, free_or_cached, total in checks)
    assert engine.allocator.evictions > 0 and engine.scheduler.prefix_hits > 0
    assert metric(engine, 'adapterserve_prefix_cache_blocks{state="used"}') == 0
    assert all(e.refs == 0 for e in engine.registry.list())


def test_each_request_reports_the_prompt_tokens_it_found_in_the_cache(
    adapters: Adapters, tmp_path: Path
):
    """usage.prompt_tokens_details.cached_tokens comes from here: 0 on a cold cache, every full
    block but the one holding the last prompt token on a repeat, 0 for another adapter's
    request (no block shared across weights), and never the prefix tuning's virtual tokens."""
    ids = prompt(900, 21, adapters.vocab)
    settings = adapters.settings(tmp_path / "main", names=["lora-r8-rs", "prefix"], block_size=4)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    async def cached(engine, model):
        last = None
        async for out in engine.add_request(ids, params, model=model):
            last = out
        return last.num_cached_tokens, last.num_prompt_tokens

    async def go(engine):
        return [
            await cached(engine, m)
            for m in (None, None, "lora-r8-rs", "lora-r8-rs", "prefix", "prefix")
        ]

    got, _ = serve(settings, go)
    full = (len(ids) - 1) // 4 * 4
    assert [c for c, _ in got[:4]] == [0, full, 0, full]
    assert all(n == len(ids) for _, n in got)
    (cold, _), (warm, _) = got[4], got[5]
    virtual = 5  # the prefix adapter's, in front of the prompt and in its first blocks
    assert cold == 0 and warm == (virtual + len(ids) - 1) // 4 * 4 - virtual
