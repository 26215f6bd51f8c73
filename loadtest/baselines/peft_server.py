"""The "HF PEFT" baseline: transformers + PEFT behind the same OpenAI subset, one request at a
time, switching the active adapter per request with `set_adapter`.

    python -m adapterserve.loadtest.baselines.peft_server --model HF_DIR --port 8001 [--adapter-dir DIR]

Serves GET /v1/models, POST /v1/completions (with `stream: true` SSE chunks, `ignore_eos`,
`stream_options.include_usage`), POST/GET/DELETE /v1/adapters (same multipart shape as
adapterserve) and GET /health. LoRA and IA3 (peft tuners) and prefix / prompt tuning (peft
prompt learning) each live in their own PeftModel over a private copy of the base, since
peft cannot mix these families in one model; LLM-Adapters bottleneck adapters are refused
with 400 (peft has no such tuner). Never imports adapterserve.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

log = logging.getLogger("peft_baseline")
ALLOWED_FILES = ("adapter_config.json", "adapter_model.safetensors")
SUPPORTED = ("LORA", "IA3", "PREFIX_TUNING", "PROMPT_TUNING")
DIM_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


class UnsupportedAdapter(ValueError):
    """An adapter this baseline cannot serve (HTTP 400)."""


class AdapterBank:
    """The pristine base model plus one PeftModel per adapter family, created on first use."""

    def __init__(self, base: torch.nn.Module) -> None:
        self.base = base
        self.groups: dict[str, Any] = {}
        self.adapters: dict[str, str] = {}  # name -> peft_type

    def add(self, name: str, directory: Path) -> str:
        """Load the adapter in `directory` as `name` (replacing one of that name)."""
        from peft import PeftModel

        config = json.loads((directory / "adapter_config.json").read_text())
        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type not in SUPPORTED:
            raise UnsupportedAdapter(
                f"peft_type {peft_type!r} is not supported by the PEFT baseline; expected one of {SUPPORTED}"
            )
        if name in self.adapters:
            self.remove(name)
        group = self.groups.get(peft_type)
        if group is None:
            model = PeftModel.from_pretrained(
                copy.deepcopy(self.base), str(directory), adapter_name=name
            )
            self.groups[peft_type] = model.eval()
        else:
            group.load_adapter(str(directory), adapter_name=name)
        self.adapters[name] = peft_type
        return peft_type

    def remove(self, name: str) -> None:
        self.groups[self.adapters.pop(name)].delete_adapter(name)

    def model_for(self, name: str | None) -> torch.nn.Module:
        """The model to generate with; the adapter made active."""
        if name is None:
            return self.base
        group = self.groups[self.adapters[name]]
        group.set_adapter(name)
        return group


class QueueStreamer(BaseStreamer):
    """Hands each generated token id from generate's thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first pushes the prompt ids
            self.prompt_seen = True
            return
        for token in value.flatten().tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class Cancelled(StoppingCriteria):
    """Stops generation once the client is gone."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=1)


def error(status: int, message: str, param: str | None = None) -> HTTPException:
    return HTTPException(
        status, {"message": message, "type": "invalid_request_error", "param": param}
    )


class Baseline:
    """Model, tokenizer, adapters and the one lock that serializes every request."""

    def __init__(
        self, model_dir: Path, device: str, adapter_root: Path, model_id: str | None = None
    ) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        dtype = torch.float32 if device == "cpu" else torch.float16
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
        self.bank = AdapterBank(base)
        self.device = device
        self.model_id = model_id or model_dir.name
        self.config = json.loads((model_dir / "config.json").read_text())
        self.adapter_root = adapter_root
        self.lock = asyncio.Lock()
        self.created = int(time.time())

    def card(self, model_id: str) -> dict:
        card = {
            "id": model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "peft-baseline",
        }
        if model_id == self.model_id:
            return (
                card
                | {"root": model_id, "parent": None}
                | {f: self.config.get(f) for f in DIM_FIELDS}
            )
        return card | {
            "root": model_id,
            "parent": self.model_id,
            "kind": self.bank.adapters[model_id],
        }

    def resolve(self, model: str) -> str | None:
        if model == self.model_id:
            return None
        if model not in self.bank.adapters:
            raise error(
                404, f"The model {model!r} does not exist; GET /v1/models lists them.", "model"
            )
        return model

    async def generate(
        self, body: CompletionRequest, adapter: str | None, cancel: threading.Event
    ) -> AsyncIterator[int]:
        """Token ids as generate() produces them, holding the lock throughout."""
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        inputs = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        kwargs = (
            self.generate_kwargs(body)
            | dict(inputs)
            | {
                "streamer": QueueStreamer(loop, queue),
                "stopping_criteria": StoppingCriteriaList([Cancelled(cancel)]),
            }
        )
        async with self.lock:
            model = self.bank.model_for(adapter)
            if body.seed is not None:
                torch.manual_seed(body.seed)
            job = loop.run_in_executor(None, self.run_generate, model, kwargs)
            try:
                while (token := await queue.get()) is not None:
                    yield token
            finally:  # also on client disconnect: stop and wait, so the lock guards the model
                cancel.set()
                await job

    def run_generate(self, model: torch.nn.Module, kwargs: dict) -> None:
        with torch.inference_mode():
            model.generate(**kwargs)

    def generate_kwargs(self, body: CompletionRequest) -> dict:
        sample = body.temperature > 0
        kwargs: dict = {
            "max_new_tokens": body.max_tokens,
            "do_sample": sample,
            "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        }
        if sample:
            kwargs |= {"temperature": body.temperature, "top_p": body.top_p}
        else:
            kwargs |= {"temperature": None, "top_p": None, "top_k": None}
        if body.ignore_eos:
            kwargs["min_new_tokens"] = body.max_tokens
        return kwargs


class Detokenizer:
    """Incremental decoding that holds back an incomplete UTF-8 character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[self.sent :], len(text)
        return delta


def chunk(response_id: str, model: str, created: int, text: str, finish: str | None) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def create_app(baseline: Baseline) -> FastAPI:
    app = FastAPI(title="PEFT baseline")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        return JSONResponse({"error": detail | {"code": None}}, status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        ids = [baseline.model_id, *sorted(baseline.bank.adapters)]
        return {"object": "list", "data": [baseline.card(i) for i in ids]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        baseline.resolve(model_id)
        return baseline.card(model_id)

    @app.post("/v1/adapters", status_code=201)
    async def upload(
        name: str = Form(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"),
        files: list[UploadFile] = File(...),
        replace: bool = Query(False),
    ) -> dict:
        if name == baseline.model_id or (name in baseline.bank.adapters and not replace):
            raise error(
                409, f"An adapter named {name!r} exists; pass ?replace=true to replace it.", "name"
            )
        with tempfile.TemporaryDirectory(dir=baseline.adapter_root) as staging:
            directory = await save_upload(Path(staging), files)
            async with baseline.lock:
                try:
                    kind = await asyncio.to_thread(baseline.bank.add, name, directory)
                except UnsupportedAdapter as e:
                    raise error(400, str(e), "files") from None
                except (ValueError, KeyError, RuntimeError, OSError) as e:
                    raise error(400, f"PEFT could not load the adapter: {e}", "files") from None
            target = baseline.adapter_root / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(str(directory), target)
        return {"id": name, "object": "adapter", "kind": kind}

    @app.get("/v1/adapters")
    async def list_adapters() -> dict:
        return {
            "object": "list",
            "data": [baseline.card(n) for n in sorted(baseline.bank.adapters)],
        }

    @app.delete("/v1/adapters/{name}")
    async def delete(name: str) -> dict:
        baseline.resolve(name)
        async with baseline.lock:
            baseline.bank.remove(name)
        shutil.rmtree(baseline.adapter_root / name, ignore_errors=True)
        return {"id": name, "object": "adapter", "deleted": True}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        adapter = baseline.resolve(body.model)
        response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        cancel = threading.Event()
        events = completion_events(baseline, body, adapter, cancel, response_id, created)
        if body.stream:
            return StreamingResponse(sse(events, cancel), media_type="text/event-stream")
        text, usage = "", None
        async for event in events:
            text += "".join(c["text"] for c in event["choices"])
            usage = event.get("usage") or usage
        result = chunk(response_id, body.model, created, text, "length")
        return result | {"usage": usage}

    return app


async def completion_events(
    baseline: Baseline,
    body: CompletionRequest,
    adapter: str | None,
    cancel: threading.Event,
    response_id: str,
    created: int,
) -> AsyncIterator[dict]:
    """OpenAI completion chunks: one per decoded piece, a finish chunk, then usage."""
    detokenizer, count = Detokenizer(baseline.tokenizer), 0
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    tokens = baseline.generate(body, adapter, cancel)
    try:
        async for token in tokens:
            count += 1
            yield chunk(response_id, body.model, created, detokenizer.add(token), None)
    finally:
        await tokens.aclose()
    finish = "length" if count >= body.max_tokens else "stop"
    yield chunk(response_id, body.model, created, "", finish)
    prompt_tokens = len(baseline.tokenizer(prompt)["input_ids"])
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": count,
        "total_tokens": prompt_tokens + count,
    }
    if not body.stream or (body.stream_options and body.stream_options.include_usage):
        yield {
            "id": response_id,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": [],
            "usage": usage,
        }


async def sse(events: AsyncGenerator[dict, None], cancel: threading.Event) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n".encode()
        yield b"data: [DONE]\n\n"
    finally:
        cancel.set()  # client gone or done: stop generate() either way
        await events.aclose()


async def save_upload(staging: Path, files: list[UploadFile]) -> Path:
    directory = staging / "adapter"
    directory.mkdir()
    for upload in files:
        name = Path(upload.filename or "").name
        if name not in ALLOWED_FILES:
            raise error(
                400,
                f"unexpected file {upload.filename!r}: expected only {list(ALLOWED_FILES)}",
                "files",
            )
        (directory / name).write_bytes(await upload.read())
    missing = [f for f in ALLOWED_FILES if not (directory / f).is_file()]
    if missing:
        raise error(
            400,
            f"missing {missing}: upload adapter_config.json and adapter_model.safetensors",
            "files",
        )
    return directory


def load_adapter_dir(baseline: Baseline, root: Path) -> None:
    """Every sub-folder of `root` with an adapter_config.json, named after the folder."""
    for directory in sorted(p for p in root.iterdir() if (p / "adapter_config.json").is_file()):
        try:
            baseline.bank.add(directory.name, directory)
        except UnsupportedAdapter as e:
            log.warning("skipping %s: %s", directory.name, e)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft_server", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, required=True, help="HF model directory (config.json + safetensors)"
    )
    parser.add_argument("--served-model-name", help="base model id (default: the directory name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--adapter-dir", type=Path, help="load every adapter folder under this directory"
    )
    parser.add_argument(
        "--storage-dir", type=Path, help="where uploads are kept (default: a temp dir)"
    )
    parser.add_argument("--num-threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not (args.model / "config.json").is_file():
        raise SystemExit(
            f"--model: expected an HF model directory with config.json, got {args.model}"
        )
    logging.basicConfig(level=args.log_level.upper())
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    storage = args.storage_dir or Path(tempfile.mkdtemp(prefix="peft-baseline-"))
    storage.mkdir(parents=True, exist_ok=True)
    baseline = Baseline(args.model, args.device, storage, args.served_model_name)
    if args.adapter_dir:
        load_adapter_dir(baseline, args.adapter_dir)
    uvicorn.run(create_app(baseline), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
