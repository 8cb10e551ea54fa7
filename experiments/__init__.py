"""The paper's experiments (SeqFace, Hu et al. 2018) on real data that ships in packages.

Run from the repository root, e.g. ``python -m experiments.mnist_2d``; see
``docs/experiments.md`` for the commands that produced the published figures and tables.
"""
