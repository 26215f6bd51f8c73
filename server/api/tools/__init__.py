"""OpenAI tool calling and strict structured outputs, as pure functions the routers call:
strict.py (OpenAI's strict-schema rules), parsers.py (a model's tool-call text into calls, whole
or streamed), grammar.py (llguidance grammars that force or allow calls) and render.py (tools
and tool messages into a prompt for templates that know no tools)."""
