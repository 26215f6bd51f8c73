"""Beam search, as Hugging Face `generate(num_beams=k, do_sample=False)` defines it.

`BeamSearch` is the decision procedure alone (no model, no cache): given the next-token
log-probabilities of each live beam, it picks the next live beams and keeps the best finished
hypotheses. Its rules are those of transformers' beam search (the one the LLM-Adapters
evaluation ran through `generate`):

- Each step ranks every (beam, token) continuation by its beam's summed log-probability plus
  the token's, and keeps the best 2k candidates. A candidate that ends with a stop token (EOS,
  `stop_token_ids`) or reaches `max_tokens` is *finishing*; the best k non-finishing ones
  continue (in score order: the next step's beam order).
- A finishing candidate among the k best is offered to the finished set (k entries) with the
  score sum(logprobs) / generated_length ** length_penalty, unless `early_stopping=True` and the
  set is already full of finished hypotheses, or the early-stop heuristic has ruled out any
  improvement.
- The heuristic: once all k finished entries are filled, stop when the best running beam's
  score, at its current length (with `early_stopping="never"` and a positive length penalty: at
  `max_tokens`), cannot beat the worst finished one. The search also ends when every candidate
  finishes, or (`early_stopping=True`) as soon as k hypotheses are finished.
- The answer: the best `n` finished hypotheses, best first.

Scores are fp32, like the reference's tensors, so that ties and rounding fall the same way.
`BeamGroup` is the engine's side of one beam-search request: its live beams are Sequences that
share KV blocks (server/engine/scheduler.py `fork`), the streams of its `n` answers, and its
adapter hold. `BeamSearches` is their lifecycle in the engine: start, a search step once every
live beam has its log-probs (the scheduler forks, extends and drops beams as it decided), the
answers, and the end (answered, aborted or failed) with its beams out of the scheduler and its
hold released. The engine lends it what it needs as a `BeamHost`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from adapterserve.server.engine.output import RequestOutput

if TYPE_CHECKING:
    from adapterserve.adapters.registry import Entry
    from adapterserve.server.engine.errors import EngineFailure
    from adapterserve.server.engine.scheduler import Scheduler, Sequence, StepPlan

NEG = -1.0e9  # what the reference adds to rule a score out (fp32: it swallows small scores)


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]
    score: float  # length-penalized
    finished: bool  # False: a placeholder or a ruled-out candidate (never an answer in practice)


class BeamSearch:
    """The beam-search decisions for one prompt (batch of one)."""

    def __init__(
        self,
        width: int,
        max_tokens: int,
        stop_ids: frozenset[int],
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        min_tokens: int = 0,
    ) -> None:
        assert width >= 1 and max_tokens >= 1
        self.k, self.max_tokens, self.stop_ids = width, max_tokens, stop_ids
        self.length_penalty, self.early_stopping, self.min_tokens = (
            length_penalty,
            early_stopping,
            min_tokens,
        )
        self.live: list[tuple[int, ...]] = [()]  # generated tokens of each live beam, best first
        self.scores = torch.zeros(1)  # (live,) fp32 summed log-probs
        self.best_running = 0.0  # the best running score, a ruled-out one included
        self.finished = [Hypothesis((), NEG, False)] * width  # best first
        self.improvable = True  # the early-stop heuristic has not ruled out a better answer
        self.generated = 0  # tokens each live beam has
        self.done = False

    def step(self, log_probs: torch.Tensor) -> list[tuple[int, int]]:
        """`log_probs`: (live, V) fp32 log-softmax of each live beam's next token, in `live`
        order. Returns the new live beams as (index of the beam it extends, token), best first;
        `done` tells whether the search is over (then `answers`)."""
        assert not self.done and log_probs.shape[0] == len(self.live)
        log_probs = log_probs.float()
        if self.generated < self.min_tokens and self.stop_ids:
            log_probs = log_probs.clone()
            log_probs[:, sorted(self.stop_ids)] = float("-inf")
        vocab = log_probs.shape[1]
        totals = (log_probs + self.scores[:, None]).reshape(-1)
        values, flat = torch.topk(totals, min(2 * self.k, totals.numel()))
        beams, tokens = (flat // vocab).tolist(), (flat % vocab).tolist()
        length = self.generated + 1
        ends = [t in self.stop_ids or length >= self.max_tokens for t in tokens]
        candidates = [(self.live[b] + (t,), b, t) for b, t in zip(beams, tokens, strict=True)]

        # the next live beams: the best k that do not finish (ruled-out ones fill the rest)
        order = sorted(range(len(candidates)), key=lambda i: ends[i])  # stable: score order kept
        chosen = order[: self.k]
        self.best_running = float(values[chosen[0]] + (NEG if ends[chosen[0]] else 0.0))
        keep = [i for i in chosen if not ends[i]]

        # finishing candidates among the k best, offered to the finished set
        penalized = values / (length**self.length_penalty)  # fp32, as the reference divides
        full = all(h.finished for h in self.finished) and self.early_stopping is True
        offered = []
        for i in range(len(candidates)):
            finishing = i < self.k and ends[i]
            score = penalized[i]  # each rule adds NEG on its own, in fp32, as the reference does
            for ruled_out in (full, not self.improvable, not finishing):
                score = score + NEG if ruled_out else score
            offered.append(Hypothesis(candidates[i][0], float(score), finishing))
        merged = self.finished + offered  # ties: the older entry first, like the reference
        ranked = sorted(range(len(merged)), key=lambda i: -merged[i].score)
        self.finished = [merged[i] for i in ranked[: self.k]]

        self.live = [candidates[i][0] for i in keep]
        self.scores = values[keep].clone() if keep else torch.zeros(0)
        self.generated = length
        self._update_heuristic()
        self.done = (
            not keep
            or not self.improvable
            or (self.early_stopping is True and all(h.finished for h in self.finished))
            or all(ends)
        )
        return [(candidates[i][1], candidates[i][2]) for i in keep]

    def _update_heuristic(self) -> None:
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_tokens
        else:
            best_length = self.generated
        best_possible = float(torch.tensor(self.best_running) / (best_length**self.length_penalty))
        if all(h.finished for h in self.finished):
            worst = float(torch.tensor(min(h.score for h in self.finished)))
        else:
            worst = NEG
        self.improvable = self.improvable and best_possible > worst

    def answers(self, n: int) -> list[Hypothesis]:
        """The best `n` finished hypotheses, best first."""
        assert self.done
        return self.finished[:n]


@dataclass(eq=False)
class BeamGroup:
    """One beam-search request in the engine: `width` KV-sharing beams (`members`, in the
    search's live order), `n` answer streams, one adapter hold for all of them."""

    search: BeamSearch
    streams: list[Any]  # RequestStream per answer
    root: Any  # the first Sequence (the prompt); its request id names the group
    entry: Any = None  # the adapter version held for the whole search (None: base)
    members: list[Any] = field(default_factory=list)
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # id(member) -> log-probs

    @property
    def width(self) -> int:
        """Running slots the group reserves while any of its beams runs."""
        return self.search.k

    def report(self, member: Any, logits: torch.Tensor) -> None:
        self.rows[id(member)] = logits.float().log_softmax(-1)

    def ready(self) -> bool:
        """Every live beam has its next-token log-probs (the beams move in lockstep)."""
        return bool(self.members) and all(id(m) in self.rows for m in self.members)

    def take_rows(self) -> torch.Tensor:
        rows = torch.stack([self.rows[id(m)] for m in self.members])
        self.rows.clear()
        return rows


class BeamHost(Protocol):
    """What the beam-search lifecycle uses of the engine (server/engine/engine.py)."""

    scheduler: Scheduler

    def leave(self, seq: Sequence) -> None:
        """The sequence leaves the scheduler (its blocks freed), counted; no output."""

    def ended(self, group: BeamGroup) -> None:
        """The search is over: the engine forgets its root sequence."""

    def release(self, entry: Entry) -> None: ...

    def emit(self, stream: Any, out: RequestOutput) -> None:
        """Hand an output to its stream with the step's others."""

    def record(self, seq: Sequence, reason: str, num_output_tokens: int) -> None: ...

    def detokenize(self, token_ids: list[int]) -> str: ...

    def running_changed(self) -> None:
        """The scheduler's running list changed (beams forked or dropped)."""


class BeamSearches:
    """The engine's beam searches (engine thread): answer stream id -> its group."""

    def __init__(self, host: BeamHost) -> None:
        self.host = host
        self.groups: dict[str, BeamGroup] = {}
        self._fork_ids = itertools.count(1)

    @staticmethod
    def start(root: Sequence, search: BeamSearch, streams: list[Any]) -> None:
        """Make `root` (the prompt, holding the adapter version) the first beam of a group."""
        root.group = BeamGroup(search, streams, root, root.entry, members=[root])

    def admit(self, group: BeamGroup) -> None:
        """The group entered the engine: its answer streams can be aborted by id."""
        self.groups.update((stream.request_id, group) for stream in group.streams)

    def advance(self, plan: StepPlan) -> None:
        """After a step: one search step for each group whose live beams all have their rows."""
        groups = {id(s.group): s.group for s, _ in plan.work if s.group is not None}
        for group in groups.values():
            if group.ready():
                self._step(group)

    def _step(self, group: BeamGroup) -> None:
        decisions = group.search.step(group.take_rows())
        if group.search.done:
            self._complete(group)
            return
        root_id = group.root.request_id
        group.members = self.host.scheduler.extend_beams(
            group.members, decisions, lambda: f"{root_id}#{next(self._fork_ids)}"
        )
        self.host.running_changed()

    def _complete(self, group: BeamGroup) -> None:
        """The search is over: each answer stream gets its hypothesis, whole."""
        answers = group.search.answers(len(group.streams))
        stop_ids = group.search.stop_ids
        root = group.root
        for stream, hypothesis in zip(group.streams, answers, strict=True):
            tokens = list(hypothesis.tokens)
            reason = "stop" if tokens and tokens[-1] in stop_ids else "length"
            out = RequestOutput(
                stream.request_id,
                self.host.detokenize(tokens),
                tokens,
                finished=True,
                finish_reason=reason,
                num_prompt_tokens=len(root.prompt_ids) - root.num_virtual,
                num_output_tokens=len(tokens),
                num_cached_tokens=root.num_cached_tokens or 0,
            )
            self.host.emit(stream, out)
            self.host.record(root, reason, len(tokens))
        self.end(group, None, None)

    def end(self, group: BeamGroup, reason: str | None, error: EngineFailure | None) -> None:
        """A beam search ends (answered, or `reason`: abort / error for every stream): its
        beams leave the scheduler, its hold goes, each answer is counted."""
        for member in group.members:
            self.host.leave(member)
        group.members = []
        if group.entry is not None:
            entry, group.entry = group.entry, None
            self.host.release(entry)
        self.host.ended(group)
        root = group.root
        for stream in group.streams:
            self.groups.pop(stream.request_id, None)
            if reason is not None:
                out = RequestOutput(
                    stream.request_id,
                    "",
                    [],
                    finished=True,
                    finish_reason=reason,
                    num_prompt_tokens=len(root.prompt_ids) - root.num_virtual,
                    error=error,
                )
                self.host.emit(stream, out)
                self.host.record(root, reason, 0)
