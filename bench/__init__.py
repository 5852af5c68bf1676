"""Benchmarks of the CI system against the bare cost of its work; see bench/run_all.py."""
