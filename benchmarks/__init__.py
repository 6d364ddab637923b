"""Benchmark scripts (each prints JSON)."""
