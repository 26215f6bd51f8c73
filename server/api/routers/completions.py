"""POST /v1/completions: OpenAI's legacy completions, with echo + prompt logprobs for
lm-evaluation-harness style log-likelihood requests (echo, logprobs, max_tokens 0)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from adapterserve.server.api.deps import get_engine, get_settings, resolve_model
from adapterserve.server.api.errors import error_responses, invalid_request
from adapterserve.server.api.schemas.completions import CompletionRequest, CompletionResponse
from adapterserve.server.api.serving import (
    STREAMED,
    ChoiceResult,
    ClientDisconnected,
    EventStreamResponse,
    Job,
    beam_params,
    check_beam_search,
    check_context,
    check_engine_accepting,
    check_prompt_chars,
    check_sampling,
    choice_seed,
    collect,
    constraint_grammar,
    engine_error,
    event_stream,
    failed_output_error,
    finite_logprob,
    log_ignored_fields,
    new_id,
    off_loop,
    sampling_params,
    sse,
    submit,
    submit_beams,
    usage_dict,
)
from adapterserve.server.config import Settings
from adapterserve.server.engine.client import EngineClient
from adapterserve.server.engine.errors import EngineError
from adapterserve.server.engine.output import RequestOutput
from adapterserve.server.engine.sampling import TokenLogprob

router = APIRouter(tags=["completions"])


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    text: str  # what `echo` returns


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={200: {"content": STREAMED}, **error_responses(404, 503)},
)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    engine: EngineClient = Depends(get_engine),
    settings: Settings = Depends(get_settings),
) -> Response:
    log_ignored_fields(request, body)
    resolve_model(request, body.model)
    _check_request(body, settings, engine)
    grammar = await constraint_grammar(
        body, engine, beam=body.use_beam_search and (body.best_of or body.n) > 1
    )
    prompts = await _prompts(body, engine, settings)
    for prompt in prompts:
        check_context(len(prompt.token_ids), body.max_tokens, engine.max_model_len, "prompt")
    check_engine_accepting(request, engine, settings)
    jobs = _jobs(body, prompts)
    response_id = new_id("cmpl")
    if body.use_beam_search and (body.best_of or body.n) > 1:
        params = beam_params(jobs[0].params, body, body.best_of or body.n)
        prompt_ids = [p.token_ids for p in prompts]
        streams = await submit_beams(
            request, engine, prompt_ids, params, body.n, response_id, settings
        )
    else:
        streams = await submit(request, engine, jobs, response_id, settings, grammar)
    view = _CompletionView(body, engine, settings, prompts, response_id, request.state.model)
    if body.stream:
        return EventStreamResponse(
            event_stream(streams, settings, view.render, epilogue=view.usage_events)
        )
    results = [ChoiceResult(job.index) for job in jobs]
    try:
        await collect(request, streams, results)
    except ClientDisconnected:
        return Response(status_code=499)
    except EngineError as exc:
        raise engine_error(exc, settings.retry_after_s) from None
    return JSONResponse(view.response(results))


def _check_request(body: CompletionRequest, settings: Settings, engine: EngineClient) -> None:
    if body.use_beam_search:
        check_beam_search(body, settings, _num_prompts(body.prompt))
        if body.max_tokens < 1:
            raise invalid_request(
                "Beam search generates: max_tokens must be at least 1.", "max_tokens"
            )
    elif body.best_of is not None and body.best_of != body.n:
        raise invalid_request(
            f"best_of must equal n ({body.n}) or be omitted (or set use_beam_search), got "
            f"{body.best_of}.",
            "best_of",
        )
    check_sampling(body, settings, engine.vocab_size, body.max_tokens, _num_prompts(body.prompt))


def _num_prompts(prompt: str | list) -> int:
    """A list of texts or of token-id lists holds several prompts; a text or ids, one."""
    return len(prompt) if isinstance(prompt, list) and isinstance(prompt[0], str | list) else 1


async def _prompts(
    body: CompletionRequest, engine: EngineClient, settings: Settings
) -> list[Prompt]:
    """Token ids (and echo text) per prompt; text length is capped before tokenizing (each
    prompt by what the context holds, all by --max-prompt-chars), long texts tokenized off the
    event loop."""
    raw = body.prompt
    if isinstance(raw, str) or isinstance(raw[0], str):
        texts = [raw] if isinstance(raw, str) else list(raw)
        check_prompt_chars(
            sum(len(t) for t in texts),
            settings,
            engine,
            "prompt",
            longest=max(len(t) for t in texts),
        )
        encode = engine.tokenizer.encode
        ids = await off_loop(lambda: [encode(t) for t in texts], sum(len(t) for t in texts))
        prompts = [Prompt(i, t) for i, t in zip(ids, texts, strict=True)]
    else:
        id_lists = [raw] if isinstance(raw[0], int) else raw
        prompts = [Prompt(_checked_ids(ids, engine), "") for ids in id_lists]
    if any(not p.token_ids for p in prompts):
        raise invalid_request(
            "The prompt is empty after tokenization; send at least one token.", "prompt"
        )
    if body.echo:
        prompts = [
            p if p.text else Prompt(p.token_ids, engine.tokenizer.decode(p.token_ids))
            for p in prompts
        ]
    return prompts


def _checked_ids(ids: list[int], engine: EngineClient) -> list[int]:
    vocab_size = engine.vocab_size
    if len(ids) > engine.max_model_len:
        raise invalid_request(
            f"The prompt has {len(ids)} tokens; this model's maximum context length is {engine.max_model_len}.",
            "prompt",
            "context_length_exceeded",
        )
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid_request(
            f"Prompt token ids must be in [0, {vocab_size}), got {bad}.", "prompt"
        )
    return list(ids)


def _jobs(body: CompletionRequest, prompts: list[Prompt]) -> list[Job]:
    """One engine request per choice. One beam is greedy decoding (as `generate(num_beams=1)`
    is); wider beam searches take the first job's parameters as theirs."""
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    if body.use_beam_search:
        body = body.model_copy(update={"temperature": 0.0})
    return [
        Job(
            index=p * body.n + i,
            prompt_ids=prompt.token_ids,
            params=sampling_params(
                body, body.max_tokens, choice_seed(body.seed, i), body.logprobs, prompt_logprobs
            ),
        )
        for p, prompt in enumerate(prompts)
        for i in range(body.n)
    ]


class _CompletionView:
    """Turns engine outputs into OpenAI completion objects, whole or as stream chunks."""

    def __init__(
        self,
        body: CompletionRequest,
        engine: EngineClient,
        settings: Settings,
        prompts: list[Prompt],
        response_id: str,
        model: str,
    ):
        self.body = body
        self.engine = engine
        self.settings = settings
        self.prompts = prompts
        self.id = response_id
        self.model = model
        self.created = int(time.time())
        self.streamed: dict[int, ChoiceResult] = {}  # choice index -> what was streamed so far

    def prompt_of(self, index: int) -> Prompt:
        return self.prompts[index // self.body.n]

    # ---- whole response

    def response(self, results: list[ChoiceResult]) -> dict:
        for result in results:
            failure = failed_output_error(result, self.settings)
            if failure is not None:
                raise failure
        choices = [self.choice(r) for r in results]
        return CompletionResponse(
            id=self.id, model=self.model, choices=choices, usage=self.usage(results)
        ).model_dump(mode="json")

    def choice(self, result: ChoiceResult) -> dict:
        echo = self.prompt_of(result.index).text if self.body.echo else ""
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = self.logprobs(result, result.prompt_logprobs, result.logprobs, len(echo))
        return {
            "index": result.index,
            "text": echo + result.text,
            "logprobs": logprobs,
            "finish_reason": result.finish_reason,
        }

    def usage(self, results: Iterable[ChoiceResult]) -> dict:
        results = list(results)
        firsts = [r for r in results if r.index % self.body.n == 0]  # one per prompt
        prompt_tokens = sum(r.num_prompt_tokens for r in firsts)
        cached = sum(r.num_cached_tokens for r in firsts)
        return usage_dict(prompt_tokens, sum(r.num_output_tokens for r in results), cached)

    def logprobs(
        self,
        result: ChoiceResult,
        prompt_entries: list[TokenLogprob | None] | None,
        entries: list[TokenLogprob],
        offset: int,
    ) -> dict:
        out: dict[str, list] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        if self.body.echo and prompt_entries is not None:
            prompt_ids = self.prompt_of(result.index).token_ids
            self._append_logprobs(out, zip(prompt_ids, prompt_entries, strict=False), 0)
        self._append_logprobs(out, ((e.token_id, e) for e in entries), offset)
        return out

    def _append_logprobs(
        self, out: dict, entries: Iterable[tuple[int, TokenLogprob | None]], offset: int
    ) -> None:
        for token_id, entry in entries:
            text = self.engine.token_text(token_id)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            out["token_logprobs"].append(None if entry is None else finite_logprob(entry.logprob))
            out["top_logprobs"].append(None if entry is None else self._top(entry))

    def _top(self, entry: TokenLogprob) -> dict[str, float]:
        top = {self.engine.token_text(t): finite_logprob(lp) for t, lp in entry.top.items()}
        top.setdefault(self.engine.token_text(entry.token_id), finite_logprob(entry.logprob))
        return top

    # ---- streaming

    def render(self, index: int, output: RequestOutput) -> list[str]:
        """One chunk per engine output; the first chunk of a choice carries the echo."""
        state = self.streamed.get(index)
        first = state is None
        if first:
            state = self.streamed[index] = ChoiceResult(index)
        echo_len = len(self.prompt_of(index).text) if self.body.echo else 0
        echo = self.prompt_of(index).text if first and self.body.echo else ""
        logprobs = None
        if self.body.logprobs is not None:
            prompt_entries = output.prompt_logprobs if first else None
            logprobs = self.logprobs(
                state, prompt_entries, output.logprobs, echo_len + len(state.text)
            )
        state.add(output)
        if not (echo or output.text or output.finished or (logprobs and output.token_ids)):
            return []  # text held back (partial character or possible stop string)
        choice = {
            "index": index,
            "text": echo + output.text,
            "logprobs": logprobs,
            "finish_reason": output.finish_reason if output.finished else None,
        }
        return [sse(self._chunk([choice], None))]

    def usage_events(self) -> list[str]:
        if not self.body.include_usage:
            return []
        return [sse(self._chunk([], self.usage(self.streamed.values())))]

    def _chunk(self, choices: list[dict], usage: dict | None) -> dict:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
        }
