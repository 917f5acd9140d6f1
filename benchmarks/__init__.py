"""Performance comparisons of Relformer with its baselines: `python -m benchmarks [--quick]`."""
