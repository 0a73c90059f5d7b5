"""Benchmarks and profiling of the library, outside the package: `python -m benchmarks.NAME` from the repo root."""
