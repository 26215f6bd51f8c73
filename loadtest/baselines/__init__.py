"""Baselines for comparison runs: a plain transformers + PEFT server (`peft_server`).

The other baseline, our server with every request on the base model, is `--base-only`.
"""
