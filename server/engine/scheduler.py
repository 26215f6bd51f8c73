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
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters.kinds import Binding
from server.engine.kv_cache import BlockAllocator, OutOfBlocks, block_key
from server.engine.sampling import SamplingParams, TokenLogprob


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
    stream: Any  # engine-side handle that receives outputs
    slot_id: int = -1  # adapter slot the hook points apply; -1 = none (base model)
    adapter: str | None = None  # adapter name to acquire at admission; None = base model
    entry: Any = None  # the adapter version held since the request was accepted (until finish)
    lease: Any = None  # that version's device slot, from admission to finish
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

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

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

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.work)


class Scheduler:
    """`prepare(seq)` is asked before admitting a waiting sequence: False keeps it waiting (its
    adapter is still loading) while later ones are admitted. `place_prefix(seq)` writes a
    prefix-tuned sequence's virtual K/V into its first cache slots when it is (re)admitted.
    Nothing here touches a tensor: a step is a StepPlan."""

    def __init__(
        self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int,
        prepare: Callable[[Sequence], bool] | None = None,
        place_prefix: Callable[[Sequence], None] | None = None,
    ) -> None:
        self.allocator = allocator
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.prepare, self.place_prefix = prepare, place_prefix
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefix_queries = self.prefix_hits = 0  # tokens looked up / found in the cache

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

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan | None:
        preempted: list[Sequence] = []
        decodes = self._schedule_decodes(preempted)
        budget = self.budget - len(decodes)
        prefills = self._schedule_running_prefills(budget)
        budget -= sum(n for _, n in prefills)
        # A step that had to preempt for blocks admits nobody: the blocks just freed belong to
        # the running sequences' growth, and re-admitting the victim now would recompute a
        # chunk that the next step's growth throws away again.
        admitted = self._admit(budget) if not (preempted and (decodes or prefills)) else []
        work = tuple(decodes + prefills + admitted)
        if not work:
            return None
        return StepPlan(work, len(decodes), tuple(preempted), tuple(s for s, _ in admitted))

    def _schedule_decodes(self, preempted: list[Sequence]) -> list[tuple[Sequence, int]]:
        out: list[tuple[Sequence, int]] = []
        for seq in [s for s in self.running if s.remaining == 1 and s.num_computed > 0]:
            if seq.status is not Status.RUNNING:
                continue  # preempted below while making room
            while not self._try_grow(seq, seq.num_tokens):
                victim = self._preempt_newest()
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                out.append((seq, 1))
                self._register(seq, seq.num_tokens)
        return out

    def _schedule_running_prefills(self, budget: int) -> list[tuple[Sequence, int]]:
        out: list[tuple[Sequence, int]] = []
        for seq in self.running:
            if budget <= 0:
                break
            if seq.remaining > 1 or seq.num_computed == 0:
                n = self._fit_chunk(seq, budget)
                if n:
                    out.append((seq, n))
                    self._register(seq, seq.num_computed + n)
                    budget -= n
        return out

    def _admit(self, budget: int) -> list[tuple[Sequence, int]]:
        out: list[tuple[Sequence, int]] = []
        not_ready: list[Sequence] = []  # adapter still loading: they keep their place in line
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.prepare is not None and not self.prepare(seq):
                not_ready.append(self.waiting.popleft())
                continue
            if seq.num_computed == 0 and not seq.block_table:
                self._share_cached_prefix(seq)
            if not self._place_prefix(seq):
                self._unplace(seq)
                break
            n = self._fit_chunk(seq, budget)
            if n == 0:
                # FCFS: the head waits for blocks, nobody jumps it. A waiting sequence holds no
                # blocks (nothing preempts a waiting one), so virtual K/V just placed go back:
                # they are placed again on admission.
                self._unplace(seq)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append((seq, n))
            self._register(seq, seq.num_computed + n)
            budget -= n
        self.waiting.extendleft(reversed(not_ready))
        return out

    def _place_prefix(self, seq: Sequence) -> bool:
        """Prefix tuning: the virtual K/V fill the first cache positions, as if computed."""
        if seq.prefix_kv is None or seq.num_computed >= seq.num_virtual:
            return True
        if not self._try_grow(seq, seq.num_virtual):
            return False
        if self.place_prefix is not None:
            self.place_prefix(seq)
        seq.num_computed = seq.num_virtual
        return True

    def _unplace(self, seq: Sequence) -> None:
        if seq.block_table:
            self._free(seq)
            seq.num_computed = 0

    def _free(self, seq: Sequence) -> None:
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

    def _preempt_newest(self) -> Sequence:
        victim = self.running.pop()
        self._free(victim)
        victim.num_computed = 0  # recompute prompt + output so far on readmission
        victim.status = Status.WAITING
        self.waiting.appendleft(victim)
        return victim
