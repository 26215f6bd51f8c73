"""POST /v1/chat/completions: messages rendered by the model's own chat template only."""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from adapterserve.server.api.deps import get_engine, get_settings, resolve_model
from adapterserve.server.api.errors import error_responses, invalid_request
from adapterserve.server.api.schemas.chat import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    FunctionName,
    NamedToolChoice,
)
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
    render_chat,
    sampling_params,
    sse,
    submit,
    submit_beams,
    usage_dict,
)
from adapterserve.server.api.tools.calls import (
    ToolPlan,
    ToolRequestError,
    ToolStream,
    plan_functions,
    plan_tools,
)
from adapterserve.server.config import Settings
from adapterserve.server.engine.client import EngineClient
from adapterserve.server.engine.errors import EngineError
from adapterserve.server.engine.intake import RequestStream
from adapterserve.server.engine.output import RequestOutput
from adapterserve.server.engine.sampling import TokenLogprob

router = APIRouter(tags=["chat"])


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: {"content": STREAMED}, **error_responses(404, 503)},
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    engine: EngineClient = Depends(get_engine),
    settings: Settings = Depends(get_settings),
) -> Response:
    log_ignored_fields(request, body)
    response_id = new_id("chatcmpl")
    started = await start_chat(body, request, engine, settings, response_id)
    streams, jobs, tools = started.streams, started.jobs, started.tools
    view = _ChatView(body, engine, settings, response_id, request.state.model, tools)
    if body.stream:
        events = event_stream(streams, settings, view.render, view.role_events(), view.usage_events)
        return EventStreamResponse(events)
    results = [ChoiceResult(job.index) for job in jobs]
    try:
        await collect(request, streams, results)
    except ClientDisconnected:
        return Response(status_code=499)
    except EngineError as exc:
        raise engine_error(exc, settings.retry_after_s) from None
    return JSONResponse(view.response(results))


@dataclass
class StartedChat:
    """A chat request in the engine: its choices' streams, their jobs, its tool plan."""

    streams: list[RequestStream]
    jobs: list[Job]
    tools: ToolPlan | None


async def start_chat(
    body: ChatCompletionRequest,
    request: Request,
    engine: EngineClient,
    settings: Settings,
    response_id: str,
) -> StartedChat:
    """Check, render (tools included) and submit a chat request: what /v1/chat/completions and
    /v1/responses share. Refusals are APIErrors naming the field."""
    resolve_model(request, body.model)
    _check_request(body, settings, engine)
    tools = _tool_plan(body, engine, settings)
    prompt_ids = await _render(body, engine, tools)
    max_tokens = _max_tokens(body, len(prompt_ids), engine.max_model_len)
    check_sampling(body, settings, engine.vocab_size, max_tokens)
    width = (body.best_of or body.n) if body.use_beam_search else 0
    grammar = await constraint_grammar(body, engine, beam=width > 1, tools=tools)
    check_engine_accepting(request, engine, settings)
    top = (body.top_logprobs or 0) if body.logprobs else None
    if body.use_beam_search:  # one beam is greedy decoding, as generate(num_beams=1) is
        body = body.model_copy(update={"temperature": 0.0})
    jobs = [
        Job(i, prompt_ids, sampling_params(body, max_tokens, choice_seed(body.seed, i), top))
        for i in range(body.n)
    ]
    if width > 1:
        params = beam_params(jobs[0].params, body, width)
        streams = await submit_beams(
            request, engine, [prompt_ids], params, body.n, response_id, settings
        )
    else:
        streams = await submit(request, engine, jobs, response_id, settings, grammar)
    return StartedChat(streams, jobs, tools)


def _check_request(body: ChatCompletionRequest, settings: Settings, engine: EngineClient) -> None:
    if body.use_beam_search:
        check_beam_search(body, settings, 1)
        if body.max_new_tokens == 0:
            param = (
                "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            )
            raise invalid_request(f"Beam search generates: {param} must be at least 1.", param)
    elif body.best_of is not None and body.best_of != body.n:
        raise invalid_request(
            f"best_of must equal n ({body.n}) or be omitted (or set use_beam_search), got "
            f"{body.best_of}.",
            "best_of",
        )
    # top_logprobs without logprobs: true is ignored, as its schema description says.
    check_prompt_chars(sum(m.num_chars for m in body.messages), settings, engine, "messages")


def _tool_plan(
    body: ChatCompletionRequest, engine: EngineClient, settings: Settings
) -> ToolPlan | None:
    """The request's tools, tool_choice and parallel_tool_calls as a plan, or its deprecated
    functions and function_call (or a 400)."""
    choice, legacy = body.tool_choice, body.function_call
    template = engine.tokenizer.chat_template
    call_format = None if settings.tool_call_parser == "auto" else settings.tool_call_parser
    try:
        tools = plan_tools(
            [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
            choice.model_dump() if isinstance(choice, NamedToolChoice) else choice,
            body.parallel_tool_calls,
            template,
            call_format,
        )
        functions = plan_functions(
            [f.model_dump(exclude_none=True) for f in body.functions or ()],
            legacy.model_dump() if isinstance(legacy, FunctionName) else legacy,
            tools is not None,
            template,
            call_format,
        )
        return tools or functions  # not both: plan_functions refuses them
    except ToolRequestError as exc:
        raise invalid_request(exc.message, exc.param) from None


async def _render(
    body: ChatCompletionRequest, engine: EngineClient, tools: ToolPlan | None
) -> list[int]:
    """Token ids of the conversation through the model's own template (never the request's)."""
    ids = await render_chat(body.messages, body.add_generation_prompt, engine, tools=tools)
    if not ids:
        raise invalid_request("The conversation renders to an empty prompt.", "messages")
    return ids


def _max_tokens(body: ChatCompletionRequest, num_prompt_tokens: int, max_model_len: int) -> int:
    """The requested limit, checked against the context; no limit = the rest of the context."""
    _check_never_too_many(body, max_model_len)
    requested = body.max_new_tokens
    if requested is None:
        if num_prompt_tokens >= max_model_len:
            raise invalid_request(
                f"The conversation has {num_prompt_tokens} tokens and fills this model's context of "
                f"{max_model_len} tokens; shorten the messages.",
                "messages",
                "context_length_exceeded",
            )
        return max_model_len - num_prompt_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    check_context(num_prompt_tokens, requested, max_model_len, "messages", param)
    return requested


def _check_never_too_many(body: ChatCompletionRequest, max_model_len: int) -> None:
    """Both limits, even the one max_completion_tokens overrides: the schema says that neither
    can reach the context length (a prompt has at least one token)."""
    for param in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, param)
        if value is not None and value >= max_model_len:
            raise invalid_request(
                f"'{param}' is {value}, but this model's context of {max_model_len} tokens also "
                f"holds the prompt; ask for at most {max_model_len - 1}.",
                param,
                "context_length_exceeded",
            )


class _ChatView:
    """Turns engine outputs into chat completion objects, whole or as stream chunks."""

    def __init__(
        self,
        body: ChatCompletionRequest,
        engine: EngineClient,
        settings: Settings,
        response_id: str,
        model: str,
        tools: ToolPlan | None = None,
    ) -> None:
        self.body = body
        self.tools = tools
        self.tool_streams: dict[int, ToolStream] = {}
        self.engine = engine
        self.settings = settings
        self.id = response_id
        self.model = model
        self.created = int(time.time())
        self.streamed: dict[int, ChoiceResult] = {}

    def response(self, results: list[ChoiceResult]) -> dict:
        for result in results:
            failure = failed_output_error(result, self.settings)
            if failure is not None:
                raise failure
        choices = [
            {
                "index": r.index,
                "message": message,
                "logprobs": self.logprobs(r.logprobs),
                "finish_reason": reason,
            }
            for r in results
            for message, reason in [self._message(r)]
        ]
        usage = usage_dict(
            results[0].num_prompt_tokens,
            sum(r.num_output_tokens for r in results),
            results[0].num_cached_tokens,
        )
        return ChatCompletionResponse(
            id=self.id, model=self.model, choices=choices, usage=usage
        ).model_dump(mode="json")

    def _message(self, result: ChoiceResult) -> tuple[dict, str | None]:
        """A whole choice's message and finish reason; with tools, its calls read back."""
        if self.tools is None or self.tools.mode == "none":
            return {"role": "assistant", "content": result.text}, result.finish_reason
        content, calls, reason = self.tools.answer(result.text, result.finish_reason)
        if self.tools.functions:  # the deprecated shape: the one call, without an id
            call = calls[0]["function"] if calls else None
            return {"role": "assistant", "content": content, "function_call": call}, reason
        return {"role": "assistant", "content": content, "tool_calls": calls or None}, reason

    def logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        if not self.body.logprobs:
            return None
        k = self.body.top_logprobs or 0
        return {
            "content": [
                self._token(e.token_id, e.logprob) | {"top_logprobs": self._top(e, k)}
                for e in entries
            ]
        }

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self.engine.token_text(token_id)
        return {
            "token": text,
            "logprob": finite_logprob(logprob),
            "bytes": list(self.engine.tokenizer.token_bytes(token_id)),
        }

    def _top(self, entry: TokenLogprob, k: int) -> list[dict]:
        ranked = sorted(entry.top.items(), key=lambda item: item[1], reverse=True)[:k]
        return [self._token(t, lp) for t, lp in ranked]

    # ---- streaming

    def role_events(self) -> list[str]:
        """The first chunk of every choice names the role, as OpenAI's does."""
        choices = [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(self.body.n)
        ]
        return [sse(self._chunk([c], None)) for c in choices]

    def render(self, index: int, output: RequestOutput) -> list[str]:
        state = self.streamed.setdefault(index, ChoiceResult(index))
        state.add(output)
        if self.tools is not None and self.tools.mode != "none":
            return self._render_tools(index, output)
        if not (output.text or output.finished or (self.body.logprobs and output.token_ids)):
            return []  # text held back (partial character or possible stop string)
        choice = {
            "index": index,
            "delta": {"content": output.text} if output.text or not output.finished else {},
            "logprobs": self.logprobs(output.logprobs),
            "finish_reason": output.finish_reason if output.finished else None,
        }
        return [sse(self._chunk([choice], None))]

    def _render_tools(self, index: int, output: RequestOutput) -> list[str]:
        """A choice's deltas through its tool stream: text as content, calls as OpenAI streams
        them (the first delta of a call with its id, type and name, then its arguments)."""
        assert self.tools is not None
        stream = self.tool_streams.get(index)
        if stream is None:
            stream = self.tool_streams[index] = self.tools.stream()
        pieces = stream.feed(output.text)
        if output.finished:
            pieces += stream.finish()
        logprobs = self.logprobs(output.logprobs) if output.token_ids else None
        if logprobs is not None and not pieces:
            pieces = [{}]  # the tokens' logprobs go out although their text is held back
        chunks = []
        for i, delta in enumerate(pieces):
            choice = {
                "index": index,
                "delta": delta,
                "finish_reason": None,
                "logprobs": logprobs if i == 0 else None,
            }
            chunks.append(sse(self._chunk([choice], None)))
        if output.finished:
            reason = self.tools.finish_reason(stream.called, output.finish_reason)
            choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
            chunks.append(sse(self._chunk([choice], None)))
        return chunks

    def usage_events(self) -> list[str]:
        if not self.body.include_usage or not self.streamed:
            return []
        results = list(self.streamed.values())
        usage = usage_dict(
            results[0].num_prompt_tokens,
            sum(r.num_output_tokens for r in results),
            results[0].num_cached_tokens,
        )
        return [sse(self._chunk([], usage))]

    def _chunk(self, choices: list[dict], usage: dict | None) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
        }
