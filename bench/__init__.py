"""effectd benchmark: ``python -m bench [--quick|--tiny] [--json FILE] [--only S1,S2]``.

Each scenario starts its own isolated daemon, measures effectd and the baseline it is compared
with in the same run, and stops everything it started. See ``bench/RESULTS.md``.
"""
