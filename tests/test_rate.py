"""A mover's bandwidth budget shared among its running copies (volcopy.rate.BandwidthBudget): how the
parts are set as copies start and end. That the engine follows a part as it changes:
test_resume_cancel_throttle.py; a mover's copies under its budget: test_movers_jobs.py."""

from __future__ import annotations

import pytest

from volcopy.errors import InvalidRequest
from volcopy.rate import BandwidthBudget, RateLimit


def parts(*limits: RateLimit) -> list[int]:
    return [limit.bytes_per_second for limit in limits]


def test_the_running_copies_share_the_budget_and_a_lower_own_limit_leaves_the_rest_to_the_others():
    budget = BandwidthBudget(100)
    alone = budget.join()
    assert parts(alone) == [100]  # a copy alone gets the whole budget
    second = budget.join()
    assert parts(alone, second) == [50, 50]
    capped = budget.join(10)  # its own limit is lower than a third: the others share the rest
    assert parts(alone, second, capped) == [45, 45, 10]
    budget.leave(second)
    assert parts(alone, capped) == [90, 10]
    generous = budget.join(1000)  # an own limit above the budget: an equal part
    assert parts(alone, capped, generous) == [45, 10, 45]
    budget.leave(alone)
    budget.leave(generous)
    assert parts(capped) == [10]
    budget.leave(capped)
    budget.leave(capped)  # twice: nothing happens


def test_more_copies_than_bytes_each_get_one_byte_a_second():
    budget = BandwidthBudget(2)
    limits = [budget.join() for _ in range(3)]
    assert sorted(parts(*limits)) == [1, 1, 1]


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "1M", 1 << 51])
def test_a_rate_limit_is_a_whole_positive_number(value):
    with pytest.raises(InvalidRequest, match="a rate limit is a whole number of bytes per second"):
        RateLimit(value)
