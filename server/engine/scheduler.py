"""Iteration-level (continuous) batching under a per-step token budget, with chunked prefill.

Each step: every running decode gets one token; then unfinished prompt chunks and newly admitted
requests share what is left of the budget. When the KV cache runs out, the most recently admitted
sequence is preempted (its blocks freed, recomputed later), as vLLM does.

Prefix caching (server/engine/kv_cache.py): a sequence being admitted first takes the longest
run of cached blocks whose content keys match its tokens (never its last token, which must be
computed to sample from; never for a request that wants prompt logprobs, which need every
prompt row computed), and prefills only the rest. Every block that a planned step fills is
registered under its key at once, so a sequence admitted later in the same step shares it: the
step writes each layer's K/V for the whole batch before any row attends.

Fair share (`max_request_share`): a request (one `add_requests` / `add_beam_searches` call: the
`n` choices of a prompt, or a beam group, share its `owner`) grows past `share_cap` running
slots only while no request of another owner waits. Past its share it admits no more (its
waiting sequences keep their place; others behind them go first), and when the first waiting
request that may run finds no free slot, the request holding the most slots, if it holds at
least its share and more than the waiter would, gives back its newest units (a beam group
whole, recomputed later) until the waiter fits: it runs in that very step. Nobody waiting: one
request may take every slot.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from adapterserve.adapters.kinds import Binding
from adapterserve.server.engine.kv_cache import BlockAllocator, OutOfBlocks, block_key
from adapterserve.server.engine.sampling import SamplingParams, TokenLogprob

if TYPE_CHECKING:  # what a sequence refers to (their modules import this one)
    from adapterserve.adapters.registry import Entry, Lease
    from adapterserve.server.engine.beam import BeamGroup
    from adapterserve.server.engine.intake import OutputStream


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    model: str
    stream: OutputStream | None  # receives its outputs (None: a beam; its group's streams do)
    slot_id: int = -1  # adapter slot the hook points apply; -1 = none (base model)
    adapter: str | None = None  # adapter name to acquire at admission; None = base model
    entry: Entry | None = (
        None  # the adapter version held since the request was accepted (until finish)
    )
    lease: Lease | None = None  # that version's device slot, from admission to finish
    num_virtual: int = 0  # virtual tokens (prefix / prompt tuning) at the front of prompt_ids
    prefix_kv: torch.Tensor | None = None  # (L, 2, num_virtual, kvh, d), placed at admission
    virtual_embeds: torch.Tensor | None = None  # (num_virtual, dim) prompt tuning embeddings
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    generator: torch.Generator | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    first_token_time: float | None = None
    # prefix caching: whose weights compute its K/V ("base", or one adapter version), the
    # content keys of its full blocks (a memo: keys depend on tokens only), and how many of
    # the blocks in its table are registered under them
    cache_identity: str = "base"
    block_keys: list[bytes] = field(default_factory=list)
    num_registered: int = 0
    num_cached_tokens: int | None = None  # prompt tokens found in the cache at first admission
    group: BeamGroup | None = (
        None  # beam search (server/engine/beam.py BeamGroup): one beam of that group
    )
    owner: object | None = (
        None  # the request it belongs to, for the fair share (None: itself, or its group)
    )

    @property
    def bound(self) -> bool:
        """Its adapter version holds a device slot (or it has none): it may be admitted."""
        return self.entry is None or self.lease is not None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def share_owner(self) -> Any:
        """Whose share its running slot counts against: its request's, else its beam group's
        or its own."""
        if self.owner is not None:
            return self.owner
        return self.group if self.group is not None else self

    @property
    def width(self) -> int:
        """Running slots its unit takes: a beam group's width, else one."""
        return self.group.width if self.group is not None else 1

    @property
    def remaining(self) -> int:
        """Tokens not yet in the cache (1 while decoding; more while prefilling)."""
        return self.num_tokens - self.num_computed

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and not self.prompt_logprobs_sent

    @property
    def binding(self) -> Binding:
        """Its adapter's state (adapters.kinds.Binding), as `bind` set it."""
        return Binding(self.slot_id, self.num_virtual, self.prefix_kv, self.virtual_embeds)

    def bind(self, binding: Binding) -> None:
        """Take its adapter's state from `binding` (the adapter kind's `bind`), and put
        `num_virtual` placeholder ids at the front of the prompt (never embedded)."""
        self.slot_id, self.prefix_kv = binding.slot_id, binding.prefix_kv
        self.virtual_embeds = binding.virtual_embeds
        if binding.num_virtual:
            self.num_virtual = binding.num_virtual
            self.prompt_ids = [0] * binding.num_virtual + self.prompt_ids

    def keys_upto(self, num_blocks: int, block_size: int) -> list[bytes]:
        """The content keys of its first `num_blocks` blocks (they must be full of known
        tokens)."""
        ids = None
        while len(self.block_keys) < num_blocks:
            ids = ids or self.all_ids
            k = len(self.block_keys)
            parent = self.block_keys[-1] if k else None
            tokens = ids[k * block_size : (k + 1) * block_size]
            self.block_keys.append(block_key(parent, tokens, self.cache_identity))
        return self.block_keys[:num_blocks]

    def cache_slots(self, positions: range, block_size: int) -> list[int]:
        """Flat KV-cache slots of `positions`, through the block table."""
        return [self.block_table[p // block_size] * block_size + p % block_size for p in positions]


@dataclass(frozen=True)
class StepPlan:
    """What one step computes, as plain data: (sequence, number of tokens) in batch order. The
    first `num_decodes` entries are decodes (one token each, the model attends for them as one
    batch); every later entry is a prefill chunk, one token long included (a chunk cut by the
    budget, or a prefix-tuned prompt admitted after its virtual tokens). The batch builder turns
    it into tensors."""

    work: tuple[tuple[Sequence, int], ...]
    num_decodes: int
    preempted: tuple[Sequence, ...] = ()
    admitted: tuple[Sequence, ...] = ()
    # prefix-tuned sequences (re)admitted since the last plan: their virtual K/V go into their
    # first cache slots before this step's forward (ModelRunner.forward)
    prefix_writes: tuple[Sequence, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.work)


class Scheduler:
    """Plans steps; calls nothing outside itself. Before each `schedule`, the engine binds the
    `candidates` (the waiting sequences this step may admit) to their adapters' slots; one not
    `bound` yet (its adapter still loading) keeps its place in line while later ones are
    admitted. A prefix-tuned sequence's virtual K/V count as computed when it is (re)admitted;
    the plan names it in `prefix_writes`, and the model runner writes them. Nothing here
    touches a tensor: a step is a StepPlan."""

    def __init__(
        self,
        allocator: BlockAllocator,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_request_share: float = 1.0,
    ) -> None:
        assert 0.0 < max_request_share <= 1.0
        self.allocator = allocator
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        # running slots one request may hold while another waits (None: no limit)
        share = int(max_request_share * max_num_seqs)
        self.share_cap = max(1, share) if max_request_share < 1.0 else None
        self._prefix_writes: list[Sequence] = []  # placed, not yet handed out in a plan
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefix_queries = self.prefix_hits = 0  # tokens looked up / found in the cache
        self.share_yields = 0  # sequences given back to a waiting request (fair share)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is and free its blocks (finish, abort, error)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status = Status.FINISHED

    def candidates(self) -> list[Sequence]:
        """The waiting sequences the next `schedule` may admit, in line order: as many as there
        are free running slots, and the fair share's claimant (which may take slots back)."""
        room = max(0, self.max_num_seqs - self._occupied())
        out = list(itertools.islice(self.waiting, room))
        if self.share_cap is not None and self.waiting:
            held, waiting = self._held(), {s.share_owner for s in self.waiting}
            claimant = next(
                (s for s in self.waiting if not self._over_share(s, held, waiting)), None
            )
            if claimant is not None and claimant not in out:
                out.append(claimant)
        return out

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan | None:
        yielded = self._yield_to_waiting()  # fair share: slots given back to a waiting request
        preempted: list[Sequence] = []  # for KV blocks
        decodes = self._schedule_decodes(preempted)
        while True:
            budget = self.budget - len(decodes)
            prefills = self._schedule_running_prefills(budget)
            budget -= sum(n for _, n in prefills)
            # A step that had to preempt for blocks admits nobody: the blocks just freed belong
            # to the running sequences' growth, and re-admitting the victim now would recompute
            # a chunk that the next step's growth throws away again.
            blocked = preempted and (decodes or prefills)
            admitted = self._admit(budget, yielded) if not blocked else []
            work = tuple(decodes + prefills + admitted)
            if work or len(self._units()) < 2:
                break
            # Nothing can run: running prompt chunks wait for blocks that beams waiting for
            # their siblings hold. The newest unit gives its blocks back to the older ones.
            preempted += self._preempt_newest()
        if not work:
            return None
        admitted_seqs = tuple(s for s, _ in admitted)
        writes, self._prefix_writes = tuple(self._prefix_writes), []
        return StepPlan(work, len(decodes), tuple(yielded + preempted), admitted_seqs, writes)

    def extend_beams(
        self,
        beams: list[Sequence],
        decisions: list[tuple[int, int]],
        new_id: Callable[[], str],
    ) -> list[Sequence]:
        """One beam-search step of a group whose beams are all running and computed:
        `decisions` lists the next beams as (index in `beams` of the beam it extends, token).
        A beam with several continuations forks (`fork`) before it takes its first one in
        place; a beam with none leaves (its blocks freed). Returns the next beams in
        `decisions` order."""
        continuations: dict[int, list[tuple[int, int]]] = {}
        for position, (parent, token) in enumerate(decisions):
            continuations.setdefault(parent, []).append((position, token))
        out: list[Sequence | None] = [None] * len(decisions)
        for index, beam in enumerate(beams):
            mine = continuations.get(index, [])
            if not mine:
                self.remove(beam)
                continue
            for position, token in mine[1:]:
                out[position] = self.fork(beam, token, new_id())
            position, token = mine[0]
            beam.output_ids.append(token)
            out[position] = beam
        assert all(beam is not None for beam in out)
        return out  # type: ignore[return-value]

    def fork(self, parent: Sequence, token: int, request_id: str) -> Sequence:
        """A new beam: `parent`'s tokens plus `token`, running right after `parent` (its unit).
        It shares the parent's full blocks (a hold on each, no copy) and computes the rest of
        its tokens itself, so that no block is ever written by two sequences."""
        assert parent.status is Status.RUNNING and parent.remaining == 0
        child = Sequence(
            request_id,
            list(parent.prompt_ids),
            parent.params,
            parent.model,
            stream=None,
            slot_id=parent.slot_id,
            adapter=parent.adapter,
            lease=parent.lease,
            num_virtual=parent.num_virtual,
            prefix_kv=parent.prefix_kv,
            virtual_embeds=parent.virtual_embeds,
            arrival=parent.arrival,
            output_ids=parent.output_ids + [token],
            cache_identity=parent.cache_identity,
            block_keys=list(parent.block_keys),
            group=parent.group,
            owner=parent.owner,
            status=Status.RUNNING,
        )
        full = parent.num_computed // self.allocator.block_size
        self.allocator.share(child.block_table, parent.block_table[:full])
        child.num_computed = full * self.allocator.block_size
        child.num_registered = min(parent.num_registered, full)
        self.running.insert(self.running.index(parent) + 1, child)
        return child

    def _units(self) -> list[list[Sequence]]:
        """Running sequences by unit: a sequence alone, or all the running beams of one
        group. Units are preempted and admitted whole."""
        units: list[list[Sequence]] = []
        for seq in self.running:
            if seq.group is not None and units and units[-1][0].group is seq.group:
                units[-1].append(seq)
            else:
                units.append([seq])
        return units

    def _occupied(self) -> int:
        """Running slots taken: one per sequence, a beam group's width per group."""
        return sum(u[0].width for u in self._units())

    def _held(self) -> dict[Any, int]:
        """Running slots by request (share owner)."""
        held: dict[Any, int] = {}
        for unit in self._units():
            owner = unit[0].share_owner
            held[owner] = held.get(owner, 0) + unit[0].width
        return held

    def _over_share(self, seq: Sequence, held: dict[Any, int], waiting: set[Any]) -> bool:
        """Fair share: a waiting unit whose request already holds running slots, and would hold
        more than its share with it, while a request of another owner waits. (A request that
        holds nothing always may: a beam group wider than the share still runs.)"""
        if self.share_cap is None:
            return False
        owner = seq.share_owner
        mine = held.get(owner, 0)
        return mine > 0 and mine + seq.width > self.share_cap and bool(waiting - {owner})

    def _yield_to_waiting(self) -> list[Sequence]:
        """Fair share: the first waiting unit that may run (not over its share), when no slot
        is free for it, gets room from the running request holding the most slots (the newest
        on a tie) if that request holds at least its share and more than the waiter's request
        would hold with it: its newest units go back to the waiting line, right behind the
        waiter, until the waiter fits. The second condition rules out ping-pong: to take a unit
        back, the request that gave it would need the waiter's to hold more than it held
        itself."""
        if self.share_cap is None or not self.waiting:
            return []
        held, waiting = self._held(), {s.share_owner for s in self.waiting}
        claimant = next((s for s in self.waiting if not self._over_share(s, held, waiting)), None)
        if claimant is None or self._occupied() + claimant.width <= self.max_num_seqs:
            return []
        victims = self._victims_for(claimant, held)
        if not victims or not claimant.bound:
            return []
        yielded = [seq for unit in victims for seq in self._preempt(unit, requeue=False)]
        self.share_yields += len(yielded)
        behind = self.waiting.index(claimant) + len(self._waiting_unit(claimant))
        for seq in reversed(yielded):
            self.waiting.insert(behind, seq)
        return yielded

    def _victims_for(self, claimant: Sequence, held: dict[Any, int]) -> list[list[Sequence]]:
        """The running units to give back so that `claimant` fits (none: it cannot be made to)."""
        held, units = dict(held), self._units()
        wanted = claimant.share_owner
        want = held.get(wanted, 0) + claimant.width  # what the waiter's request would hold
        free = self.max_num_seqs - self._occupied()
        victims: list[list[Sequence]] = []
        while free < claimant.width:
            newest = {u[0].share_owner: i for i, u in enumerate(units)}  # owner -> newest unit
            able = [
                o
                for o in newest
                if o is not wanted and held[o] >= self.share_cap and held[o] > want
            ]
            if not able:
                return []
            unit = units.pop(newest[max(able, key=lambda o: (held[o], newest[o]))])
            victims.append(unit)
            held[unit[0].share_owner] -= unit[0].width
            free += unit[0].width
        return victims

    def _schedule_decodes(self, preempted: list[Sequence]) -> list[tuple[Sequence, int]]:
        out: list[tuple[Sequence, int]] = []
        for seq in [s for s in self.running if s.remaining == 1 and s.num_computed > 0]:
            if seq.status is not Status.RUNNING:
                continue  # preempted below while making room
            while not self._try_grow(seq, seq.num_tokens):
                victims = self._preempt_newest()
                preempted += victims
                if seq in victims:
                    break
            if seq.status is Status.RUNNING:
                out.append((seq, 1))
        # a unit preempted for a later decode may hold decodes planned before: drop them, and
        # register blocks only once nothing planned can be preempted any more
        out = [(seq, n) for seq, n in out if seq.status is Status.RUNNING]
        for seq, _ in out:
            self._register(seq, seq.num_tokens)
        return out

    def _schedule_running_prefills(self, budget: int) -> list[tuple[Sequence, int]]:
        out: list[tuple[Sequence, int]] = []
        for seq in self.running:
            if budget <= 0:
                break
            if seq.remaining > 1 or seq.num_computed == 0:
                if not self._place_prefix(seq):  # a new beam of a prefix-tuned group
                    continue
                n = self._fit_chunk(seq, budget)
                if n:
                    out.append((seq, n))
                    self._register(seq, seq.num_computed + n)
                    budget -= n
        return out

    def _admit(self, budget: int, yielded: list[Sequence]) -> list[tuple[Sequence, int]]:
        out: list[tuple[Sequence, int]] = []
        # adapter still loading, over its share, or yielded its slots in this step: they keep
        # their place in line while later ones are admitted
        held_back: list[Sequence] = []
        held, waiting = self._held(), {s.share_owner for s in self.waiting}
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if seq in yielded or self._over_share(seq, held, waiting):
                held_back += [self.waiting.popleft() for _ in self._waiting_unit(seq)]
                continue
            if self._occupied() + seq.width > self.max_num_seqs:
                break
            if not seq.bound:
                held_back.append(self.waiting.popleft())
                continue
            # a unit: the sequence, or every waiting beam of its group (at the head together)
            unit = self._waiting_unit(seq)
            planned: list[tuple[Sequence, int]] = []
            for i, member in enumerate(unit):
                later = len(unit) - i - 1  # members after this one: a token of budget each
                n = self._place_and_fit(member, budget - later)
                if n == 0:
                    break
                planned.append((member, n))
                budget -= n
            if len(planned) < len(unit):
                # FCFS: the head waits for blocks, nobody jumps it. A waiting sequence holds
                # no blocks (nothing preempts a waiting one): blocks just taken go back.
                for member in unit:
                    self._unplace(member)
                break
            for member, n in planned:
                self.waiting.popleft()
                member.status = Status.RUNNING
                self.running.append(member)
                out.append((member, n))
                self._register(member, member.num_computed + n)
            held[seq.share_owner] = held.get(seq.share_owner, 0) + seq.width
        self.waiting.extendleft(reversed(held_back))
        return out

    def _waiting_unit(self, head: Sequence) -> list[Sequence]:
        """The head of the waiting line and, for a beam, the rest of its group behind it."""
        if head.group is None:
            return [head]
        unit = []
        for seq in self.waiting:
            if seq.group is not head.group:
                break
            unit.append(seq)
        return unit

    def _place_and_fit(self, seq: Sequence, budget: int) -> int:
        """A waiting sequence's cached prefix, virtual K/V and first chunk (0: no room)."""
        if budget <= 0:
            return 0
        if seq.num_computed == 0 and not seq.block_table:
            self._share_cached_prefix(seq)
        if not self._place_prefix(seq):
            return 0
        return self._fit_chunk(seq, budget)

    def _place_prefix(self, seq: Sequence) -> bool:
        """Prefix tuning: the virtual K/V fill the first cache positions, as if computed."""
        if seq.prefix_kv is None or seq.num_computed >= seq.num_virtual:
            return True
        if not self._try_grow(seq, seq.num_virtual):
            return False
        self._prefix_writes.append(seq)
        seq.num_computed = seq.num_virtual
        return True

    def _unplace(self, seq: Sequence) -> None:
        if seq.block_table:
            self._free(seq)
            seq.num_computed = 0

    def _free(self, seq: Sequence) -> None:
        if seq in self._prefix_writes:  # its blocks go: nothing to write
            self._prefix_writes.remove(seq)
        self.allocator.free(seq.block_table)
        seq.num_registered = 0

    def _share_cached_prefix(self, seq: Sequence) -> None:
        """Start the sequence on the cached blocks of its longest cached prefix."""
        if not self.allocator.caching or seq.wants_prompt_logprobs:
            return
        bs = self.allocator.block_size
        keys = seq.keys_upto((seq.num_tokens - 1) // bs, bs)  # the last token is computed
        hits = self.allocator.lookup(keys)
        if seq.prefix_kv is not None and len(hits) * bs < seq.num_virtual:
            hits = []  # prefix tuning places all its virtual K/V at once, in blocks of its own
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += len(hits) * bs
        self.allocator.share(seq.block_table, hits)
        seq.num_computed, seq.num_registered = len(hits) * bs, len(hits)
        if seq.num_cached_tokens is None:  # usage reports the first admission's (as OpenAI)
            seq.num_cached_tokens = max(
                0, min(len(hits) * bs, len(seq.prompt_ids)) - seq.num_virtual
            )

    def _register(self, seq: Sequence, num_tokens: int) -> None:
        """Register the blocks that hold full, known tokens once `num_tokens` are computed."""
        if not self.allocator.caching:
            return
        bs = self.allocator.block_size
        full = num_tokens // bs
        if seq.num_registered < full:
            keys = seq.keys_upto(full, bs)
            for k in range(seq.num_registered, full):
                self.allocator.register(seq.block_table[k], keys[k])
            seq.num_registered = full

    def _fit_chunk(self, seq: Sequence, budget: int) -> int:
        """Largest chunk of the sequence's pending tokens that fits the budget and free blocks."""
        n = min(seq.remaining, budget)
        free_tokens = (len(seq.block_table) + self.allocator.num_free) * self.allocator.block_size
        n = min(n, free_tokens - seq.num_computed)
        if n <= 0 or not self._try_grow(seq, seq.num_computed + n):
            return 0
        return n

    def _try_grow(self, seq: Sequence, num_tokens: int) -> bool:
        try:
            self.allocator.grow(seq.block_table, num_tokens)
        except OutOfBlocks:
            return False
        return True

    def _preempt_newest(self) -> list[Sequence]:
        """The newest running unit goes back to the head of the waiting line, its blocks
        freed; it recomputes its prompt and output so far on readmission."""
        return self._preempt(self._units()[-1])

    def _preempt(self, unit: list[Sequence], requeue: bool = True) -> list[Sequence]:
        """A running unit stops, its blocks freed (at the head of the waiting line, or where
        the caller puts it)."""
        for victim in unit:
            self.running.remove(victim)
            self._free(victim)
            victim.num_computed = 0
            victim.status = Status.WAITING
        if requeue:
            self.waiting.extendleft(reversed(unit))
        return unit
