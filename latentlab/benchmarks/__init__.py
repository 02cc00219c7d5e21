"""Benchmarks (scripts, not timed tests): ``python -m latentlab.benchmarks.morph --help``.

Each prints ratios against a baseline measured in the same run, never only absolute times.
"""
