"""Scheduler by hand (no model, no engine thread): token budgets, chunked prefill, preemption
under KV pressure, FCFS admission, adapter binding / `place_prefix`, removal and exact block
accounting. `Driver.step` does what Engine._process does with a plan: each planned sequence's
`num_computed` advances by its tokens, and a sequence that completes its prompt (or decode)
gets one output token; one that has `max_tokens` outputs is removed.

The Driver also keeps a fake KV cache: computing position p of a sequence writes (its weights'
identity, its tokens 0..p) into p's slot, for the whole step before any row "attends"; every
row then checks that each slot it attends to holds exactly its own prefix. With prefix caching
on, that is the proof that shared blocks hold what the sequence would have computed."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from adapterserve.adapters.kinds import Binding
from adapterserve.server.engine.kv_cache import BlockAllocator
from adapterserve.server.engine.sampling import SamplingParams
from adapterserve.server.engine.scheduler import Scheduler, Sequence, Status, StepPlan

BLOCK = 4
OUTPUT_TOKEN = 7


def make_seq(name: str, prompt_len: int, max_tokens: int = 4, prefix: int = 0) -> Sequence:
    """A request of `prompt_len` tokens; `prefix` > 0: prefix-tuned with that many virtual
    tokens (placeholder ids at the front, as Sequence.bind puts them)."""
    seq = Sequence(
        name,
        list(range(1, prompt_len + 1)),
        SamplingParams(max_tokens=max_tokens),
        "m",
        stream=None,
    )
    if prefix:
        seq.bind(Binding(num_virtual=prefix, prefix_kv=torch.zeros(1, 2, prefix, 1, 1)))
    return seq


def names(seqs) -> list[str]:
    return [s.request_id for s in seqs]


def work(plan: StepPlan | None) -> list[tuple[str, int]] | None:
    return None if plan is None else [(s.request_id, n) for s, n in plan.work]


def check_invariants(scheduler: Scheduler, plan: StepPlan | None) -> None:
    """What must hold right after every schedule()."""
    allocator, running, waiting = scheduler.allocator, scheduler.running, list(scheduler.waiting)
    everyone = running + waiting
    assert len({id(s) for s in everyone}) == len(everyone), "a sequence in two places"
    assert all(s.status is Status.RUNNING for s in running)
    assert all(s.status is Status.WAITING for s in waiting)
    assert len(running) <= scheduler.max_num_seqs
    holders = Counter(b for s in everyone for b in s.block_table)
    assert all(len(set(s.block_table)) == len(s.block_table) for s in everyone)
    assert all(allocator.refs(b) == count for b, count in holders.items()), "refcounts"
    if not allocator.caching:  # only the beams of one group share blocks (forks)
        owners: dict[int, set[int]] = {}
        for s in everyone:
            for b in s.block_table:
                owners.setdefault(b, set()).add(id(s.group) if s.group is not None else id(s))
        assert all(len(o) == 1 for o in owners.values()), "a block owned twice"
    assert allocator.num_used == len(holders)
    assert allocator.num_used + allocator.num_free == allocator.num_blocks
    if plan is None:
        return
    planned = [s for s, _ in plan.work]
    assert len({id(s) for s in planned}) == len(planned), "a sequence planned twice"
    assert all(s in running for s in planned)
    for seq, n in plan.work:
        assert 1 <= n <= seq.remaining
        assert len(seq.block_table) * BLOCK >= seq.num_computed + n, "blocks do not cover the step"
    decodes = plan.work[: plan.num_decodes]
    assert all(n == 1 and s.remaining == 1 and s.num_computed > 0 for s, n in decodes)
    # every running decode gets its token (decodes never wait for the budget)
    decoding = [s for s in running if s.remaining == 1 and s.num_computed > 0]
    decoding = [s for s in decoding if s not in plan.admitted]  # a prefix: placed, not computed
    assert {id(s) for s in decoding} == {id(s) for s, _ in decodes}
    prefill_tokens = plan.num_tokens - plan.num_decodes
    assert prefill_tokens <= max(0, scheduler.budget - plan.num_decodes)
    if scheduler.max_num_seqs <= scheduler.budget:
        assert plan.num_tokens <= scheduler.budget
    for seq in plan.preempted:
        if seq not in plan.admitted:
            assert seq in scheduler.waiting and seq.num_computed == 0 and not seq.block_table
    assert all(s in running for s in plan.admitted)
    assert scheduler._occupied() <= scheduler.max_num_seqs
    for group in {id(s.group): s.group for s in everyone if s.group is not None}.values():
        places = {s.status for s in group.members}
        assert len(places) == 1, "a beam group split between running and waiting"


def put_running(d: Driver, seq: Sequence, num_computed: int, outputs: int = 0) -> None:
    """A running sequence as earlier steps left it: `outputs` output tokens, `num_computed`
    tokens in its blocks."""
    seq.output_ids = [OUTPUT_TOKEN] * outputs
    d.allocator.grow(seq.block_table, num_computed)
    d._write(seq, range(num_computed))
    seq.num_computed, seq.status = num_computed, Status.RUNNING
    d.scheduler.running.append(seq)


class Driver:
    def __init__(
        self,
        num_blocks: int = 64,
        max_num_seqs: int = 8,
        budget: int = 64,
        prepare=None,
        place_prefix=None,
        caching: bool = False,
        share: float = 1.0,
    ) -> None:
        self.allocator = BlockAllocator(num_blocks, BLOCK, caching=caching)
        self.user_place_prefix = place_prefix
        self.scheduler = Scheduler(self.allocator, max_num_seqs, budget, max_request_share=share)
        self.prepare = prepare  # request -> its adapter is ready (what the engine's binding finds)
        self.finished: list[Sequence] = []
        self.kv: dict[int, tuple[str, tuple[int, ...]]] = {}  # slot -> what computed it

    def _content(self, seq: Sequence, position: int) -> tuple[str, tuple[int, ...]]:
        return seq.cache_identity, tuple(seq.all_ids[: position + 1])

    def _write(self, seq: Sequence, positions: range) -> None:
        for p, slot in zip(positions, seq.cache_slots(positions, BLOCK), strict=True):
            self.kv[slot] = self._content(seq, p)

    def _place_prefix(self, seq: Sequence) -> None:
        """What the model runner does for each of a plan's `prefix_writes`."""
        self._write(seq, range(seq.num_virtual))
        if self.user_place_prefix is not None:
            self.user_place_prefix(seq)

    def add(self, *seqs: Sequence) -> None:
        for seq in seqs:
            if self.prepare is not None:
                seq.entry = "entry"  # holds an adapter version, bound once `prepare` says ready
            self.scheduler.add(seq)

    def bind(self) -> None:
        """What Engine._bind_candidates does before each plan."""
        for seq in self.scheduler.candidates():
            if not seq.bound and self.prepare(seq):
                seq.lease = "lease"

    def plan(self) -> StepPlan | None:
        """Schedule one step and check the invariants, without computing it."""
        if self.prepare is not None:
            self.bind()
        plan = self.scheduler.schedule()
        check_invariants(self.scheduler, plan)
        for seq in plan.prefix_writes if plan is not None else ():
            self._place_prefix(seq)
        return plan

    def step(self) -> StepPlan | None:
        plan = self.plan()
        if plan is not None:
            self.process(plan)
        return plan

    def process(self, plan: StepPlan) -> None:
        for seq, n in plan.work:  # each layer writes the whole step's K/V, then attends
            self._write(seq, range(seq.num_computed, seq.num_computed + n))
        for seq, n in plan.work:
            context = range(seq.num_computed + n)
            got = [self.kv.get(slot) for slot in seq.cache_slots(context, BLOCK)]
            assert got == [self._content(seq, p) for p in context], f"{seq.request_id}: K/V"
        groups = {}
        for seq, n in plan.work:
            seq.num_computed += n
            if seq.num_computed == seq.num_tokens and seq.group is not None:
                seq.group.reported.add(id(seq))  # a beam: its group decides (below)
                groups[id(seq.group)] = seq.group
            elif seq.num_computed == seq.num_tokens:
                seq.output_ids.append(OUTPUT_TOKEN)
                if len(seq.output_ids) >= seq.params.max_tokens:
                    self.scheduler.remove(seq)
                    self.finished.append(seq)
        for group in groups.values():
            if group.ready():
                group.advance(self.scheduler)

    def run(self, max_steps: int = 500) -> list[StepPlan | None]:
        plans = []
        while self.scheduler.has_work():
            assert len(plans) < max_steps, "no progress"
            plans.append(self.step())
        return plans


class FakeBeams:
    """What BeamSearches (server/engine/beam.py) does with a beam group, with random decisions instead of a
    BeamSearch: when every beam has computed its tokens, 1..width next beams extend random
    beams by random tokens (scheduler.extend_beams), for `steps` steps; then all leave."""

    def __init__(self, width: int, steps: int, rng: random.Random) -> None:
        self.width, self.steps, self.rng = width, steps, rng
        self.members: list[Sequence] = []
        self.reported: set[int] = set()
        self.done = False
        self.forks = 0

    def ready(self) -> bool:
        return bool(self.members) and all(id(m) in self.reported for m in self.members)

    def advance(self, scheduler: Scheduler) -> None:
        self.reported.clear()
        if self.steps == 0:
            self.end(scheduler)
            return
        self.steps -= 1
        decisions = [
            (self.rng.randrange(len(self.members)), self.rng.randint(1, 3))
            for _ in range(self.rng.randint(1, self.width))
        ]

        def new_id() -> str:
            self.forks += 1
            return f"{self.members[0].request_id}#{self.forks}"

        self.members = scheduler.extend_beams(self.members, decisions, new_id)

    def end(self, scheduler: Scheduler) -> None:
        for member in self.members:
            scheduler.remove(member)
        self.members, self.done = [], True


def beam_group(
    name: str, width: int, steps: int, prompt_len: int = 3, rng: random.Random | None = None
) -> Sequence:
    """The root of a new FakeBeams group of `width` beams that decides for `steps` steps."""
    group = FakeBeams(width, steps, rng or random.Random(name))
    root = make_seq(name, prompt_len, 8)
    root.group, group.members = group, [root]
    return root


def choices(name: str, n: int, prompt_len: int = 2, max_tokens: int = 6) -> list[Sequence]:
    """The `n` choices of one request (one owner): `name`-0 ... `name`-(n-1)."""
    owner = object()
    seqs = [make_seq(f"{name}-{i}", prompt_len, max_tokens) for i in range(n)]
    for seq in seqs:
        seq.owner = owner
    return seqs


# ---- token budget ----------------------------------------------------------------------------
def test_decodes_first_then_prompt_chunks_then_admissions_share_the_budget():
    d = Driver(budget=10, max_num_seqs=8)
    a, b, c = make_seq("a", 3, 8), make_seq("b", 3, 8), make_seq("c", 12, 8)
    d.add(a, b, c)
    plan = d.step()
    assert work(plan) == [("a", 3), ("b", 3), ("c", 4)]  # c cut by what is left of the budget
    assert plan.num_decodes == 0 and names(plan.admitted) == ["a", "b", "c"]
    e, f = make_seq("e", 5, 8), make_seq("f", 2, 8)
    d.add(e, f)
    plan = d.step()  # 2 decodes, then c's next chunk takes the other 8: no admission
    assert work(plan) == [("a", 1), ("b", 1), ("c", 8)]
    assert plan.num_decodes == 2 and plan.admitted == ()
    assert names(d.scheduler.waiting) == ["e", "f"]
    plan = d.step()  # c decodes now; 7 tokens left for e and f
    assert work(plan) == [("a", 1), ("b", 1), ("c", 1), ("e", 5), ("f", 2)]
    assert plan.num_decodes == 3 and names(plan.admitted) == ["e", "f"]


def test_admissions_are_cut_to_the_budget_and_the_rest_waits():
    d = Driver(budget=6)
    d.add(make_seq("a", 4), make_seq("b", 4), make_seq("c", 1))
    plan = d.step()
    assert work(plan) == [("a", 4), ("b", 2)]  # budget 0 after b's first chunk: c waits
    assert names(d.scheduler.running) == ["a", "b"] and names(d.scheduler.waiting) == ["c"]
    plan = d.step()
    assert work(plan) == [("a", 1), ("b", 2), ("c", 1)] and plan.num_decodes == 1


def test_max_num_seqs_caps_running_sequences():
    d = Driver(budget=100, max_num_seqs=2)
    a, b, c = make_seq("a", 2, 2), make_seq("b", 2, 2), make_seq("c", 2, 2)
    d.add(a, b, c)
    assert work(d.step()) == [("a", 2), ("b", 2)]
    plan = d.step()  # budget left, but two are running
    assert work(plan) == [("a", 1), ("b", 1)] and names(d.scheduler.waiting) == ["c"]
    assert d.finished == [a, b]
    plan = d.step()
    assert work(plan) == [("c", 2)] and names(plan.admitted) == ["c"]


def test_decodes_beyond_the_budget_all_run_and_nothing_else_does():
    """max_num_seqs > max_num_batched_tokens: every running decode still gets its token (the
    BatchBuilder sizes its buffers for max(budget, max_num_seqs)); no prefill, no admission."""
    d = Driver(budget=3, max_num_seqs=6)
    for i in range(5):
        put_running(d, make_seq(f"s{i}", 1, 10), num_computed=1, outputs=1)
    chunked = make_seq("chunked", 9)
    put_running(d, chunked, num_computed=4)
    d.add(make_seq("late", 2))
    plan = d.step()
    assert plan.num_decodes == 5 and plan.num_tokens == 5
    assert chunked.num_computed == 4 and names(d.scheduler.waiting) == ["late"]


# ---- chunked prefill ---------------------------------------------------------------------------
def test_long_prompt_is_split_over_steps_and_decodes_after_its_last_chunk():
    d = Driver(budget=4)
    s = make_seq("s", 10, max_tokens=3)
    d.add(s)
    chunks = []
    for _ in range(3):
        plan = d.step()
        chunks.append((work(plan), plan.num_decodes, s.num_computed, len(s.output_ids)))
    assert chunks == [
        ([("s", 4)], 0, 4, 0),
        ([("s", 4)], 0, 8, 0),
        ([("s", 2)], 0, 10, 1),  # the last chunk samples the first output token
    ]
    plan = d.step()
    assert work(plan) == [("s", 1)] and plan.num_decodes == 1
    assert s.num_computed == 11 and len(s.output_ids) == 2
    d.run()
    assert d.finished == [s] and len(s.output_ids) == 3 and d.allocator.num_used == 0


def test_one_token_prefill_chunks_after_other_chunks_are_not_decodes():
    """A chunk cut to one token by the budget, of a prompt already partly computed, and a
    prefix-tuned prompt of one real token admitted after its virtual tokens: both come after
    the decodes and are not counted in num_decodes (the batch builder reads rows by it)."""
    d = Driver(budget=8)
    put_running(d, make_seq("dec", 2, 8), num_computed=3, outputs=2)
    put_running(d, make_seq("mid_a", 10), num_computed=4)
    mid_b = make_seq("mid_b", 10)
    put_running(d, mid_b, num_computed=4)
    plan = d.step()
    assert work(plan) == [("dec", 1), ("mid_a", 6), ("mid_b", 1)]
    assert plan.num_decodes == 1 and mid_b.num_computed == 5  # 4 + its one-token chunk

    calls = []
    d = Driver(budget=4, place_prefix=calls.append)
    first, prefixed = make_seq("first", 3), make_seq("prefixed", 1, prefix=5)
    d.add(first, prefixed)
    plan = d.step()
    assert work(plan) == [("first", 3), ("prefixed", 1)] and plan.num_decodes == 0
    assert calls == [prefixed] and prefixed.num_computed == 6  # 5 virtual + 1 real


def test_chunk_is_cut_to_the_free_blocks():
    d = Driver(num_blocks=3, budget=64)
    s = make_seq("s", 20)
    d.add(s)
    plan = d.step()
    assert work(plan) == [("s", 12)] and len(s.block_table) == 3 and d.allocator.num_free == 0
    assert d.step() is None  # nothing fits and nothing decodes: no step
    assert s.num_computed == 12


# ---- preemption ------------------------------------------------------------------------------
def test_kv_pressure_preempts_the_newest_which_requeues_at_the_head_and_finishes_later():
    d = Driver(num_blocks=5, budget=32, max_num_seqs=3)
    a, m, n = make_seq("a", 8, 4), make_seq("m", 2, 4), make_seq("n", 2, 4)
    w = make_seq("w", 2, 1)
    d.add(a, m, n, w)
    assert work(d.step()) == [("a", 8), ("m", 2), ("n", 2)]  # blocks 2 + 1 + 1, w: max_num_seqs
    assert work(d.step()) == [("a", 1), ("m", 1), ("n", 1)]  # a's 9th token takes the 5th block
    assert work(d.step()) == [("a", 1), ("m", 1), ("n", 1)]
    assert d.allocator.num_free == 0
    n_blocks = list(n.block_table)
    plan = d.plan()  # m's 5th token needs a block: n (newest) gives its one up
    assert m.block_table[-1] == n_blocks[0]
    d.process(plan)
    assert work(plan) == [("a", 1), ("m", 1)] and plan.num_decodes == 2
    assert plan.preempted == (n,) and plan.admitted == ()
    assert n.status is Status.WAITING and n.num_computed == 0 and n.block_table == []
    assert n.output_ids == [OUTPUT_TOKEN] * 3 and n.prompt_ids == [1, 2]  # outputs kept
    assert d.finished == [a, m]  # both reached max_tokens in that step
    assert names(d.scheduler.waiting) == ["n", "w"]  # n at the head, before w
    plan = d.step()
    assert work(plan) == [("n", 5), ("w", 2)] and names(plan.admitted) == ["n", "w"]
    assert d.finished == [a, m, n, w] and len(n.output_ids) == 4
    assert not d.scheduler.has_work() and d.allocator.num_used == 0


def test_a_decode_that_cannot_grow_preempts_newer_ones_before_itself():
    d = Driver(num_blocks=3, budget=1)  # budget 1: no re-admission in this step
    old, mid, new = make_seq("old", 4, 8), make_seq("mid", 4, 8), make_seq("new", 3, 8)
    for seq in (old, mid, new):  # one block each; old's and mid's next decode needs a 2nd
        put_running(d, seq, num_computed=len(seq.prompt_ids), outputs=1)
    plan = d.step()  # old's grow preempts new (newest); mid's then preempts mid itself
    assert work(plan) == [("old", 1)] and plan.num_decodes == 1
    assert names(plan.preempted) == ["new", "mid"] and plan.admitted == ()
    assert names(d.scheduler.waiting) == ["mid", "new"]  # admission order restored
    assert names(d.scheduler.running) == ["old"] and len(old.block_table) == 2


def test_the_newest_preempts_itself_rather_than_an_older_sequence():
    d = Driver(num_blocks=2, budget=32)
    old, new = make_seq("old", 2, 3), make_seq("new", 4, 8)
    d.add(old, new)
    d.step()
    old_blocks = list(old.block_table)
    plan = d.step()  # new's 5th token needs a 2nd block; old is older: new preempts itself
    assert plan.preempted == (new,) and work(plan)[0] == ("old", 1)
    assert old.block_table == old_blocks and old.status is Status.RUNNING


def test_a_sequence_preempted_in_a_step_is_not_readmitted_in_that_step():
    d = Driver(num_blocks=2, budget=32)
    d.add(make_seq("old", 2, 6), make_seq("new", 4, 3))
    d.step()
    plans = d.run()
    at_once = [s.request_id for p in plans if p for s in p.preempted if s in p.admitted]
    assert at_once == []


# ---- FCFS, adapter binding, place_prefix ------------------------------------------------------------
def test_head_waiting_for_blocks_is_not_jumped():
    """The head (a prefix-tuned request whose 7 virtual tokens need 2 blocks at once) cannot be
    placed with 1 free block; the small request behind it, which would fit, waits too."""
    d = Driver(num_blocks=3, budget=32, place_prefix=lambda seq: None)
    running = make_seq("running", 7, 2)
    d.add(running)
    d.step()
    head, small = make_seq("head", 1, 1, prefix=7), make_seq("small", 1, 1)
    d.add(head, small)
    plan = d.plan()
    assert work(plan) == [("running", 1)] and plan.admitted == ()
    assert names(d.scheduler.waiting) == ["head", "small"]
    assert head.block_table == [] and d.allocator.num_free == 1
    d.process(plan)
    plan = d.step()  # running finished: head first, then small in the block left
    assert work(plan) == [("head", 1), ("small", 1)]
    assert not d.scheduler.has_work() and d.allocator.num_used == 0


def test_not_ready_sequence_waits_in_place_while_later_ones_are_admitted():
    ready = {"a": True, "b": False, "c": True, "d": True, "e": True}
    asked = []

    def prepare(seq: Sequence) -> bool:
        asked.append(seq.request_id)
        return ready[seq.request_id]

    d = Driver(budget=32, prepare=prepare)
    d.add(make_seq("a", 2, 8), make_seq("b", 2, 8), make_seq("c", 2, 8))
    plan = d.step()
    assert work(plan) == [("a", 2), ("c", 2)] and names(plan.admitted) == ["a", "c"]
    assert names(d.scheduler.waiting) == ["b"] and asked == ["a", "b", "c"]
    d.add(make_seq("d", 2, 8))
    asked.clear()
    d.step()
    assert asked == ["b", "d"] and names(d.scheduler.waiting) == ["b"]
    ready["b"] = True
    d.add(make_seq("e", 2, 8))
    plan = d.step()
    assert names(plan.admitted) == ["b", "e"]  # b kept its place ahead of e


def test_not_ready_sequences_keep_their_order_when_the_budget_runs_out():
    d = Driver(budget=4, prepare=lambda seq: seq.request_id not in ("x", "y"))
    d.add(make_seq("x", 2), make_seq("y", 2), make_seq("big", 10), make_seq("z", 2))
    plan = d.step()
    assert work(plan) == [("big", 4)]
    assert names(d.scheduler.waiting) == ["x", "y", "z"]


def test_no_candidate_to_bind_when_nothing_could_be_admitted():
    asked = []
    d = Driver(budget=2, max_num_seqs=1, prepare=lambda seq: asked.append(seq) or True)
    d.add(make_seq("a", 2, 5), make_seq("b", 2))
    d.step()
    d.step()
    assert names(asked) == ["a"]  # b: one running already (max_num_seqs 1)


def test_place_prefix_counts_virtual_tokens_as_computed_on_every_admission():
    placed = []

    def place_prefix(seq: Sequence) -> None:  # a plan's prefix_writes: its blocks are there
        placed.append((seq.request_id, list(seq.block_table), seq.num_computed))

    d = Driver(num_blocks=4, budget=4, place_prefix=place_prefix)
    plain, p = make_seq("plain", 1, 6), make_seq("p", 3, 8, prefix=6)
    d.add(plain, p)
    plan = d.step()  # virtual tokens are not part of the budget: 1 + 3 real tokens
    assert work(plan) == [("plain", 1), ("p", 3)]
    assert placed == [("p", [1, 2, 3], 6)]  # written before the step: 6 virtual counted
    assert p.num_computed == 9  # 6 virtual + 3
    assert p.block_table == [1, 2, 3]
    plans = d.run()
    preempted = sum(p in plan.preempted for plan in plans)
    readmitted = [plan for plan in plans if p in plan.admitted]
    assert preempted >= 1 and len(readmitted) == preempted
    assert [name for name, *_ in placed] == ["p"] * (1 + preempted)
    assert all(len(table) * BLOCK >= 6 and computed == 6 for _, table, computed in placed)
    for plan in readmitted:  # counted as computed again: the chunk starts after them
        assert dict(work(plan))["p"] <= p.num_tokens - 6
    assert p.output_ids == [OUTPUT_TOKEN] * 8 and p.prompt_ids == [0] * 6 + [1, 2, 3]
    assert d.finished == [plain, p] and d.allocator.num_used == 0


def test_prompt_tuning_virtual_tokens_are_computed_not_placed():
    calls = []
    d = Driver(budget=16, place_prefix=calls.append)
    s = make_seq("s", 2, 1)
    s.bind(Binding(num_virtual=3, virtual_embeds=torch.zeros(3, 8)))
    d.add(s)
    assert work(d.step()) == [("s", 5)] and calls == []


# ---- removal and accounting ------------------------------------------------------------------
def test_remove_frees_blocks_of_running_and_waiting_sequences():
    d = Driver(num_blocks=3, budget=32, place_prefix=lambda seq: None)
    running = make_seq("running", 4, 8)
    waiting = make_seq("waiting", 2, 8, prefix=8)  # placed (2 blocks), its chunk does not fit:
    later = make_seq("later", 1)  # the placed blocks go back while it waits
    d.add(running, waiting, later)
    plan = d.step()
    assert work(plan) == [("running", 4)]
    assert names(d.scheduler.waiting) == ["waiting", "later"] and waiting.block_table == []
    assert d.allocator.num_used == 1 and waiting.num_computed == 0
    d.scheduler.remove(waiting)
    assert waiting.status is Status.FINISHED and waiting.block_table == []
    assert d.allocator.num_used == 1 and names(d.scheduler.waiting) == ["later"]
    d.scheduler.remove(running)
    assert running.status is Status.FINISHED and running.block_table == []
    assert d.allocator.num_used == 0 and d.scheduler.running == []
    d.scheduler.remove(later)  # waiting, without blocks
    assert later.status is Status.FINISHED and not d.scheduler.has_work()


def test_everything_removed_returns_every_block():
    d = Driver(num_blocks=10, budget=7, max_num_seqs=3)
    seqs = [make_seq(f"s{i}", 3 + 2 * i, 20) for i in range(6)]
    d.add(*seqs)
    for _ in range(5):
        d.step()
    assert d.allocator.num_used > 0
    for seq in seqs:
        d.scheduler.remove(seq)
    assert d.allocator.num_used == 0 and d.allocator.num_free == 10
    assert not d.scheduler.has_work() and all(s.status is Status.FINISHED for s in seqs)


def random_traffic(seed: int, caching: bool = False) -> int:
    """Random arrivals, prompt lengths, max_tokens, aborts and adapters that load for a few
    steps, on a cache small enough to preempt: the invariants hold at every step, every
    sequence that is not aborted ends with exactly max_tokens outputs, no block leaks.
    Returns the number of preemptions."""
    rng, identities = random.Random(seed), random.Random(-seed)
    loading: dict[str, int] = {}  # request -> steps until its adapter is ready

    def prepare(seq: Sequence) -> bool:
        return loading.get(seq.request_id, 0) <= 0

    d = Driver(
        num_blocks=rng.randint(6, 8),
        max_num_seqs=rng.randint(2, 5),
        budget=rng.randint(5, 16),
        prepare=prepare,
        caching=caching,
    )
    seqs, aborted, preemptions = [], [], 0
    for step in range(300):
        if step < 150 and rng.random() < 0.35:
            seq = make_seq(f"r{len(seqs)}", rng.randint(1, 14), rng.randint(1, 8))
            # prompts share prefixes (1, 2, 3, ...); three weights' identities must not mix
            seq.cache_identity = identities.choice(["base", "base", "adapter:1", "adapter:2"])
            if rng.random() < 0.2:
                loading[seq.request_id] = rng.randint(1, 4)
            seqs.append(seq)
            d.add(seq)
        if rng.random() < 0.03 and d.scheduler.has_work():
            victim = rng.choice(d.scheduler.running + list(d.scheduler.waiting))
            d.scheduler.remove(victim)
            aborted.append(victim)
        plan = d.step()
        preemptions += len(plan.preempted) if plan else 0
        for name in loading:
            loading[name] -= 1
        for seq in seqs:
            assert seq.num_computed <= seq.num_tokens
            assert len(seq.output_ids) <= seq.params.max_tokens
    d.run()
    assert len(seqs) > 20
    assert {id(s) for s in d.finished} | {id(s) for s in aborted} == {id(s) for s in seqs}
    for seq in d.finished:
        assert len(seq.output_ids) == seq.params.max_tokens and seq.status is Status.FINISHED
    assert d.allocator.num_used == 0 and d.allocator.num_free == d.allocator.num_blocks
    assert (d.scheduler.prefix_hits > 0) == caching  # the draws do share prefixes
    return preemptions


@pytest.mark.parametrize("caching", [False, True], ids=["no-cache", "prefix-cache"])
@pytest.mark.parametrize("seed", range(8))
def test_random_traffic_keeps_the_invariants_and_finishes_everything(seed: int, caching: bool):
    assert random_traffic(seed, caching) > 0  # the cache is small enough that each run preempts


def test_prefix_request_waiting_with_placed_blocks_cannot_livelock_the_cache():
    d = Driver(num_blocks=4, budget=16, place_prefix=lambda seq: None)
    a = make_seq("a", 7, 5)  # 12 tokens at most: 3 of the 4 blocks
    p = make_seq("p", 3, 2, prefix=8)  # 8 + 3 + 2 tokens: 4 blocks
    d.add(a, p)
    d.run(max_steps=100)
    assert d.finished == [a, p]


def random_beam_traffic(
    seed: int, caching: bool, share: float = 1.0, num_blocks: tuple[int, int] = (6, 8)
) -> tuple[int, int, int]:
    """Single requests (some several choices of one request) and beam groups (FakeBeams: random
    forks and drops every step) arrive at random, some aborted, on a cache that preempts: the
    invariants hold at every step (the fake KV check proves that forked beams attend to their
    own tokens through shared blocks), groups stay whole units, everything ends, no block
    leaks. (forks, preemptions, sequences that yielded slots for the share)."""
    rng = random.Random(seed)
    d = Driver(
        num_blocks=rng.randint(*num_blocks),
        max_num_seqs=rng.randint(3, 6),
        budget=rng.randint(5, 12),
        caching=caching,
        share=share,
    )
    fanout = random.Random(-seed)  # apart from rng: the draws without a share stay as they were
    singles, groups, aborted, preemptions = [], [], [], 0
    for step in range(300):
        if step < 150 and rng.random() < 0.4:
            if rng.random() < 0.5:  # a beam group: width beams of at most 8 tokens fit the cache
                width = rng.randint(2, min(3, d.scheduler.max_num_seqs))
                root = beam_group(
                    f"g{len(groups)}", width, rng.randint(0, 4), rng.randint(1, 4), rng
                )
                groups.append(root.group)
                d.add(root)
            else:
                owner = object()  # the choices of one request
                for _ in range(fanout.choice([1, 1, 2, 4]) if share < 1.0 else 1):
                    seq = make_seq(f"r{len(singles)}", rng.randint(1, 14), rng.randint(1, 8))
                    seq.owner = owner
                    singles.append(seq)
                    d.add(seq)
        if rng.random() < 0.03 and d.scheduler.has_work():
            victim = rng.choice(d.scheduler.running + list(d.scheduler.waiting))
            if victim.group is not None:
                victim.group.end(d.scheduler)
            else:
                d.scheduler.remove(victim)
                aborted.append(victim)
        plan = d.step()
        preemptions += len(plan.preempted) if plan else 0
    d.run(max_steps=1000)
    assert all(g.done for g in groups) and len(groups) > 10
    assert {id(s) for s in d.finished} | {id(s) for s in aborted} == {id(s) for s in singles}
    assert d.allocator.num_used == 0 and d.allocator.num_free == d.allocator.num_blocks
    return sum(g.forks for g in groups), preemptions, d.scheduler.share_yields


@pytest.mark.parametrize("caching", [False, True], ids=["no-cache", "prefix-cache"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5, 7, 8])  # 6: the cached run never preempts
def test_beam_groups_fork_share_blocks_and_move_as_units(seed: int, caching: bool):
    forks, preemptions, _ = random_beam_traffic(seed, caching)
    assert forks > 10 and preemptions > 0


# ---- fair share (max_request_share) -------------------------------------------------------------
def test_a_request_runs_in_its_first_step_beside_two_beam_groups_that_fill_the_slots():
    """Issue 24 item 5: two 16-beam searches hold all 32 running slots (nobody waited when they
    came); a third request starts in the first step after it arrives: the newer group gives its
    slots back, whole, and waits behind it, while the older one keeps running. The group that
    yielded takes nothing back while the third runs (it would hold no more than the older group
    does), and everyone finishes."""
    d = Driver(num_blocks=1024, max_num_seqs=32, budget=64, share=0.5)
    a, b = beam_group("a", 16, 30), beam_group("b", 16, 30)
    d.add(a, b)
    for _ in range(3):
        d.step()
    assert d.scheduler._occupied() == 32 and not d.scheduler.waiting
    c = make_seq("c", 5, 6)
    d.add(c)
    plan = d.step()
    assert c in plan.admitted and c.status is Status.RUNNING
    assert plan.preempted and all(s.group is b.group for s in plan.preempted)
    assert all(s.status is Status.WAITING for s in b.group.members)
    assert all(s.status is Status.RUNNING for s in a.group.members)
    while c.status is Status.RUNNING:
        plan = d.step()
        assert plan.preempted == () and plan.admitted == ()
    assert d.finished == [c] and len(c.output_ids) == 6
    assert b.group.members[0] in d.step().admitted  # c's slot is free: b is back
    d.run()
    assert a.group.done and b.group.done and d.allocator.num_used == 0


def test_requests_arriving_together_beside_full_beam_groups_all_run_in_one_step():
    """Two plain requests arrive to slots full of two 16-beam groups: the newer group gives its
    16 slots back (whole, however many beams it has live) and both run in that step (the group is held back while they are admitted);
    it cannot come back while they run, and takes no slot from the older group (equal holds)."""
    d = Driver(num_blocks=1024, max_num_seqs=32, budget=64, share=0.5)
    a, b = beam_group("a", 16, 20), beam_group("b", 16, 20)
    d.add(a, b)
    for _ in range(3):
        d.step()
    c, e = make_seq("c", 3, 4), make_seq("e", 2, 4)
    d.add(c, e)
    plan = d.step()
    assert names(plan.admitted) == ["c", "e"] and {s.group for s in plan.preempted} == {b.group}
    assert all(s.group is b.group for s in d.scheduler.waiting)
    for _ in range(3):
        assert d.step().preempted == ()
    assert d.finished == [c, e] and d.scheduler.share_yields == len(plan.preempted)
    d.run()
    assert a.group.done and b.group.done


def test_one_request_alone_takes_every_slot():
    """No lost throughput: with nobody else waiting, one request's choices, or one beam group,
    take every running slot whatever the share."""
    d = Driver(max_num_seqs=8, budget=64, share=0.25)
    xs = choices("x", 8)
    d.add(*xs)
    assert d.step().admitted == tuple(xs)
    d.run()
    d = Driver(num_blocks=256, max_num_seqs=8, budget=64, share=0.25)
    g = beam_group("g", 8, 3)
    d.add(g)
    assert names(d.step().admitted) == ["g"] and d.scheduler._occupied() == 8


def test_the_choices_of_one_request_stop_at_its_share_while_another_waits():
    """Eight choices of x and a request y arrive together (8 slots, share 4): x takes 4, y runs
    beside them; with nobody else waiting x fills the free slots; when z then arrives to full
    slots, x (7 slots) gives its newest choice back and z runs at once."""
    d = Driver(max_num_seqs=8, budget=64, share=0.5)
    xs, y = choices("x", 8), make_seq("y", 2, 6)
    d.add(*xs, y)
    plan = d.step()
    assert names(plan.admitted) == ["x-0", "x-1", "x-2", "x-3", "y"]
    assert names(d.scheduler.waiting) == ["x-4", "x-5", "x-6", "x-7"]  # in their order
    plan = d.step()
    assert names(plan.admitted) == ["x-4", "x-5", "x-6"] and plan.preempted == ()
    z = make_seq("z", 2, 2)
    d.add(z)
    plan = d.step()
    assert names(plan.preempted) == ["x-6"] and names(plan.admitted) == ["z"]
    assert names(d.scheduler.waiting) == ["x-7", "x-6"]
    d.run()
    assert len(d.finished) == 10 and d.allocator.num_used == 0


def test_a_beam_group_wider_than_the_share_runs_when_its_request_holds_nothing():
    """A group of 6 beams (share 4 of 8) is admitted while another request waits (its request
    holds nothing: it could never run otherwise), and later gives its slots back whole to a
    request that finds the slots full; it runs again once 6 are free."""
    d = Driver(num_blocks=256, max_num_seqs=8, budget=64, share=0.5)
    g, p = beam_group("g", 6, 12), make_seq("p", 2, 3)
    d.add(g, p)
    assert names(d.step().admitted) == ["g", "p"]
    q, r = make_seq("q", 2, 3), make_seq("r", 2, 3)
    d.add(q, r)
    plan = d.step()
    assert names(plan.admitted) == ["q"]  # 7 slots held: q fits; r finds them full
    plan = d.step()
    assert names(plan.admitted) == ["r"] and {s.group for s in plan.preempted} == {g.group}
    d.run()
    assert g.group.done and d.finished == [p, q, r] and d.allocator.num_used == 0


def test_without_a_share_a_request_waits_for_the_slots_as_before():
    """max_request_share 1: nobody gives slots back (the old first-come, first-served)."""
    d = Driver(num_blocks=1024, max_num_seqs=32, budget=64, share=1.0)
    a, b = beam_group("a", 16, 5), beam_group("b", 16, 5)
    d.add(a, b)
    d.step()
    c = make_seq("c", 5, 2)
    d.add(c)
    plans = [d.step() for _ in range(4)]
    assert c.status is Status.WAITING and all(p.preempted == () for p in plans)
    d.run()
    assert d.finished == [c] and d.scheduler.share_yields == 0


@pytest.mark.parametrize("caching", [False, True], ids=["no-cache", "prefix-cache"])
@pytest.mark.parametrize("seed", range(6))
def test_fair_share_traffic_keeps_the_invariants_and_finishes_everything(seed: int, caching: bool):
    """Random traffic as above, with several-choice requests and a share of a third: requests
    yield slots to waiters (whole beam groups included) and still everything finishes."""
    forks, _, yields = random_beam_traffic(seed, caching, share=0.34, num_blocks=(24, 32))
    assert forks > 10 and yields > 0
