"""Benchmarks: ``python -m bench.<name>`` from the repository root (see bench/RESULTS.md).

A package so the benches and their tests import each other's public helpers by module
path, with no ``sys.path`` edits.
"""
