"""Agent clients as users run them, unchanged, against a live server (tiny random model, one
LoRA): LangChain's `bind_tools` in a two-turn loop with a tool message, and its
`with_structured_output` by function calling and by JSON schema, on the base and the adapter.

The models are pydantic models that forbid extra keys (`additionalProperties: false`): a random
model left an open object would add keys until its token limit, which a trained one does not."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.server.conftest import Server, lora_server

langchain_openai = pytest.importorskip("langchain_openai")
peft = pytest.importorskip("peft")
messages = pytest.importorskip("langchain_core.messages")


class Weather(BaseModel):
    """The weather in a city."""

    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=12)
    unit: str = Field(pattern="^[cf]$")


class Verdict(BaseModel):
    """Whether the claim holds."""

    model_config = ConfigDict(extra="forbid")
    holds: bool
    confidence: int = Field(ge=0, le=9)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("agents")
    with lora_server(tiny_model_dir, root, "--max-model-len", "2048") as srv:
        yield srv


def chat(server: Server, model: str, **kwargs):
    return langchain_openai.ChatOpenAI(
        model=model,
        base_url=f"{server.base_url}/v1",
        api_key="none",
        max_retries=0,
        max_tokens=160,
        temperature=1.0,
        **kwargs,
    )


@pytest.mark.parametrize("model", ["tiny", "lora"])
def test_bind_tools_in_a_two_turn_loop(server: Server, model: str) -> None:
    llm = chat(server, model, seed=1).bind_tools([Weather], tool_choice="any")
    history = [messages.HumanMessage("What is the weather in Paris?")]
    first = llm.invoke(history)
    assert first.tool_calls and first.tool_calls[0]["name"] == "Weather"
    Weather.model_validate(first.tool_calls[0]["args"])
    history += [
        first,
        messages.ToolMessage(json.dumps({"celsius": 18}), tool_call_id=first.tool_calls[0]["id"]),
    ]
    second = chat(server, model, seed=2).bind_tools([Weather], tool_choice="none").invoke(history)
    assert isinstance(second.content, str) and not second.tool_calls
    assert second.usage_metadata["input_tokens"] > first.usage_metadata["input_tokens"]


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
@pytest.mark.parametrize("model", ["tiny", "lora"])
def test_with_structured_output(server: Server, method: str, model: str) -> None:
    llm = chat(server, model, seed=3).with_structured_output(Verdict, method=method)
    verdict = llm.invoke("Is the sky green?")
    assert isinstance(verdict, Verdict)


CLIENTS_PYTHON = Path(__file__).resolve().parents[2] / ".venv-clients" / "bin" / "python"
INSTRUCTOR_CASES = Path(__file__).resolve().parents[1] / "clients" / "instructor_cases.py"


@pytest.mark.skipif(
    not CLIENTS_PYTHON.exists(),
    reason="instructor runs in its own venv (.venv-clients: its pins hold openai back); "
    "`make clients` builds it, and `make test` does",
)
@pytest.mark.parametrize("model", ["tiny", "lora"])
def test_instructor_modes(server: Server, model: str) -> None:
    """instructor's default mode (TOOLS), FUNCTIONS (deprecated; instructor 1.17 sends it as
    TOOLS), TOOLS_STRICT and JSON_SCHEMA, each in a user's script
    (tests/clients/instructor_cases.py) run by the clients' venv."""
    done = subprocess.run(
        [str(CLIENTS_PYTHON), str(INSTRUCTOR_CASES), server.base_url, model],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=INSTRUCTOR_CASES.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["case"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert set(results) == {"tools", "functions", "tools_strict", "json_schema"}
    for name, result in results.items():
        assert result["ok"], (name, result.get("error"))
        assert set(result["value"]) == {"city", "unit"}
