"""Benchmarks (`latentforge bench ...`): ratios measured side by side in one run."""
