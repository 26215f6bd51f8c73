"""vLLM's tokenizer endpoints: POST /tokenize, POST /detokenize, GET /tokenizer_info, so that a
client (lm-evaluation-harness's remote tokenizer) tokenizes exactly as the server does without
a local copy. Served at the root, as vLLM does, behind the API key like every other route. The
base model and its adapters share one tokenizer; `model` is checked (404) all the same."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from adapterserve.server.api.deps import get_engine, get_settings, resolve_model
from adapterserve.server.api.errors import error_responses, invalid_request
from adapterserve.server.api.schemas.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from adapterserve.server.api.serving import check_prompt_chars, off_loop, render_chat
from adapterserve.server.config import Settings
from adapterserve.server.engine.client import EngineClient

router = APIRouter(tags=["tokenizer"])


@router.post("/tokenize", response_model=TokenizeResponse, responses=error_responses(404))
async def tokenize(
    body: TokenizeRequest,
    request: Request,
    engine: EngineClient = Depends(get_engine),
    settings: Settings = Depends(get_settings),
) -> JSONResponse:
    resolve_model(request, body.model)
    if body.prompt is not None:
        prompt = body.prompt
        check_prompt_chars(len(prompt), settings, engine, "prompt")
        special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await off_loop(
            lambda: engine.tokenizer.encode(prompt, add_special_tokens=special), len(prompt)
        )
    else:
        check_prompt_chars(sum(m.num_chars for m in body.messages), settings, engine, "messages")
        ids = await render_chat(
            body.messages, body.add_generation_prompt, engine, bool(body.add_special_tokens)
        )
    strs = engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return JSONResponse(
        {
            "count": len(ids),
            "max_model_len": engine.max_model_len,
            "tokens": ids,
            "token_strs": strs,
        }
    )


@router.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(404))
async def detokenize(
    body: DetokenizeRequest, request: Request, engine: EngineClient = Depends(get_engine)
) -> JSONResponse:
    resolve_model(request, body.model)
    if len(body.tokens) > engine.max_model_len:
        raise invalid_request(
            f"{len(body.tokens)} tokens; at most this model's context ({engine.max_model_len}) "
            "are decoded at once.",
            "tokens",
        )
    bad = next((t for t in body.tokens if not 0 <= t < engine.vocab_size), None)
    if bad is not None:
        raise invalid_request(
            f"Token ids must be in [0, {engine.vocab_size}), got {bad}.", "tokens"
        )
    # special tokens kept: a round trip of /tokenize's ids gives back its text
    return JSONResponse({"prompt": engine.tokenizer.decode(body.tokens, skip_special_tokens=False)})


@router.get("/tokenizer_info", response_model=TokenizerInfo)
async def tokenizer_info(engine: EngineClient = Depends(get_engine)) -> JSONResponse:
    hf = engine.tokenizer.hf
    return JSONResponse(
        {
            "tokenizer_class": type(hf).__name__,
            "vocab_size": engine.tokenizer.vocab_size,
            "model_max_length": engine.max_model_len,
            "eos_token": hf.eos_token,
            "bos_token": hf.bos_token,
            "pad_token": hf.pad_token,
            "unk_token": hf.unk_token,
            "eos_token_ids": sorted(engine.tokenizer.eos_token_ids),
            "chat_template": hf.chat_template if isinstance(hf.chat_template, str) else None,
        }
    )
