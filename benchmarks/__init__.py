"""Benchmarks and cost accounting (`mf-bench`)."""
