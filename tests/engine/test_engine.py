"""Engine behaviour on the tiny random model: batching invariance, logprobs, sampling controls,
block accounting on every exit path, bounded queue, fault handling."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapterserve.server.engine.errors import EngineDeadError, QueueFullError
from adapterserve.server.engine.sampling import SamplingParams
from tests.engine.conftest import collect, serve

GREEDY = dict(temperature=0.0, ignore_eos=True)


def prompts(n: int, vocab: int = 384) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [
        torch.randint(
            3, vocab, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g
        ).tolist()
        for _ in range(n)
    ]


def alone_and_together(settings, ps, params):
    async def go(engine):
        alone = [(await collect(engine, p, params))[0] for p in ps]
        together = await asyncio.gather(*[collect(engine, p, params) for p in ps])
        assert engine.allocator.num_used == 0
        return alone, [t[0] for t in together]

    return serve(settings, go)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # plain continuous batching
        dict(max_num_batched_tokens=16),  # chunked prefill beside decodes
        dict(block_size=4, num_kv_blocks=32, max_model_len=128),  # preemption by KV pressure
        dict(max_num_seqs=3),  # admission waits for running sequences to finish
    ],
    ids=["default", "chunked", "preempt", "few-seqs"],
)
def test_batched_tokens_equal_alone(engine_settings, overrides):
    ps = prompts(10)
    params = SamplingParams(max_tokens=24, **GREEDY)
    (alone, together), _ = alone_and_together(engine_settings(**overrides), ps, params)
    assert together == alone
    assert all(len(t) == 24 for t in together)


def test_preemption_really_happens(engine_settings):
    settings = engine_settings(block_size=4, num_kv_blocks=32, max_model_len=128)
    _, engine = alone_and_together(settings, prompts(10), SamplingParams(max_tokens=24, **GREEDY))
    assert engine.metrics.preemptions._value.get() > 0


def test_greedy_matches_transformers_generate(engine_settings, tiny_model_dir):
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    ps = prompts(4)

    async def go(engine):
        return await asyncio.gather(
            *[collect(engine, p, SamplingParams(max_tokens=16, **GREEDY)) for p in ps]
        )

    results, _ = serve(engine_settings(), go)
    for p, (ids, _, _) in zip(ps, results, strict=True):
        want = hf.generate(torch.tensor([p]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert ids == want[0, len(p) :].tolist()


def test_prompt_logprobs_equal_transformers_log_softmax(engine_settings, tiny_model_dir):
    settings = engine_settings(max_num_batched_tokens=16)  # the prompt goes in several chunks
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    prompt = prompts(1)[0] + prompts(2)[1]

    async def go(engine):
        return await collect(engine, prompt, SamplingParams(max_tokens=0, prompt_logprobs=2))

    (ids, text, last), _ = serve(settings, go)
    assert ids == [] and text == "" and last.finish_reason == "length"
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)
    plp = last.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    got = torch.tensor([e.logprob for e in plp[1:]])
    want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    top_ids = [max(e.top, key=e.top.get) for e in plp[1:]]
    assert top_ids == ref[:-1].argmax(-1).tolist()


def test_generated_logprobs_are_the_chosen_tokens(engine_settings):
    async def go(engine):
        params = SamplingParams(max_tokens=6, logprobs=3, **GREEDY)
        return [o async for o in engine.add_request(prompts(1)[0], params)]

    outs, _ = serve(engine_settings(), go)
    lps = [lp for o in outs for lp in o.logprobs]
    assert [lp.token_id for lp in lps] == [t for o in outs for t in o.token_ids]
    for lp in lps:  # greedy: the chosen token is the top alternative, and there are 3
        assert len(lp.top) == 3 and max(lp.top, key=lp.top.get) == lp.token_id
        assert lp.logprob == pytest.approx(max(lp.top.values()))


def test_seeded_sampling_is_reproducible_in_any_batch(engine_settings):
    p = prompts(1)[0]
    params = SamplingParams(
        max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True
    )

    async def go(engine):
        alone = (await collect(engine, p, params))[0]
        others = [
            collect(engine, q, SamplingParams(max_tokens=12, temperature=1.0)) for q in prompts(5)
        ]
        together = await asyncio.gather(collect(engine, p, params), *others)
        other_seed = (await collect(engine, p, SamplingParams(**{**params.__dict__, "seed": 8})))[0]
        return alone, together[0][0], other_seed

    (alone, together, other_seed), _ = serve(engine_settings(), go)
    assert alone == together
    assert other_seed != alone


def test_stop_strings_min_tokens_and_eos(engine_settings):
    p = prompts(3)[2]

    async def go(engine):
        _, full_text, _ = await collect(engine, p, SamplingParams(max_tokens=30, **GREEDY))
        stop = full_text[5:8]
        _, cut, out = await collect(
            engine, p, SamplingParams(max_tokens=30, stop=(stop,), **GREEDY)
        )
        _, kept, _ = await collect(
            engine,
            p,
            SamplingParams(max_tokens=30, stop=(stop,), include_stop_str_in_output=True, **GREEDY),
        )
        eos_first = list(engine.tokenizer.eos_token_ids)[0]
        bias = ((eos_first, 100.0),)
        ids_eos, _, o_eos = await collect(
            engine, p, SamplingParams(max_tokens=10, temperature=0.0, logit_bias=bias)
        )
        ids_min, _, o_min = await collect(
            engine, p, SamplingParams(max_tokens=10, temperature=0.0, logit_bias=bias, min_tokens=4)
        )
        return full_text, stop, cut, out, kept, (ids_eos, o_eos), (ids_min, o_min)

    (full_text, stop, cut, out, kept, (ids_eos, o_eos), (ids_min, o_min)), _ = serve(
        engine_settings(), go
    )
    assert cut == full_text[: full_text.index(stop)] and out.finish_reason == "stop"
    assert kept == full_text[: full_text.index(stop) + len(stop)]
    assert len(ids_eos) == 1 and o_eos.finish_reason == "stop"  # EOS forced first, ends at once
    assert len(ids_min) == 5 and o_min.finish_reason == "stop"  # EOS banned for 4 tokens


def test_blocks_return_to_zero_after_aborts(engine_settings):
    async def go(engine):
        streams = [
            engine.add_request(p, SamplingParams(max_tokens=200, **GREEDY)) for p in prompts(8)
        ]
        for s in streams[:4]:
            await s.__anext__()
            s.abort()
        tasks = [asyncio.create_task(collect_stream(s)) for s in streams[4:]]
        await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()  # a disconnecting client cancels its consumer
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(100):
            if engine.allocator.num_used == 0 and not engine.scheduler.has_work():
                break
            await asyncio.sleep(0.05)
        return engine.allocator.num_used

    assert serve(engine_settings(), go)[0] == 0


async def collect_stream(stream):
    return [o async for o in stream]


def test_full_queue_raises_and_frees_nothing(engine_settings):
    async def go(engine):
        first = engine.add_request([5, 6, 7], SamplingParams(max_tokens=50, **GREEDY))
        second = engine.add_request([5, 6, 7], SamplingParams(max_tokens=50, **GREEDY))
        with pytest.raises(QueueFullError):
            engine.add_request([5, 6, 7], SamplingParams(max_tokens=5, **GREEDY))
        outs = await asyncio.gather(collect_stream(first), collect_stream(second))
        return outs, engine.allocator.num_used

    (outs, used), _ = serve(engine_settings(max_num_seqs=1, max_queue_len=1), go)
    assert all(o[-1].finish_reason == "length" for o in outs) and used == 0


def test_fatal_fault_fails_every_request_and_marks_unhealthy(engine_settings):
    fatal, calls = [], []

    async def go(engine):
        forward = engine.model.forward

        def flaky(*args, **kwargs):
            calls.append(1)
            if len(calls) > 3:
                raise RuntimeError("injected device fault")
            return forward(*args, **kwargs)

        engine.model.forward = flaky
        engine.on_fatal = fatal.append
        outs = await asyncio.gather(
            *[
                collect_stream(engine.add_request(p, SamplingParams(max_tokens=50, **GREEDY)))
                for p in prompts(4)
            ]
        )
        with pytest.raises(EngineDeadError):
            engine.add_request([5], SamplingParams())
        return outs

    outs, engine = serve(engine_settings(), go)
    assert all(
        o[-1].finish_reason == "error" and isinstance(o[-1].error, EngineDeadError) for o in outs
    )
    assert "injected" not in str(outs[0][-1].error)  # no internals leak to clients
    assert engine.allocator.num_used == 0 and not engine.healthy and len(fatal) == 1
