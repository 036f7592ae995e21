"""Benchmarks (``mmfuse bench`` and ``python -m bench.synthetic``); results go to BENCHMARKS.md."""
