"""Benchmarks of mae_timm, run as modules from the repository root: ``python -m benchmarks.flops --help``.

``common`` holds what they share (FLOP counters, the run header, result files); ``results/`` the committed figures.
"""
