"""Our Llama vs transformers' own model: logits on random prompts, through prefill, chunked prefill
and decode over the paged cache. fp32 on both sides: differences are summation order only (~1e-5)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapterserve.server.engine.sampling import SamplingParams
from adapterserve.server.engine.scheduler import Sequence
from adapterserve.server.model.llama import ModelArgs, rope_inv_freq
from adapterserve.server.model.weights import load_model
from tests.helpers import Stepper, make_tiny_llama

CONFIGS = {
    "gqa-untied": {},
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "odd-sizes": dict(
        hidden_size=72,
        num_attention_heads=3,
        num_key_value_heads=1,
        intermediate_size=100,
        num_hidden_layers=3,
    ),
    "llama3-rope": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        rope_theta=500000.0,
    ),
    "qwen2-bias": dict(model_type="qwen2"),
}


def all_logits(model, prompt: list[int], chunk: int, block_size: int = 4) -> torch.Tensor:
    """Logits at every prompt position computed through the scheduler in chunks of `chunk` tokens."""
    stepper = Stepper(model.args, 64, block_size, 4, chunk)
    seq = Sequence("r", prompt, SamplingParams(prompt_logprobs=0), "m", stream=None)
    stepper.scheduler.add(seq)
    rows = []
    while seq.num_computed < len(prompt):
        plan, batch = stepper.step()
        rows.append(model(batch, stepper.cache))
        seq.num_computed += plan.work[0][1]
    return torch.cat(rows)


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_pair(request, tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp(request.param), **dict(CONFIGS[request.param]))
    ours = load_model(path, torch.device("cpu"), torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return ours, theirs


@pytest.mark.parametrize("chunk", [64, 5, 1])
def test_logits_match_transformers(model_pair, chunk):
    ours, theirs = model_pair
    prompt = torch.randint(
        0, ours.args.vocab_size, (23,), generator=torch.Generator().manual_seed(chunk)
    )
    got = all_logits(ours, prompt.tolist(), chunk)
    with torch.no_grad():
        want = theirs(prompt[None]).logits[0]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def prefix_logits(model, steps: list[tuple[int, list[Sequence]]]) -> dict:
    """Drive a scheduler (budget per step, sequences added before it) and collect every row's
    logits per request; sequences with `prefix_kv` get their virtual K/V placed at admission."""
    stepper = Stepper(model.args, 64, 4, 4, 1)
    rows: dict[str, list[torch.Tensor]] = {}
    work = []
    for budget, new in steps:
        for seq in new:
            stepper.scheduler.add(seq)
        stepper.scheduler.budget = budget
        step, batch = stepper.step()
        logits, row = model(batch, stepper.cache), 0
        for seq, n in step.work:
            rows.setdefault(seq.request_id, []).append(logits[row : row + n])
            row, seq.num_computed = row + n, seq.num_computed + n
        work.append(" ".join(f"{s.request_id}{n}" for s, n in step.work))
    return {"work": work, **{k: torch.cat(v) for k, v in rows.items()}}


def test_one_token_chunk_after_a_prefill_chunk_is_not_a_decode(model_pair):
    """A prefix-tuned prompt admitted with one token of budget left gets a one-token chunk with
    num_computed > 0 (its virtual tokens), after another sequence's prefill chunk. It is still a
    prefill: the model attends for decodes as q[:num_decodes], and calling it a decode mixed up
    rows (found as a flaky mixed-adapter engine test). A's rows must match transformers, C's
    the same prompt computed alone."""
    ours, theirs = model_pair
    g = torch.Generator().manual_seed(7)
    a, c = (torch.randint(0, ours.args.vocab_size, (n,), generator=g).tolist() for n in (5, 4))
    args = ours.args
    kv = torch.randn(args.n_layers, 2, 2, args.n_kv_heads, args.head_dim, generator=g)

    def seqs():
        seq_a = Sequence("A", a, SamplingParams(prompt_logprobs=0), "m", stream=None)
        seq_c = Sequence("C", [0, 0] + c, SamplingParams(prompt_logprobs=0), "m", stream=None)
        seq_c.num_virtual, seq_c.prefix_kv = 2, kv
        return seq_a, seq_c

    seq_a, seq_c = seqs()
    mixed = prefix_logits(ours, [(6, [seq_a, seq_c])])
    assert mixed["work"] == ["A5 C1"]
    alone = prefix_logits(ours, [(8, [seqs()[1]])])
    assert alone["work"] == ["C4"]
    torch.testing.assert_close(mixed["C"], alone["C"][:1], atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        want = theirs(torch.tensor([a])).logits[0]
    torch.testing.assert_close(mixed["A"], want, atol=2e-4, rtol=1e-4)


def test_llama3_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = CONFIGS["llama3-rope"]["rope_scaling"]
    cfg = LlamaConfig(
        hidden_size=64, num_attention_heads=4, rope_theta=500000.0, rope_scaling=scaling
    )
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    args = ModelArgs.from_hf_config(cfg.to_dict())
    torch.testing.assert_close(rope_inv_freq(args).float(), want.float())


def test_default_model_logits_match(default_model_dir):
    ours = load_model(default_model_dir, torch.device("cpu"), torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(
        str(default_model_dir), dtype=torch.float32
    ).eval()
    prompt = torch.randint(
        0, ours.args.vocab_size, (40,), generator=torch.Generator().manual_seed(0)
    )
    got = all_logits(ours, prompt.tolist(), chunk=16, block_size=16)
    with torch.no_grad():
        want = theirs(prompt[None]).logits[0]
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)


def run_batched(model, seqs: list[Sequence], budgets: list[int], num_blocks: int, outputs: int):
    """Drive the scheduler with a budget per step (cycled) until each sequence has `outputs`
    tokens; every row computed is kept as logits[(request, position)] (the last computation
    wins: preempted sequences recompute). Greedy tokens come from the batched logits."""
    stepper = Stepper(model.args, num_blocks, 4, 8, 1)
    scheduler = stepper.scheduler
    for seq in seqs:
        scheduler.add(seq)
    logits: dict[tuple[str, int], torch.Tensor] = {}
    preempted, shapes = 0, set()
    for i in range(2000):
        if not scheduler.has_work():
            break
        scheduler.budget = budgets[i % len(budgets)]
        scheduled = stepper.step()
        if scheduled is None:
            continue
        step, batch = scheduled
        preempted += len(step.preempted)
        shapes.add((batch.decode_block_tables.shape[0], len(batch.prefills)))
        out, row = model(batch, stepper.cache), 0
        for seq, n in step.work:
            for p in range(seq.num_computed, seq.num_computed + n):
                logits[(seq.request_id, p)] = out[row]
                row += 1
            seq.num_computed += n
            if seq.num_computed == seq.num_tokens:
                seq.output_ids.append(int(out[row - 1].argmax()))
                if len(seq.output_ids) == outputs:
                    scheduler.remove(seq)
    assert not scheduler.has_work(), "the scheduler made no progress"
    return logits, preempted, shapes


PREEMPTING_SEEDS = (3, 9, 12)  # with 8 KV blocks their draws run out of blocks


@pytest.mark.parametrize("seed", range(16))
def test_random_batches_equal_each_sequence_alone(model_pair, seed):
    """Random prompts (some prefix-tuned), random per-step budgets down to 1 token and, for
    some seeds, a KV cache small enough to preempt: every logit row computed in the batch equals
    the same sequence's row computed alone in one pass (fed the batch's greedy tokens)."""
    ours, _ = model_pair
    args = ours.args
    g = torch.Generator().manual_seed(100 + seed)

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=g))

    prefix_kv = torch.randn(
        args.n_layers,
        2,
        3,
        args.n_kv_heads,
        args.head_dim,
        generator=torch.Generator().manual_seed(seed),
    )
    seqs = []
    for i in range(randint(3, 7)):
        prompt = torch.randint(0, args.vocab_size, (randint(1, 18),), generator=g).tolist()
        with_prefix = randint(0, 2) == 0
        seq = Sequence(
            f"s{i}",
            [0] * 3 * with_prefix + prompt,
            SamplingParams(prompt_logprobs=0),
            "m",
            stream=None,
        )
        if with_prefix:
            seq.num_virtual, seq.prefix_kv = 3, prefix_kv
        seqs.append(seq)
    budgets = torch.randint(1, 13, (7,), generator=g).tolist()
    num_blocks = 8 if seed % 3 == 0 else 64  # 32 tokens: preemption for the larger draws
    logits, preempted, shapes = run_batched(ours, seqs, budgets, num_blocks, outputs=4)
    # The draws keep exercising what they are for: preemption, decodes beside prefill chunks
    # (but seed 12's: since a step that preempts admits nobody, its 8 blocks never hold a
    # decode beside a chunk; the other 15 draws cover that).
    assert preempted > 0 or seed not in PREEMPTING_SEEDS
    assert any(d and p for d, p in shapes) or seed == 12
    for seq in seqs:
        tokens = seq.prompt_ids + seq.output_ids[:-1]
        alone = Sequence("alone", tokens, SamplingParams(prompt_logprobs=0), "m", stream=None)
        alone.num_virtual, alone.prefix_kv = seq.num_virtual, seq.prefix_kv
        want, _, _ = run_batched(ours, [alone], [len(tokens)], 64, outputs=1)
        for p in range(seq.num_virtual, len(tokens)):
            torch.testing.assert_close(
                logits[(seq.request_id, p)],
                want[("alone", p)],
                atol=2e-5,
                rtol=1e-5,
                msg=f"{seq.request_id}@{p}",
            )
