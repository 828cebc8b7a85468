from effdl.timing import Timing, describe_speedup, speedup


def _timing(median_s: float, spread: float) -> Timing:
    return Timing(median_s, median_s * (1 - spread), median_s * (1 + spread), [median_s])


def test_speedup_only_where_the_timings_can_be_told_apart():
    slow, fast = _timing(0.010, 0.1), _timing(0.002, 0.1)
    assert speedup(slow, fast) == 5.0
    assert describe_speedup(speedup(slow, fast), "A", "B") == "A 5.0x faster than B"
    assert describe_speedup(speedup(fast, slow), "A", "B") == "A 5.0x slower than B"
    assert speedup(_timing(0.010, 0.3), _timing(0.008, 0.3)) is None  # quartiles overlap
    assert speedup(_timing(1e-9, 0.0), _timing(1e-10, 0.0)) is None  # a few clock ticks
    assert describe_speedup(None, "A", "B") == "A and B too close to tell apart"
