"""The output processor without a model: a fake tokenizer, hand-made logits, and steps driven
as Engine.step drives them (num_computed counts the step's tokens, then `process`)."""

from __future__ import annotations

import pytest
import torch

from adapterserve.server.engine.errors import EngineDeadError
from adapterserve.server.engine.output import OutputProcessor, RequestOutput
from adapterserve.server.engine.sampling import SamplingParams
from adapterserve.server.engine.scheduler import Sequence, StepPlan

PIECES = ["", "a", "b", "c", "S", "T", "OP", " ", "z"]  # id 0: EOS, decoded as nothing
V = len(PIECES)
EOS, A, B, C, S, T, OP, SPACE, Z = range(V)


class FakeTokenizer:
    eos_token_ids = frozenset({EOS})

    def decode(self, ids: list[int]) -> str:
        return "".join(PIECES[i] for i in ids)


def peaked(token: int, others: float = 0.0) -> torch.Tensor:
    """A logits row whose greedy pick is `token` (by 5 nats), then the lower ids."""
    row = torch.full((V,), others) - torch.arange(V) * 0.01  # (V,)
    row[token] = others + 5.0
    return row


def new_seq(prompt=(A, B), name="r", **params) -> Sequence:
    return Sequence(name, list(prompt), SamplingParams(**params), "m", None)


class Driver:
    """Prefill (one chunk, or the given chunk sizes) then decode steps, with chosen logits."""

    def __init__(self, max_model_len: int = 64) -> None:
        self.proc = OutputProcessor(FakeTokenizer(), max_model_len)

    def add(self, *seqs: Sequence) -> None:
        for seq in seqs:
            self.proc.add(seq)

    def step(self, work: list[tuple[Sequence, int]], logits: torch.Tensor) -> list[RequestOutput]:
        for seq, n in work:
            seq.num_computed += n
        decodes = sum(1 for seq, n in work if n == 1 and seq.output_ids)
        plan = StepPlan(tuple(work), decodes)
        return [out for _, out in self.proc.process(plan, logits)]

    def run(self, seq: Sequence, tokens: list[int]) -> list[RequestOutput]:
        """Greedy picks `tokens` in turn (the first at the end of the prefill) until it ends."""
        self.add(seq)
        outs = self.step([(seq, len(seq.prompt_ids))], peaked(tokens[0])[None])
        for token in tokens[1:]:
            if outs[-1].finished:
                break
            outs += self.step([(seq, 1)], peaked(token)[None])
        return outs


def joined(outs: list[RequestOutput]) -> tuple[list[int], str]:
    return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs)


# ---- sampling -------------------------------------------------------------------------------
def test_greedy_temperature_and_seeded_rows_in_one_batch():
    driver = Driver()
    greedy = new_seq(name="g", temperature=0.0, max_tokens=4)
    seeded = [new_seq(name=f"s{i}", temperature=1.0, seed=7, max_tokens=4) for i in range(2)]
    other = new_seq(name="o", temperature=1.0, seed=8, max_tokens=4)
    seqs = [greedy, *seeded, other]
    driver.add(*seqs)
    flat = torch.zeros(V)  # uniform: only the generator decides a sampled row
    rows = torch.stack([peaked(C), flat, flat, flat])
    outs = driver.step([(s, len(s.prompt_ids)) for s in seqs], rows)
    picks = [o.token_ids[0] for o in outs]
    assert picks[0] == C
    assert picks[1] == picks[2]  # same seed, same logits: same draw, whatever the batch
    alone = Driver()
    again = new_seq(name="again", temperature=1.0, seed=7, max_tokens=4)
    alone.add(again)
    assert alone.step([(again, 2)], flat[None])[0].token_ids == [picks[1]]
    draws = set()
    for seed in range(20):
        d, s = Driver(), new_seq(temperature=1.0, seed=seed, max_tokens=1)
        d.add(s)
        draws.add(d.step([(s, 2)], flat[None])[0].token_ids[0])
    assert len(draws) > 3  # a temperature row really samples


def test_top_k_one_is_greedy_and_logprobs_are_the_models():
    driver = Driver()
    seq = new_seq(temperature=1.0, top_k=1, logprobs=2, max_tokens=3)
    row = peaked(B)
    out = driver.run(seq, [B])[0]
    assert out.token_ids == [B]
    lp = out.logprobs[0]
    want = row.log_softmax(-1)
    assert lp.token_id == B and lp.logprob == pytest.approx(float(want[B]))
    assert list(lp.top) == want.topk(2).indices.tolist()


def test_penalties_and_logit_bias_change_the_pick_not_the_logprobs():
    row = peaked(A)
    row[B] = row[A] - 1.0  # B is second by one nat
    driver = Driver()
    plain = new_seq(name="p", temperature=0.0, max_tokens=4)
    frequency = new_seq(name="f", temperature=0.0, frequency_penalty=2.0, max_tokens=4)
    presence = new_seq(name="r", temperature=0.0, presence_penalty=2.0, max_tokens=4)
    biased = new_seq(name="b", temperature=0.0, logit_bias=((C, 10.0),), logprobs=0, max_tokens=4)
    seqs = [plain, frequency, presence, biased]
    driver.add(*seqs)
    first = driver.step([(s, 2) for s in seqs], torch.stack([row] * 4))
    assert [o.token_ids for o in first] == [[A], [A], [A], [C]]  # penalties need an output
    second = driver.step([(s, 1) for s in seqs], torch.stack([row] * 4))
    assert [o.token_ids for o in second] == [[A], [B], [B], [C]]
    assert second[3].logprobs[0].logprob == pytest.approx(float(row.log_softmax(-1)[C]))


# ---- stop rules -----------------------------------------------------------------------------
def test_eos_stops_with_the_token_and_no_text():
    outs = Driver().run(new_seq(max_tokens=8, temperature=0.0), [A, B, EOS, C])
    ids, text = joined(outs)
    assert ids == [A, B, EOS] and text == "ab"
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    assert outs[-1].num_output_tokens == 3 and outs[-1].num_prompt_tokens == 2


def test_ignore_eos_goes_on_to_max_tokens():
    outs = Driver().run(new_seq(max_tokens=3, temperature=0.0, ignore_eos=True), [EOS, EOS, A, B])
    assert joined(outs)[0] == [EOS, EOS, A] and outs[-1].finish_reason == "length"


def test_stop_token_id_stops():
    outs = Driver().run(new_seq(max_tokens=8, temperature=0.0, stop_token_ids=(C,)), [A, C, B])
    assert joined(outs) == ([A, C], "ac") and outs[-1].finish_reason == "stop"


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_tokens(include: bool):
    params = dict(max_tokens=10, temperature=0.0, stop=("STO",), include_stop_str_in_output=include)
    outs = Driver().run(new_seq(**params), [A, S, T, OP, B])
    ids, text = joined(outs)
    assert ids == [A, S, T, OP] and outs[-1].finish_reason == "stop"
    assert text == ("aSTO" if include else "a")
    streamed = [o.text for o in outs[:-1]]
    assert "S" not in "".join(streamed)  # never handed out before it was known not to stop


def test_text_held_back_for_a_stop_string_that_does_not_come():
    outs = Driver().run(new_seq(max_tokens=4, temperature=0.0, stop=("Sz",)), [S, A, S, B])
    assert [o.text for o in outs] == ["", "S", "a", "Sb"]  # the last: the rest, at the end
    assert outs[-1].finish_reason == "length"


def test_min_tokens_masks_eos_and_stop_ids():
    row = peaked(EOS)
    row[C] = row[EOS] - 0.5  # a stop id next
    row[B] = row[EOS] - 1.0  # then an ordinary token
    driver = Driver()
    seq = new_seq(max_tokens=10, temperature=0.0, min_tokens=2, stop_token_ids=(C,))
    driver.add(seq)
    outs = driver.step([(seq, 2)], row[None])
    for _ in range(3):
        if outs[-1].finished:
            break
        outs += driver.step([(seq, 1)], row[None])
    assert joined(outs)[0] == [B, B, EOS] and outs[-1].finish_reason == "stop"


def test_min_tokens_defers_stop_strings():
    outs = Driver().run(
        new_seq(max_tokens=10, temperature=0.0, stop=("S",), min_tokens=2), [S, A, S]
    )
    ids, text = joined(outs)
    assert ids == [S, A, S] and text == "Sa" and outs[-1].finish_reason == "stop"


def test_max_tokens_and_max_tokens_zero():
    outs = Driver().run(new_seq(max_tokens=2, temperature=0.0), [A, B, C])
    assert joined(outs) == ([A, B], "ab") and outs[-1].finish_reason == "length"
    none = Driver().run(new_seq(max_tokens=0), [A])
    assert len(none) == 1 and none[0].token_ids == [] and none[0].finish_reason == "length"


def test_context_length_stops():
    outs = Driver(max_model_len=5).run(
        new_seq(prompt=(A, B, C), max_tokens=10, temperature=0.0), [A, B, C, A]
    )
    assert joined(outs)[0] == [A, B] and outs[-1].finish_reason == "length"


def test_finish_from_the_engine_abort_and_error():
    driver = Driver()
    seq = new_seq(max_tokens=10, temperature=0.0, stop=("Sz",))
    driver.run(seq, [S])  # "S" held back: it may start the stop string
    aborted = driver.proc.finish(seq, "abort")
    assert aborted.finished and aborted.text == "" and aborted.error is None
    other = new_seq(name="e", max_tokens=10, temperature=0.0, stop=("Sz",))
    driver.run(other, [S])
    error = EngineDeadError("gone")
    failed = driver.proc.finish(other, "error", error)
    assert failed.text == "S" and failed.error is error and failed.finish_reason == "error"


# ---- prompt logprobs ------------------------------------------------------------------------
def test_prompt_logprobs_over_chunks_sent_once():
    prompt = [A, B, C, S, T]
    torch.manual_seed(0)
    rows = torch.randn(len(prompt), V)  # row i predicts prompt token i+1 (the last: the output)
    driver = Driver()
    seq = new_seq(prompt=prompt, max_tokens=2, temperature=0.0, prompt_logprobs=1)
    driver.add(seq)
    assert driver.step([(seq, 2)], rows[:2]) == []  # first chunk: no output yet
    assert seq.prompt_logprobs is not None and len(seq.prompt_logprobs) == 3
    first = driver.step([(seq, 3)], rows[2:])[0]
    plp = first.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    want = rows[:-1].log_softmax(-1)[torch.arange(4), torch.tensor(prompt[1:])]
    assert [e.token_id for e in plp[1:]] == prompt[1:]
    torch.testing.assert_close(torch.tensor([e.logprob for e in plp[1:]]), want)
    assert all(len(e.top) == 1 for e in plp[1:])
    assert first.token_ids == [int(rows[-1].argmax())]
    later = driver.step([(seq, 1)], peaked(A)[None])[0]
    assert later.prompt_logprobs is None and later.finished


def test_prompt_logprobs_of_a_recomputed_chunk_replace_their_own():
    prompt = [A, B, C, S]
    rows = torch.randn(len(prompt), V)
    driver = Driver()
    seq = new_seq(prompt=prompt, max_tokens=0, prompt_logprobs=0)
    driver.add(seq)
    driver.step([(seq, 2)], rows[:2])
    seq.num_computed = 0  # preempted: recomputed from the start
    driver.step([(seq, 2)], rows[:2])
    out = driver.step([(seq, 2)], rows[2:])[0]
    assert out.finish_reason == "length" and out.token_ids == []
    assert [e and e.token_id for e in out.prompt_logprobs] == [None, B, C, S]
