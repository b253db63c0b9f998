"""Benchmarks: each prints ratios against a peer measured in the same run, never asserts a speed.

Run one as a module from the repository root, e.g. `python -m bench.sampler_vs_diffusers`;
each module's docstring gives its commands.
"""
