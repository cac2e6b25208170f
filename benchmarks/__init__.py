"""Benchmark scripts that print figures; run them from the repository root with ``python -m benchmarks.<name>``."""
