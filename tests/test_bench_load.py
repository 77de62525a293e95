"""The bench's interleaved measurements (``bench/load.py``): every path must follow every
other equally often, or one proxy's work after its answer (LiteLLM's logging) always
lands on the same next path and skews its time to first token."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.load import balanced_orders


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_each_path_follows_each_other_equally_often(n: int) -> None:
    orders = balanced_orders(n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    pairs = Counter((a, b) for order in orders for a, b in zip(order, order[1:], strict=False))
    assert set(pairs) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert len(set(pairs.values())) <= 1  # the same count for every ordered pair
    assert len(Counter(order[0] for order in orders)) == n  # each path goes first too


def test_paired_difference_cancels_shared_drift() -> None:
    """Two paths whose streams drift together by far more than they differ: the paired
    estimate finds the 2 ms between them, with an interval that holds it."""
    import random

    from bench.measure import paired_difference

    rng = random.Random(1)
    drift = [30 + 10 * rng.random() for _ in range(300)]
    direct = [d + rng.gauss(0, 0.3) for d in drift]
    proxy = [d + 2 + rng.gauss(0, 0.3) for d in drift]
    median, lo, hi = paired_difference(proxy, direct)
    assert lo <= 2 <= hi and abs(median - 2) < 0.1 and hi - lo < 0.3
    assert all(v != v for v in paired_difference(proxy, direct[:-1]))  # NaN: not pairs
