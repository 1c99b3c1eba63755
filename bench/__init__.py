"""Benchmarks (issue 6): ratios measured in one run, never timed tests. `python -m bench.run_all`."""
