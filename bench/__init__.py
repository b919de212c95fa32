"""Benchmark scripts (`python bench/NAME.py`); a package so that tests import their pieces from the repository root."""
