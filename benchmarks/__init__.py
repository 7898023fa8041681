"""Benchmarks: scripts that measure prunesearch side by side with baselines and write RESULTS.md.

None of them runs in `make test`; each has a smoke test on a tiny setting.
"""
