"""From a step's logits to request outputs: penalties, sampling, logprobs, prompt logprobs,
incremental detokenization, and every rule that ends a sequence (`StopRules`).

It needs no model: a tokenizer (`decode`, `eos_token_ids`) and logits rows. The engine calls
`process(plan, logits)` after each forward step, with `num_computed` already counting the
plan's tokens and the logits rows that BatchBuilder selected (every row of a chunk whose
prompt logprobs are due, else the last row of a sequence that samples), in plan order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from adapterserve.server.engine.detokenizer import Decoder, IncrementalDetokenizer
from adapterserve.server.engine.errors import EngineFailure
from adapterserve.server.engine.sampling import (
    SamplingParams,
    TokenLogprob,
    apply_penalties,
    sample,
    top_logprobs,
)
from adapterserve.server.engine.scheduler import Sequence, StepPlan


class TokenizerLike(Decoder, Protocol):
    """What the processor needs of a tokenizer (server.model.tokenizer.Tokenizer has it)."""

    eos_token_ids: frozenset[int]


@dataclass
class RequestOutput:
    """What one step produced for a request (deltas since its previous output)."""

    request_id: str
    text: str  # new text since the previous output
    token_ids: list[int]  # new token ids since the previous output
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, with the first output
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens read from the prefix cache, not computed
    error: EngineFailure | None = None  # why it ended: set with finish_reason error or abort


@dataclass(frozen=True)
class Stop:
    reason: str  # "stop" or "length"
    text_end: int | None = None  # a stop string: the text ends here (in the detokenizer's text)


class StopRules:
    """Every rule that ends a sequence, in one place.

    - EOS (unless `ignore_eos`) or a `stop_token_ids` token: "stop", the token kept.
    - A `stop` string: "stop", the text cut before it (after it with
      `include_stop_str_in_output`). Text that may be the start of one is held back.
    - None of these before `min_tokens` output tokens: EOS and stop ids are masked until then,
      and stop strings are looked for only from then on.
    - `max_tokens` output tokens (0: none, the prompt only), or the context full: "length".
    - A structured-output grammar complete (its end consumed): "stop", even with `ignore_eos`.
    """

    def __init__(self, eos_token_ids: frozenset[int] | set[int], max_model_len: int) -> None:
        self.eos_token_ids, self.max_model_len = frozenset(eos_token_ids), max_model_len

    def stop_ids(self, params: SamplingParams) -> set[int]:
        """Tokens that end the sequence once `min_tokens` are out."""
        ids = set(params.stop_token_ids)
        return ids if params.ignore_eos else ids | self.eos_token_ids

    def banned(self, seq: Sequence) -> set[int]:
        """Tokens the next sample may not be: the stop ids while below `min_tokens`."""
        return self.stop_ids(seq.params) if len(seq.output_ids) < seq.params.min_tokens else set()

    def holdback(self, params: SamplingParams) -> int:
        """Characters held back from streaming: they may be the start of a stop string."""
        return max((len(s) - 1 for s in params.stop), default=0)

    def before_sampling(self, seq: Sequence) -> Stop | None:
        """A sequence whose prompt is in the cache and that asks for no token at all."""
        return Stop("length") if seq.params.max_tokens == 0 else None

    def after_token(self, seq: Sequence, token: int, detok: IncrementalDetokenizer) -> Stop | None:
        """After `token` was appended to the output and to `detok`."""
        p, n = seq.params, len(seq.output_ids)
        if p.constraint is not None and p.constraint.done:
            return Stop("stop")
        if n >= p.min_tokens:
            text_end = self._stop_string_end(p, detok)
            if text_end is not None:
                return Stop("stop", text_end)
            if token in self.stop_ids(p):
                return Stop("stop")
        if n >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return Stop("length")
        return None

    def _stop_string_end(self, p: SamplingParams, detok: IncrementalDetokenizer) -> int | None:
        if not p.stop:
            return None
        # A stop string counts where it ends in the text this token completed (as vLLM: one
        # completed while stops were not checked, under min_tokens, is ignored). It starts at
        # most len(stop) - 1 characters before that text, which the holdback kept unsent: the
        # cut never falls into text the client already has.
        hits = [
            (i, s)
            for s in p.stop
            if (i := detok.text.find(s, max(0, detok.new_from - len(s) + 1))) >= 0
        ]
        if not hits:
            return None
        index, stop = min(hits)
        return index + len(stop) if p.include_stop_str_in_output else index


class OutputProcessor:
    """Per-sequence output state (detokenizer, prompt logprobs) from `add` to the last output."""

    def __init__(self, tokenizer: TokenizerLike, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.rules = StopRules(tokenizer.eos_token_ids, max_model_len)
        self._detok: dict[str, IncrementalDetokenizer] = {}

    def add(self, seq: Sequence) -> None:
        """A new sequence (on the engine thread: its seeded generator is torch state too)."""
        holdback = self.rules.holdback(seq.params)
        self._detok[seq.request_id] = IncrementalDetokenizer(self.tokenizer, holdback)
        if seq.params.seed is not None:
            seq.generator = torch.Generator(device="cpu").manual_seed(seq.params.seed)

    def process(self, plan: StepPlan, logits: torch.Tensor) -> list[tuple[Sequence, RequestOutput]]:
        """One step's outputs; a finished one (`out.finished`) is the sequence's last."""
        outputs, samplers, row = [], [], 0
        for seq, n in plan.work:
            used = n if seq.wants_prompt_logprobs else int(seq.num_computed == seq.num_tokens)
            rows = logits[row : row + used]  # (used, V)
            row += used
            if seq.wants_prompt_logprobs:
                self._record_prompt_logprobs(seq, rows, n)
            if seq.num_computed < seq.num_tokens:
                continue  # a prompt chunk with more to come
            if seq.group is not None:  # a beam: its beam search decides (Engine._advance)
                seq.group.report(seq, rows[-1])
                continue
            stop = self.rules.before_sampling(seq)
            if stop is not None:
                outputs.append((seq, self.finish(seq, stop.reason)))
            else:
                samplers.append((seq, rows[-1]))
        if samplers:
            outputs += self._sample(samplers)
        return outputs

    def finish(
        self, seq: Sequence, reason: str, error: EngineFailure | None = None
    ) -> RequestOutput:
        """The last output of a sequence that ends without a new token (an abort hands out no
        more text); its state goes."""
        detok = self._detok.pop(seq.request_id, None)
        text = detok.flush() if detok is not None and reason != "abort" else ""
        return self._output(seq, text, [], [], reason, error)

    # ---- sampling -------------------------------------------------------------------------
    def _sample(
        self, samplers: list[tuple[Sequence, torch.Tensor]]
    ) -> list[tuple[Sequence, RequestOutput]]:
        seqs = [seq for seq, _ in samplers]
        params = [seq.params for seq in seqs]
        raw = torch.stack([row for _, row in samplers])  # (B, V) fp32
        logits = apply_penalties(raw.clone(), [seq.output_ids for seq in seqs], params)  # (B, V)
        for row, seq in enumerate(seqs):
            banned = self.rules.banned(seq)
            if banned:
                logits[row, list(banned)] = float("-inf")
            if seq.params.constraint is not None:
                seq.params.constraint.mask(logits[row], self.rules.eos_token_ids)
        tokens = sample(logits, params, [seq.generator for seq in seqs])  # (B,)
        for seq, token in zip(seqs, tokens.tolist(), strict=True):
            if seq.params.constraint is not None:
                seq.params.constraint.consume(token)
        logprobs = self._token_logprobs(raw, tokens, params)  # of the model, before penalties
        now = time.monotonic()
        outputs = []
        for seq, token, lp in zip(seqs, tokens.tolist(), logprobs, strict=True):
            seq.first_token_time = seq.first_token_time or now
            seq.output_ids.append(token)
            outputs.append((seq, self._emit(seq, token, lp)))
        return outputs

    def _token_logprobs(
        self, raw: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]
    ) -> list[TokenLogprob | None]:
        want = [p.logprobs for p in params]
        if all(w is None for w in want):
            return [None] * len(params)
        k = max(w or 0 for w in want)
        rows = top_logprobs(raw.log_softmax(dim=-1), tokens, k)
        for row, w in zip(rows, want, strict=True):
            row.top = dict(list(row.top.items())[: w or 0])
        return [row if w is not None else None for row, w in zip(rows, want, strict=True)]

    def _emit(self, seq: Sequence, token: int, lp: TokenLogprob | None) -> RequestOutput:
        detok = self._detok[seq.request_id]
        detok.add(token)
        stop = self.rules.after_token(seq, token, detok)
        lps = [lp] if lp else []
        if stop is None:
            return self._output(seq, detok.take(), [token], lps)
        del self._detok[seq.request_id]
        text = detok.flush() if stop.text_end is None else detok.cut(stop.text_end)
        return self._output(seq, text, [token], lps, stop.reason)

    # ---- prompt logprobs and the output object --------------------------------------------
    def _record_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, n: int) -> None:
        """Row i of a chunk predicts its token i+1; the first prompt token has no logprob.
        Indexed by position, so a chunk computed again (after a preemption) replaces its own."""
        start = seq.num_computed - n
        known = (seq.prompt_logprobs or [])[: start + 1]
        known += [None] * (start + 1 - len(known))  # positions before the first chunk: None
        targets = seq.prompt_ids[start + 1 : start + n + 1]
        if targets:
            lp = logits[: len(targets)].log_softmax(dim=-1)  # (len(targets), V)
            k = seq.params.prompt_logprobs or 0
            known += top_logprobs(lp, torch.tensor(targets, device=lp.device), k)
        seq.prompt_logprobs = known

    def _output(
        self,
        seq: Sequence,
        text: str,
        tokens: list[int],
        lps: list[TokenLogprob],
        reason: str | None = None,
        error: EngineFailure | None = None,
    ) -> RequestOutput:
        out = RequestOutput(
            seq.request_id,
            text,
            tokens,
            lps,
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=len(seq.prompt_ids) - seq.num_virtual,
            num_output_tokens=len(seq.output_ids),
            num_cached_tokens=seq.num_cached_tokens or 0,
            error=error,
        )
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            real = seq.prompt_logprobs[seq.num_virtual :]  # the client's own prompt tokens
            if real and seq.prefix_kv is None:
                real[0] = None  # like the base model: the first prompt token has no logprob
            out.prompt_logprobs, seq.prompt_logprobs_sent = real, True
        return out
