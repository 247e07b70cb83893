"""Benchmark of stream-counter against its baselines (``python -m bench.run``)."""
