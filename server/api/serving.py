"""What /v1/completions and /v1/chat/completions share (the serving code, not a router):
request checks, sampling parameters, submitting one engine request per choice, collecting or
streaming their outputs, and aborting them all when the client goes away.

Each request is validated here, at the boundary, once: the schema, then `check_sampling`
(n, capacity, logit_bias and stop token ids, min_tokens), `check_context` and the routers'
own prompt checks (characters, empty, token id ranges). The engine counts only what it alone
knows (an adapter's virtual tokens); engine errors are answered through server/api/errors.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError
from starlette.types import Receive, Scope, Send

from adapterserve.server.api.errors import (
    APIError,
    engine_error,
    error_body,
    failure_error,
    invalid_request,
    truncate,
)
from adapterserve.server.api.schemas.common import ChatMessage, JsonSchemaSpec, SamplingFields
from adapterserve.server.api.tools.calls import ToolPlan
from adapterserve.server.api.tools.render import (
    functions_as_tools,
    template_supports_tools,
    tool_messages_to_text,
)
from adapterserve.server.api.tools.strict import StrictSchemaError, strict_schema
from adapterserve.server.config import Settings
from adapterserve.server.engine.client import EngineClient
from adapterserve.server.engine.constraint import GrammarError, GrammarUnavailable
from adapterserve.server.engine.errors import (
    EngineDeadError,
    EngineError,
    EngineFailure,
    EngineRestartingError,
)
from adapterserve.server.engine.intake import RequestStream
from adapterserve.server.engine.output import RequestOutput
from adapterserve.server.engine.sampling import SamplingParams, TokenLogprob

ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name, rendered as templates know it

log = logging.getLogger(__name__)

MIN_LOGPROB = -9999.0  # stands in for -inf: JSON has no infinities
# A lower temperature is greedy: dividing the logits by a subnormal one (1e-309 is 0 in float32)
# made infinities, NaN probabilities and a fatal engine fault.
MIN_TEMPERATURE = 1e-5
MAX_LOGGED_FIELDS = 10
MAX_LOGGED_FIELD_CHARS = 40
# The 200 of /v1/completions and /v1/chat/completions with "stream": true; before OpenAPI 3.2
# (itemSchema) the schema of an event stream describes one event.
STREAMED = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "string",
                    "description": 'a chunk (JSON), an error ({"error": ...}), or [DONE], last',
                }
            },
        }
    }
}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------- checks and parameters


def log_ignored_fields(request: Request, body: SamplingFields) -> None:
    """One line naming the fields of the request that this server ignores: OpenAI clients send
    extras, but a misspelt option shows up here. Names only: values may be private."""
    names = body.ignored_fields
    if not names:
        return
    shown = ", ".join(truncate(name, MAX_LOGGED_FIELD_CHARS) for name in names[:MAX_LOGGED_FIELDS])
    more = f" and {len(names) - MAX_LOGGED_FIELDS} more" if len(names) > MAX_LOGGED_FIELDS else ""
    log.info("%s ignored unknown fields: %s%s", request.url.path, shown, more)


def check_engine_accepting(request: Request, engine: EngineClient, settings: Settings) -> None:
    """503 while the server drains (SIGTERM) or after a fatal engine fault."""
    if not engine.healthy:
        raise engine_error(EngineDeadError("the engine is not running"), settings.retry_after_s)
    if engine.restarting:
        raise engine_error(
            EngineRestartingError("the engine is restarting"), settings.retry_after_s
        )
    if getattr(request.app.state, "draining", False) or not engine.ready:
        raise APIError(
            503,
            "The server is shutting down or not ready; retry on another replica.",
            code="not_ready",
            headers={"Retry-After": str(settings.retry_after_s)},
        )


def max_choices(settings: Settings) -> int:
    """Choices (prompts x n) one request may ask for: what an idle server holds at once, in
    its running batch and its waiting queue."""
    return settings.max_num_seqs + settings.max_queue_len


def check_sampling(
    body: SamplingFields,
    settings: Settings,
    vocab_size: int,
    max_tokens: int | None,
    num_prompts: int = 1,
) -> None:
    """Checks that need the model or settings; the schema did the rest."""
    if body.n > settings.max_n:
        raise invalid_request(
            f"'n' must be at most {settings.max_n} on this server, got {body.n}.", "n"
        )
    check_capacity(num_prompts, body.n, settings)
    for key in body.logit_bias or {}:
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise invalid_request(
                f"logit_bias keys must be token ids in [0, {vocab_size}), got {key[:20]!r}.",
                "logit_bias",
            )
    bad_stop_ids = [t for t in body.stop_token_ids or () if not 0 <= t < vocab_size]
    if bad_stop_ids:
        raise invalid_request(
            f"stop_token_ids must be in [0, {vocab_size}), got {bad_stop_ids[0]}.", "stop_token_ids"
        )
    if max_tokens is not None and body.min_tokens > max_tokens:
        raise invalid_request(
            f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens}).",
            "min_tokens",
        )


def check_capacity(num_prompts: int, n: int, settings: Settings) -> None:
    """More choices than the server can ever hold: a 400 naming the limit, not a 503 that
    invites a retry doomed to fail the same way (SECURITY.md 25)."""
    capacity = max_choices(settings)
    if num_prompts * n > capacity:
        raise invalid_request(
            f"The request asks for {num_prompts * n} completions ({num_prompts} prompt(s) x "
            f"n={n}); this server holds at most {capacity} at once (--max-num-seqs "
            f"{settings.max_num_seqs} + --max-queue-len {settings.max_queue_len}). Send fewer "
            "prompts or a smaller n.",
            "n" if n > 1 else "prompt",
            "too_many_sequences",
        )


def check_beam_search(body: SamplingFields, settings: Settings, num_prompts: int) -> int:
    """use_beam_search: the beam width (best_of, default n), checked against n, this server's
    limits and the fields beam search does not take (they would be silently ignored)."""
    width = getattr(body, "best_of", None) or body.n
    if body.n > width:
        raise invalid_request(
            f"n ({body.n}) must not exceed best_of ({width}): beam search returns the n best "
            "of best_of beams.",
            "n",
        )
    limit = min(settings.max_n, settings.max_num_seqs, settings.max_num_batched_tokens)
    if width > limit:
        raise invalid_request(
            f"best_of (the number of beams) must be at most {limit} on this server (--max-n, "
            f"--max-num-seqs, --max-num-batched-tokens), got {width}.",
            "best_of",
        )
    explicit = body.model_fields_set
    refused = [
        (
            "temperature",
            "temperature" in explicit and body.temperature >= MIN_TEMPERATURE,
            "0 or omitted",
        ),
        ("top_p", body.top_p != 1.0, "1"),
        ("top_k", body.top_k > 0, "0, -1 or omitted"),
        ("stop", bool(body.stop_list), "omitted (stop_token_ids are supported)"),
        ("logprobs", _asks_logprobs(body), "omitted"),
        ("presence_penalty", body.presence_penalty != 0.0, "0"),
        ("frequency_penalty", body.frequency_penalty != 0.0, "0"),
        ("logit_bias", bool(body.logit_bias), "omitted"),
    ]
    for name, bad, allowed in refused:
        if bad:
            raise invalid_request(
                f"Beam search is deterministic and scores the model's own log-probabilities: "
                f"{name} must be {allowed} with use_beam_search.",
                name,
            )
    check_capacity(num_prompts, width, settings)
    return width


def _asks_logprobs(body: SamplingFields) -> bool:
    """Completions' logprobs is an int (0 asks too), chat's a bool with top_logprobs beside it."""
    logprobs = getattr(body, "logprobs", None)
    return (logprobs is not None and logprobs is not False) or bool(
        getattr(body, "top_logprobs", None)
    )


def beam_params(params: SamplingParams, body: SamplingFields, width: int) -> SamplingParams:
    return dataclasses.replace(
        params,
        temperature=0.0,
        seed=None,
        beam_width=width,
        length_penalty=body.length_penalty,
        early_stopping=body.early_stopping,
    )


# Texts up to this many characters are tokenized on the event loop (well under a millisecond);
# longer ones on a worker thread (the tokenizer drops the GIL), so no stream waits for them.
INLINE_TOKENIZE_CHARS = 8192


def prompt_char_cap(settings: Settings, engine: EngineClient) -> int:
    """The most characters a prompt may have: --max-prompt-chars, and no more than the context
    can hold at the longest token's length (Tokenizer.max_token_chars), so a prompt that cannot
    fit is refused before it is tokenized."""
    return min(settings.max_prompt_chars, engine.max_model_len * engine.tokenizer.max_token_chars)


def check_prompt_chars(
    count: int, settings: Settings, engine: EngineClient, param: str, longest: int | None = None
) -> None:
    """A 400 before any tokenizing for `count` characters (a request's text, all its prompts
    together) over --max-prompt-chars, or for one prompt (`longest`, default all of it) that
    the context cannot hold."""
    if count > settings.max_prompt_chars:
        raise invalid_request(
            f"The {param} has {count} characters; this server accepts at most "
            f"{settings.max_prompt_chars}.",
            param,
        )
    per_token, longest = engine.tokenizer.max_token_chars, count if longest is None else longest
    if longest > engine.max_model_len * per_token:
        raise invalid_request(
            f"The {param} has {longest} characters: more than this model's maximum context length "
            f"of {engine.max_model_len} tokens can hold (a token is at most {per_token} "
            "characters). Shorten it.",
            param,
            "context_length_exceeded",
        )


async def off_loop(work: Callable[[], Any], chars: int) -> Any:
    """Run tokenizer `work` over `chars` characters: inline when short, else on a thread."""
    if chars <= INLINE_TOKENIZE_CHARS:
        return work()
    return await asyncio.to_thread(work)


def check_context(
    num_prompt_tokens: int,
    max_tokens: int,
    max_model_len: int,
    prompt_param: str,
    max_tokens_param: str = "max_tokens",
) -> None:
    if num_prompt_tokens > max_model_len:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{num_prompt_tokens} tokens. Shorten the prompt.",
            prompt_param,
            "context_length_exceeded",
        )
    if num_prompt_tokens + max_tokens > max_model_len:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens, but you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} "
            f"for the completion). Reduce {max_tokens_param} or the prompt.",
            max_tokens_param,
            "context_length_exceeded",
        )


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of a seeded request uses seed + i, kept inside torch's seed range."""
    return None if seed is None else (seed + index) % 2**64


def sampling_params(
    body: SamplingFields,
    max_tokens: int,
    seed: int | None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        seed=seed,
        stop=tuple(body.stop_list),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=tuple((int(k), v) for k, v in (body.logit_bias or {}).items()),
        include_stop_str_in_output=body.include_stop_str_in_output,
    )


# ---------------------------------------------------------------- engine requests


@dataclass(frozen=True)
class Job:
    """One engine request: choice `index` of the response."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams


async def submit(
    request: Request,
    engine: EngineClient,
    jobs: list[Job],
    request_id: str,
    settings: Settings,
    grammar: str | None = None,
) -> list[RequestStream]:
    """Add every job to the engine, or none (check_capacity refused what can never fit); with a
    structured-output `grammar`, each job gets its own matcher."""
    if grammar is not None:  # matchers built off the event loop (a big grammar takes a while)
        constraints = await engine.grammars.constraints_async(grammar, len(jobs))
        jobs = [
            dataclasses.replace(job, params=dataclasses.replace(job.params, constraint=c))
            for job, c in zip(jobs, constraints, strict=True)
        ]
    requests = [(job.prompt_ids, job.params, f"{request_id}-{job.index}") for job in jobs]
    try:
        streams = engine.add_requests(requests, model=request.state.model)
        await confirmed(engine, streams)
    except EngineError as exc:  # e.g. the adapter was deleted a moment ago: 404
        raise engine_error(exc, settings.retry_after_s) from None
    request.state.submitted = True  # the engine counts this request's outcome from now on
    return streams


async def submit_beams(
    request: Request,
    engine: EngineClient,
    prompts: list[list[int]],
    params: SamplingParams,
    n: int,
    request_id: str,
    settings: Settings,
) -> list[RequestStream]:
    """One beam search per prompt, all or none; the streams of their n answers each, in choice
    order (prompt p's answer i is choice p * n + i)."""
    searches = [
        (ids, params, [f"{request_id}-{p * n + i}" for i in range(n)])
        for p, ids in enumerate(prompts)
    ]
    try:
        groups = engine.add_beam_searches(searches, model=request.state.model)
        await confirmed(engine, [stream for streams in groups for stream in streams])
    except EngineError as exc:
        raise engine_error(exc, settings.retry_after_s) from None
    request.state.submitted = True
    return [stream for streams in groups for stream in streams]


async def confirmed(engine: EngineClient, streams: list[RequestStream]) -> None:
    """The engine's acceptance of `streams` (Engine.confirm); on a refusal, or when the
    client goes away meanwhile, every stream is aborted."""
    try:
        await engine.confirm(streams)
    except BaseException:
        abort_all(streams)
        raise


def abort_all(streams: Iterable[RequestStream]) -> None:
    for stream in streams:
        stream.abort()


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of all streams as (stream position, output), in arrival order; leaving early
    (error, cancellation, client gone) aborts every stream."""
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(position: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((position, output))
        except Exception as exc:
            queue.put_nowait((position, exc))
        finally:
            queue.put_nowait((position, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            position, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield position, item
    finally:
        for task in tasks:
            task.cancel()
        abort_all(streams)


# ---------------------------------------------------------------- results


@dataclass
class ChoiceResult:
    """Everything one engine request produced, accumulated from its delta outputs."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: EngineFailure | None = None

    def add(self, output: RequestOutput) -> None:
        self.text += output.text
        self.token_ids += output.token_ids
        self.logprobs += output.logprobs
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.num_prompt_tokens = output.num_prompt_tokens
        self.num_output_tokens = output.num_output_tokens
        self.num_cached_tokens = output.num_cached_tokens
        if output.finished:
            self.finish_reason = output.finish_reason
            self.error = output.error


def failed_output_error(
    output: RequestOutput | ChoiceResult, settings: Settings
) -> APIError | None:
    """The error to answer for a request the engine finished with an error or an abort."""
    return None if output.error is None else failure_error(output.error, settings.retry_after_s)


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


async def collect(
    request: Request, streams: list[RequestStream], results: list[ChoiceResult]
) -> None:
    """Feed every output into `results`; abort all streams if the client disconnects first."""

    async def consume() -> None:
        async with aclosing(merge_streams(streams)) as merged:
            async for position, output in merged:
                results[position].add(output)

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
            abort_all(streams)
    if consumer not in done:
        raise ClientDisconnected
    consumer.result()


def finite_logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def usage_dict(
    num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int = 0
) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: prompt tokens served from the prefix cache."""
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
        "prompt_tokens_details": {"cached_tokens": num_cached_tokens},
    }


# ---------------------------------------------------------------- server-sent events


def sse(data: Any) -> str:
    payload = (
        data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False)
    )
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(error: APIError) -> str:
    return sse(error_body(error.message, error.type, error.param, error.code))


async def event_stream(
    streams: list[RequestStream],
    settings: Settings,
    render: Callable[[int, RequestOutput], Iterable[str]],
    prologue: Iterable[str] = (),
    epilogue: Callable[[], Iterable[str]] = tuple,
    on_error: Callable[[APIError], Iterable[str]] = lambda error: [sse_error(error)],
    done: str | None = SSE_DONE,
) -> AsyncIterator[str]:
    """SSE events for the merged streams; an engine failure becomes `on_error`'s events (one
    error event). Ends with `done` ([DONE]; the Responses API sends none) unless the client is
    gone; leaving early aborts every stream."""
    try:
        for event in prologue:
            yield event
        async with aclosing(merge_streams(streams)) as merged:
            async for position, output in merged:
                failure = failed_output_error(output, settings) if output.finished else None
                if failure is not None:
                    for event in on_error(failure):
                        yield event
                    break
                for event in render(position, output):
                    yield event
            else:
                for event in epilogue():
                    yield event
    except EngineError as exc:
        for event in on_error(engine_error(exc, settings.retry_after_s)):
            yield event
    except Exception:
        log.exception("error while streaming a response")
        error = APIError(
            500, "The server had an error while streaming the response.", "server_error"
        )
        for event in on_error(error):
            yield event
    finally:
        abort_all(streams)
    if done is not None:
        yield done


class EventStreamResponse(StreamingResponse):
    """An SSE response that notices a client disconnect even while no token is due, and always
    closes its generator, whose `finally` aborts the engine requests."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sender = asyncio.ensure_future(self.stream_response(send))
        listener = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, listener):
                task.cancel()
            await asyncio.gather(sender, listener, return_exceptions=True)
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        if not sender.cancelled() and isinstance(sender.exception(), Exception):
            log.info("stream ended early: %r", sender.exception())


async def render_chat(
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    engine: EngineClient,
    add_special_tokens: bool = False,
    tools: ToolPlan | None = None,
) -> list[int]:
    """Token ids of a conversation through the model's own chat template (never a request's),
    as /v1/chat/completions and /tokenize render it; a template that refuses it is a 400.
    Long conversations render and tokenize off the event loop (check_prompt_chars first).
    With `tools`, the tools and the conversation's calls and results as the plan renders them
    (server/api/tools/calls.py); without, a history of calls still renders as text for a
    template that does not know them; OpenAI's deprecated function calling renders as tool
    calling (server/api/tools/render.py)."""
    plain = functions_as_tools([message_dict(m) for m in messages])
    template_tools = None
    if tools is not None:
        plain, template_tools = tools.prompt_messages(plain)
    elif any(m.get("tool_calls") or m["role"] == "tool" for m in plain) and not (
        template_supports_tools(engine.tokenizer.chat_template)
    ):
        plain = tool_messages_to_text(plain)
    chars = sum(len(str(m.get("content") or "")) for m in plain) + len(str(template_tools or ""))

    def render() -> list[int]:
        return engine.tokenizer.encode_chat(
            plain, add_generation_prompt, add_special_tokens, template_tools
        )

    try:
        return await off_loop(render, chars)
    except (ValueError, TemplateError) as exc:
        raise invalid_request(
            f"The messages cannot be rendered with this model's chat template: {str(exc)[:200]}",
            "messages",
        ) from None


def message_dict(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates take it: role (OpenAI's newer names as templates know them),
    text content, and the tool fields it has."""
    out: dict[str, Any] = {"role": ROLE_ALIASES.get(message.role, message.role)}
    out["content"] = message.text
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.function_call is not None:
        out["function_call"] = message.function_call.model_dump()
    return out


def response_schema(spec: JsonSchemaSpec) -> dict[str, Any]:
    """The schema outputs must follow: with `strict: true`, OpenAI's strict mode (every object
    closed, every property required; what strict mode does not support is a 400 naming it),
    else the schema as given (an object without `additionalProperties: false` stays open)."""
    if not spec.strict:
        return spec.schema_
    try:
        return strict_schema(spec.schema_)
    except StrictSchemaError as exc:
        raise invalid_request(f"response_format.json_schema: {exc}", "response_format") from None


GUIDED = (
    ("guided_json", "json_schema"),
    ("guided_regex", "regex"),
    ("guided_choice", "choice"),
    ("guided_grammar", "grammar"),
)


async def constraint_grammar(
    body: SamplingFields, engine: EngineClient, beam: bool = False, tools: ToolPlan | None = None
) -> str | None:
    """The request's structured-output grammar (response_format, one guided_* field, or the
    calls its `tools` plan forces or allows: server/api/tools/calls.py), compiled and checked against the model's tokenizer in the grammar sandbox
    (server/engine/constraint.py), before anything is submitted: a second constraint, one
    beam search or min_tokens cannot honour, or a grammar that does not compile, crashes the
    compiler or overruns its deadline is a 400 naming the field; a sandbox that cannot start
    is a 503."""
    found = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("json_object", None, "response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        found.append(("json_schema", response_schema(fmt.json_schema), "response_format"))
    found += [
        (kind, getattr(body, name), name)
        for name, kind in GUIDED
        if getattr(body, name) is not None
    ]
    tool_grammar = tools.grammar() if tools is not None else None
    if tool_grammar is not None:
        if found:
            raise invalid_request(
                f"{found[0][2]} cannot be combined with tools unless tool_choice is 'none'.",
                found[0][2],
            )
        found.append(("grammar", tool_grammar, "tools"))
    if not found:
        return None
    kind, spec, param = found[0]
    if len(found) > 1:
        names = ", ".join(p for _, _, p in found)
        raise invalid_request(f"Give one structured-output constraint, got {names}.", found[1][2])
    if beam:
        raise invalid_request(f"{param} cannot be combined with use_beam_search.", param)
    if body.min_tokens:
        raise invalid_request(
            f"min_tokens cannot be combined with {param}: the grammar decides where the output "
            "ends.",
            "min_tokens",
        )
    try:
        return await engine.grammars.compile_async(kind, spec)
    except GrammarError as exc:
        raise invalid_request(f"{param} cannot be compiled: {exc}", param) from None
    except GrammarUnavailable as exc:
        raise APIError(
            503,
            f"Structured outputs are unavailable for now: {exc}.",
            code="grammar_sandbox_unavailable",
            headers={"Retry-After": "5"},
        ) from None
