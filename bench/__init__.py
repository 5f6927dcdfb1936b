"""The benchmark (`make bench`, `python -m bench [--quick]`): see BENCHMARKS.md and bench/run.py."""
