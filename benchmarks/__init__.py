"""Benchmarks of issue 7: `python -m benchmarks [NAME ...]` prints tables and writes results/<name>.json."""
