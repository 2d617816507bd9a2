"""The benchmark harness behind ``volcopy bench`` and benchmarks/compare.py."""
