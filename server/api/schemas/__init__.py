"""Pydantic request/response models of the HTTP API, in OpenAI's shapes (plus vLLM's sampling
extras), one module per router in server/api/routers/: completions, chat, models, adapters,
evaluations, tokenize, health. What several routers share (the request base classes and their
rules, sampling fields, usage, the error shape, the server-limit placeholders) is in common.
Nothing is re-exported here: import from the module that defines a name.
"""
