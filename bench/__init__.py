"""Benchmark suite for smoothce: ``python -m bench --help`` (timing) and ``python -m bench.report`` (tables, plot)."""
