"""Load-test and benchmark clients for OpenAI-style servers: HTTP only, never imports server.

Workloads (see BENCHMARKS.md): A (Gamma arrivals, power-law adapter popularity), B (Punica
popularity mixes), C (A over adapters of six kinds). `adapterserve-loadtest --help`.
"""
