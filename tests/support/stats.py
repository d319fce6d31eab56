"""Figures of measured latencies, shared by the load tests (tests/support/wsload.py) and the
benchmarks (benchmarks/common.py). Runtime code has its own (chat/analytics.py): it takes a
fraction and answers None for no data, which a load report must never print silently."""


def percentile(values, q):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.4999)))
    return ordered[rank - 1]
