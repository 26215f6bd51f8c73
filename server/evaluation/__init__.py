"""Zero-shot reasoning evaluation (the LLM-Adapters protocol) run as jobs through the engine."""
