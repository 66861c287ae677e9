"""Benchmarks: commands that print figures and write JSON (never wall-clock assertions in tests)."""
