"""instructor against a live adapterserve, run in the clients' own venv (.venv-clients, the
versions instructor's users get: its pins hold openai back): `python instructor_cases.py URL
MODEL` prints one JSON line per case, {"case", "ok", "value" or "error"}.

It imports only instructor, openai and pydantic, never adapterserve: this is a user's script.
tests/server/test_agent_clients.py runs it and checks each line."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable

import instructor
import openai
from pydantic import BaseModel, ConfigDict, Field


class Weather(BaseModel):
    """The weather in a city."""

    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=12)
    unit: str = Field(pattern="^[cf]$")


def main(url: str, model: str) -> None:
    base = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    common = {
        "model": model,
        "messages": ask,
        "max_tokens": 200,
        "temperature": 1.0,
        "max_retries": 0,
    }

    def single(mode: instructor.Mode) -> Callable[[], object]:
        client = instructor.from_openai(base, mode=mode)
        return lambda: client.chat.completions.create(response_model=Weather, seed=1, **common)

    cases = {
        "tools": single(instructor.Mode.TOOLS),
        "functions": single(instructor.Mode.FUNCTIONS),
        "tools_strict": single(instructor.Mode.TOOLS_STRICT),
        "json_schema": single(instructor.Mode.JSON_SCHEMA),
    }
    for name, run in cases.items():
        try:
            value = run()
            shown = (
                [v.model_dump() for v in value] if isinstance(value, list) else value.model_dump()
            )
            print(json.dumps({"case": name, "ok": True, "value": shown}), flush=True)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the next case runs
            error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"
            print(json.dumps({"case": name, "ok": False, "error": error}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
