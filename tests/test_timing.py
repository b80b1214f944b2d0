"""`ism_ext.perf`: the medians are of the timed calls, warm-up calls are not timed, compared calls take turns."""

from __future__ import annotations

import time

import pytest

from ism_ext.perf import interleaved_median_ms, median_ms


def test_calls_take_turns_after_warmup():
    order: list[str] = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    medians = interleaved_median_ms(calls, 3, warmup=2)
    assert order == ["a", "b"] * 5
    assert set(medians) == {"a", "b"}


def test_median_is_of_the_timed_calls_only():
    # Warm-up sleeps 50 ms, then the timed calls sleep 1, 20 and 1 ms: the median is about 1 ms, which
    # neither the warm-up nor a mean would give.
    sleeps = iter([0.05, 0.001, 0.02, 0.001])
    ms = median_ms(lambda: time.sleep(next(sleeps)), 3, warmup=1)
    assert 0.9 <= ms < 15


def test_each_call_gets_its_own_median():
    medians = interleaved_median_ms({"short": lambda: time.sleep(0.001), "long": lambda: time.sleep(0.02)}, 3,
                                    warmup=0)
    assert medians["short"] < 10 <= medians["long"]


@pytest.mark.parametrize("repeats", [0, -1])
def test_repeats_below_one_is_refused(repeats):
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        interleaved_median_ms({"a": lambda: None}, repeats)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        median_ms(lambda: None, repeats)
