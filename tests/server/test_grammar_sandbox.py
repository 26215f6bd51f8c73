"""Issue 24 items 1-3: a client's grammar never runs first in the serving process, and nothing
slow runs on the event loop. The grammar bombs of the audit, replayed against a real server
subprocess: each is a 400 naming its field ("grammar too complex: ..."), the server keeps
serving, a refused bomb is answered from the cache, and a concurrent stream keeps flowing
while one compiles. In process: a prompt longer than the context can hold is refused before it
is tokenized, and long texts are tokenized on a worker thread."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from adapterserve.server.api import serving
from adapterserve.server.config import Settings
from adapterserve.server.main import create_app
from tests.server.conftest import Server, start_server, stop_server

GRAMMAR_TIMEOUT_S = 1.0


def ref_chain(depth: int) -> dict:
    """A JSON schema of JSON depth 4 whose $defs form a $ref chain `depth` long: 1000 overflowed
    llguidance's stack (SIGSEGV) inside validate_grammar_with_warnings."""
    defs: dict = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(depth)}
    defs[f"d{depth}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def lark_chain(depth: int) -> str:
    """`r_i: "t" r_{i+1}` x depth: 3000 (58 KB) segfaulted the server."""
    rules = [f'r{i}: "t" r{i + 1}' for i in range(depth)]
    return "\n".join(["start: r0", *rules, f'r{depth}: "end"'])


def gbnf_chain(depth: int) -> str:
    """The same chain in GBNF (GBNF's conversion grows about quadratically with the rules: a
    chain of 5000 ran for many seconds, then segfaulted; BENCHMARKS.md, 'Figures quoted from the
    code')."""
    rules = [f'r{i} ::= "t" r{i + 1}' for i in range(depth)]
    return "\n".join(["root ::= r0", *rules, f'r{depth} ::= "end"'])


def enum_bomb(size: int = 20_000) -> dict:
    """0.7 MB: an enum of 20k objects froze every stream, then a 500 (a panic); BENCHMARKS.md,
    'Hardening replays: heavy requests beside a running stream (issue 24)'."""
    return {"enum": [{"k": i, "v": f"x{i}"} for i in range(size)]}


BOMBS = {
    "ref_chain": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": ref_chain(1000)},
        }
    },
    "lark_chain": {"guided_grammar": lark_chain(3000)},
    "gbnf_chain": {"guided_grammar": gbnf_chain(3000)},
    "enum": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": enum_bomb()},
        }
    },
}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("sandbox") / "server.log",
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "256",
        "--grammar-timeout-s",
        str(GRAMMAR_TIMEOUT_S),
    )
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log(), srv.log()[-4000:]


def complete(server: Server, **extra) -> httpx.Response:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, **extra}
    return httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120)


def assert_serving(server: Server) -> None:
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    assert complete(server).status_code == 200


@pytest.mark.parametrize("bomb", list(BOMBS))
def test_a_grammar_bomb_is_a_400_naming_its_field_and_the_server_lives(
    server: Server, bomb: str
) -> None:
    extra = BOMBS[bomb]
    response = complete(server, **extra)
    assert response.status_code == 400, response.text[:500]
    error = response.json()["error"]
    assert error["param"] == next(iter(extra)), error
    assert "grammar too complex" in error["message"], error
    assert_serving(server)


def test_a_refused_bomb_is_answered_from_the_cache(server: Server) -> None:
    """The second send of a bomb costs no worker: one crash in the log, the same 400 twice."""
    crashes = server.log().count("crashed its sandbox worker")
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": ref_chain(1001)}}
    first, second = (complete(server, response_format=fmt) for _ in range(2))
    assert first.status_code == second.status_code == 400
    assert first.json() == second.json()
    assert "crashed" in first.json()["error"]["message"]
    assert server.log().count("crashed its sandbox worker") == crashes + 1
    assert_serving(server)


def test_a_stream_keeps_flowing_while_a_bomb_compiles(server: Server) -> None:
    """Tokens of a running stream keep arriving while the 0.7 MB enum compiles to its deadline
    (before the sandbox, every stream froze while it compiled). 1 s is the bound tested (the issue
    asks 0.5 s; BENCHMARKS.md has the measured gaps)."""

    async def run() -> tuple[float, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            arrivals: list[float] = []
            started = asyncio.Event()

            async def stream() -> None:
                body = {
                    "model": "tiny",
                    "prompt": "hello",
                    "max_tokens": 200,
                    "ignore_eos": True,
                    "stream": True,
                }
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            arrivals.append(time.monotonic())
                            if len(arrivals) == 5:
                                started.set()

            streaming = asyncio.ensure_future(stream())
            await started.wait()
            begin = time.monotonic()
            fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": enum_bomb(20_001)}}
            refused = await client.post(
                "/v1/completions",
                json={"model": "tiny", "prompt": "x", "max_tokens": 4, "response_format": fmt},
            )
            end = time.monotonic()
            await streaming
            during = [
                b - a
                for a, b in zip(arrivals, arrivals[1:], strict=False)
                if b >= begin and a <= end
            ]
            return max(during, default=end - begin), refused

    worst_gap, refused = asyncio.run(run())
    assert refused.status_code == 400, refused.text[:300]
    assert "longer than" in refused.json()["error"]["message"]
    assert worst_gap < 1.0, f"a stream stalled {worst_gap:.2f} s while a grammar compiled"


# ---------------------------------------------------------------- tokenization (item 3)


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(
        model=str(tiny_model_dir),
        device="cpu",
        kv_cache_memory_mb=16,
        cache_dir=tmp_path_factory.mktemp("tokenize"),
        max_model_len=256,
        served_model_name="m",
    )
    with TestClient(create_app(settings)) as client:
        yield client


ROUTES = {
    "completions": (
        "/v1/completions",
        lambda text: {"model": "m", "prompt": text, "max_tokens": 1},
    ),
    "chat": (
        "/v1/chat/completions",
        lambda text: {
            "model": "m",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 1,
        },
    ),
    "tokenize": ("/tokenize", lambda text: {"prompt": text}),
}


@pytest.fixture
def encodes(app: TestClient, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Every call of the engine's tokenizer: (characters, whether it ran on the event loop)."""
    tokenizer = app.app.state.engine.tokenizer
    calls: list[tuple[int, bool]] = []
    monkeypatch.setattr(tokenizer, "encode", recording(tokenizer.encode, calls))
    return calls


def recording(parse, calls: list[tuple[int, bool]]):
    """`parse(text, ...)` that first notes (len(text), whether it runs on an event loop)."""

    def spy(text: str, *args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        calls.append((len(text), on_loop))
        return parse(text, *args, **kwargs)

    return spy


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_prompt_the_context_cannot_hold_is_refused_untokenized(
    app: TestClient, encodes, route: str
) -> None:
    """256 tokens of context x the longest token's characters: one more character cannot fit,
    whatever it says. (A 1M-character prompt was tokenized, 600k tokens, before its 400.)"""
    path, body = ROUTES[route]
    engine = app.app.state.engine
    cap = engine.max_model_len * engine.tokenizer.max_token_chars
    assert cap < 4000  # under the server's --max-prompt-chars: the context decides
    response = app.post(path, json=body("a" * (cap + 1)))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "characters" in error["message"], error
    assert encodes == []
    assert app.post(path, json=body("a" * 10)).status_code == 200 and encodes


@pytest.mark.parametrize("route", list(ROUTES))
def test_long_texts_are_tokenized_off_the_event_loop(
    app: TestClient, encodes, route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serving, "INLINE_TOKENIZE_CHARS", 100)
    path, body = ROUTES[route]
    assert app.post(path, json=body("word " * 20)).status_code == 200
    assert app.post(path, json=body("word " * 40)).status_code == 200
    short, long = encodes[0], encodes[-1]
    assert short[1] and not long[1], encodes


def test_a_large_json_body_is_checked_off_the_event_loop(
    app: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard's parse and walk of a body (depth, lone surrogates) runs on a thread past
    INLINE_JSON_BYTES: a multi-MiB list of token ids took seconds on the loop (BENCHMARKS.md, 'Figures quoted from the code')."""
    from adapterserve.server.api import guards

    seen: list[tuple[int, bool]] = []
    monkeypatch.setattr(guards, "loads", recording(guards.loads, seen))
    small = {"prompt": "hi", "max_tokens": 1}
    big = {"prompt": "hi", "max_tokens": 1, "stop_token_ids": [1] * (guards.INLINE_JSON_BYTES // 2)}
    assert app.post("/v1/completions", json={**small, "model": "m"}).status_code == 200
    app.post("/v1/completions", json=big)
    assert [on_loop for _, on_loop in seen] == [True, False], seen


def test_a_matcher_is_handed_over_with_its_first_mask_filled(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """The first mask of a big grammar can take seconds (a 5000-way anyOf, in the serving process
    after the sandbox passed it; BENCHMARKS.md, 'Figures quoted from the code'): it is filled before the request reaches the engine,
    whose thread would otherwise wait for it with every stream in the step."""
    from adapterserve.server.engine import constraint
    from adapterserve.server.engine.constraint import Grammars
    from adapterserve.server.model.tokenizer import Tokenizer

    fill = constraint.fill_bitmask

    def slow_fill(*args):
        time.sleep(0.3)
        return fill(*args)

    grammars = Grammars(Tokenizer(tiny_model_dir).hf, 384)
    request.addfinalizer(grammars.close)
    grammar = grammars.compile(
        "json_schema", {"type": "object", "properties": {"a": {"type": "integer"}}}
    )
    monkeypatch.setattr(constraint, "fill_bitmask", slow_fill)
    constraints = grammars.constraints(grammar, 3)
    assert all(c._fill is None or c._fill.done() for c in constraints)


def test_masks_apply_as_llguidance_does_without_its_compiled_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """llguidance.torch.apply_token_bitmask_inplace is torch.compile'd: its first call compiled
    on the engine thread, every stream waiting (BENCHMARKS.md, 'Figures quoted from the code'). Ours gives the same -inf pattern on
    random bitmasks (sizes not a multiple of 32, negative words), and mask() never calls it."""
    import llguidance.torch as llt
    import torch

    from adapterserve.server.engine import constraint as module
    from adapterserve.server.engine.constraint import Constraint, apply_bitmask

    generator = torch.Generator().manual_seed(0)
    for vocab in (1, 31, 32, 33, 384, 49152):
        bitmask = torch.randint(
            -(2**31), 2**31 - 1, (1, (vocab + 31) // 32), dtype=torch.int32, generator=generator
        )
        logits = torch.randn(vocab, generator=generator)
        ours, theirs = logits.clone(), logits.clone()
        apply_bitmask(ours, bitmask[0])
        llt.apply_token_bitmask_inplace(theirs[None], bitmask)
        assert torch.equal(ours, theirs), vocab

    def refuse(*args):
        raise AssertionError("the compiled llguidance kernel was called")

    monkeypatch.setattr(llt, "apply_token_bitmask_inplace", refuse)
    constraint = Constraint.__new__(Constraint)
    constraint.vocab_size, constraint._fill = 40, None
    constraint._bitmask = torch.tensor([0b101, 0], dtype=torch.int32)
    constraint.matcher = None
    monkeypatch.setattr(module, "fill_bitmask", lambda *args: None)
    logits = torch.zeros(48)
    constraint.mask(logits, frozenset({1}))
    assert torch.isfinite(logits).nonzero().flatten().tolist() == [0, 2]


def test_structured_outputs_never_import_torchs_compiler(tiny_model_dir: Path) -> None:
    """`import llguidance.torch` imports torch's compiler (every stream stalled on a
    server's first structured request; BENCHMARKS.md, 'Figures quoted from the code'): a constrained sequence's whole life, made, masked and
    fed, goes without it (a fresh interpreter, as a server is)."""
    import subprocess
    import sys

    code = f"""
import sys, torch
from adapterserve.server.engine.constraint import Grammars
from adapterserve.server.model.tokenizer import Tokenizer
grammars = Grammars(Tokenizer({str(tiny_model_dir)!r}).hf, 384)
c = grammars.constraints(grammars.compile("regex", "ab+"), 2)[0]
logits = torch.zeros(384)
c.mask(logits, frozenset())
c.consume(int(logits.argmax()))
grammars.close()
print(sorted(m for m in sys.modules if m.startswith(("llguidance.torch", "torch._dynamo", "torch._inductor"))))
"""
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
