"""Benchmarks for prefixserve (``python -m bench.run_all``; see bench/README.md).

Every claim is a ratio of variants timed side by side in one run (interleaved per repetition,
median over repetitions): absolute times on a shared CPU box are noise, ratios are not.
"""
