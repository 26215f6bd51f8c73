"""The HTTP front end: routers, request guards and transport, schemas, the error mapping, and
what completions and chat share (serving.py). It reaches the engine only through an
EngineClient (server/engine/client.py)."""
