"""Tests of keeper_task.agent.retry: backoff delays, the budget, the testing switch."""

from __future__ import annotations

import random

import pytest

from keeper_task.agent.retry import RetryPolicy, call_with_retry, is_testing, set_testing
from keeper_task.errors import SettingsError


class FakeTime:
    """A clock that only moves when told to: by sleep() or by the code under test."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Flaky(Exception):
    pass


class Fatal(Exception):
    pass


def always_failing(counter: list[int], cost: float = 0.0, time: FakeTime | None = None):
    def fn() -> None:
        counter.append(1)
        if time is not None:
            time.now += cost
        raise Flaky("still failing")

    return fn


def test_steps_double_from_initial_delay_and_stop_at_the_cap():
    """The un-jittered step starts at initial_delay, doubles, and never exceeds max_delay."""
    policy = RetryPolicy(initial_delay=0.25, multiplier=2, max_delay=5.0)
    assert [policy.step(n) for n in range(1, 9)] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert policy.step(10_000) == 5.0  # no overflow for very long loops


def test_full_jitter_stays_within_zero_and_the_step_and_varies():
    """Full jitter draws each delay from [0, step], and the draws actually differ."""
    policy = RetryPolicy(jitter="full")
    rng = random.Random(7)
    for attempt in range(1, 12):
        samples = [policy.delay(attempt, rng=rng) for _ in range(200)]
        assert all(0.0 <= s <= policy.step(attempt) for s in samples)
        assert len(set(samples)) > 100


def test_decorrelated_jitter_is_bounded_by_initial_three_times_previous_and_cap():
    """Decorrelated jitter stays in [initial_delay, min(max_delay, 3 * previous)]."""
    policy = RetryPolicy(jitter="decorrelated", initial_delay=0.25, max_delay=5.0)
    rng = random.Random(3)
    previous = None
    for attempt in range(1, 200):
        delay = policy.delay(attempt, previous, rng)
        upper = min(5.0, 3 * (previous or 0.25))
        assert 0.25 <= delay <= max(upper, 0.25)
        previous = delay
    assert max(policy.delays(random.Random(1)).__next__() for _ in range(50)) <= 0.75


def test_no_jitter_gives_exactly_the_steps():
    """jitter='none' yields the exponential schedule itself (deterministic)."""
    delays = RetryPolicy(jitter="none").delays()
    assert [next(delays) for _ in range(7)] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"budget": -1},
        {"initial_delay": 0},
        {"multiplier": 0.5},
        {"max_delay": 0.1, "initial_delay": 0.25},
        {"jitter": "sometimes"},
    ],
)
def test_invalid_policy_is_a_settings_error(kwargs):
    """A policy that cannot work is refused when it is built, with SettingsError."""
    with pytest.raises(SettingsError):
        RetryPolicy(**kwargs)


def test_budget_bounds_the_total_time_with_a_fake_clock():
    """Retries stop before elapsed time plus the next delay would pass the budget."""
    t = FakeTime()
    calls: list[int] = []
    policy = RetryPolicy(budget=10.0, jitter="none")
    with pytest.raises(Flaky):
        call_with_retry(
            always_failing(calls),
            policy=policy,
            retry_on=lambda e: True,
            clock=t.clock,
            sleep=t.sleep,
        )
    # 0.25 + 0.5 + 1 + 2 + 4 = 7.75 s slept; the next 5 s delay would end at 12.75 > 10.
    assert t.sleeps == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert len(calls) == 6
    assert t.now - 100.0 <= 10.0


def test_time_spent_in_the_call_counts_against_the_budget():
    """Slow attempts use up the budget too, so fewer retries happen."""
    t = FakeTime()
    calls: list[int] = []
    policy = RetryPolicy(budget=10.0, jitter="none")
    with pytest.raises(Flaky):
        call_with_retry(
            always_failing(calls, cost=2.0, time=t),
            policy=policy,
            retry_on=lambda e: True,
            clock=t.clock,
            sleep=t.sleep,
        )
    # attempt 2 s, sleep .25, attempt 2 s, sleep .5, attempt 2 s, sleep 1 (7.75), attempt 2 s
    # (9.75): 9.75 + 2 > 10, so it stops after 4 attempts.
    assert len(calls) == 4
    assert t.now - 100.0 <= 10.0


def test_jittered_delays_never_push_past_the_budget():
    """With random jitter the summed time still stays inside the budget."""
    for seed in range(50):
        t = FakeTime()
        with pytest.raises(Flaky):
            call_with_retry(
                always_failing([], cost=0.01, time=t),
                policy=RetryPolicy(budget=3.0),
                retry_on=lambda e: True,
                clock=t.clock,
                sleep=t.sleep,
                rng=random.Random(seed),
            )
        assert t.now - 100.0 <= 3.0 + 0.01  # the last attempt itself may end at the edge


def test_error_not_accepted_by_retry_on_propagates_at_once():
    """An error retry_on rejects is raised on the first attempt, without sleeping."""
    t = FakeTime()
    calls: list[int] = []

    def fn() -> None:
        calls.append(1)
        raise Fatal("no")

    with pytest.raises(Fatal):
        call_with_retry(
            fn,
            policy=RetryPolicy(),
            retry_on=lambda e: isinstance(e, Flaky),
            clock=t.clock,
            sleep=t.sleep,
        )
    assert calls == [1]
    assert t.sleeps == []


def test_success_after_failures_returns_the_value_and_reports_each_retry():
    """on_retry sees each failed attempt number, its delay and its error; the value returns."""
    t = FakeTime()
    seen: list[tuple[int, float, str]] = []
    results = iter([Flaky("a"), Flaky("b"), "done"])

    def fn() -> str:
        item = next(results)
        if isinstance(item, Exception):
            raise item
        return item

    value = call_with_retry(
        fn,
        policy=RetryPolicy(jitter="none"),
        retry_on=lambda e: True,
        on_retry=lambda n, d, e: seen.append((n, d, str(e))),
        clock=t.clock,
        sleep=t.sleep,
    )
    assert value == "done"
    assert seen == [(1, 0.25, "a"), (2, 0.5, "b")]
    assert t.sleeps == [0.25, 0.5]


def test_on_give_up_replaces_the_last_error_and_chains_it():
    """The error on_give_up returns is raised from the last error, with attempts and time."""
    t = FakeTime()
    got: list[tuple[int, float]] = []

    def give_up(n: int, elapsed: float, exc: Exception) -> Exception:
        got.append((n, elapsed))
        return Fatal(f"gave up after {n}")

    with pytest.raises(Fatal, match="gave up after 3") as info:
        call_with_retry(
            always_failing([]),
            policy=RetryPolicy(budget=1.0, jitter="none"),
            retry_on=lambda e: True,
            on_give_up=give_up,
            clock=t.clock,
            sleep=t.sleep,
        )
    assert isinstance(info.value.__cause__, Flaky)
    assert got == [(3, 0.75)]


def test_zero_budget_means_one_attempt():
    """budget=0 turns retrying off: exactly one attempt."""
    calls: list[int] = []
    with pytest.raises(Flaky):
        call_with_retry(
            always_failing(calls), policy=RetryPolicy(budget=0), retry_on=lambda e: True
        )
    assert calls == [1]


def test_testing_mode_never_sleeps_but_makes_the_production_number_of_attempts():
    """set_testing makes retries instant while the budget still limits attempts as in production."""
    slept: list[float] = []
    calls: list[int] = []
    retries: list[float] = []
    with set_testing(True):
        assert is_testing()
        with pytest.raises(Flaky):
            call_with_retry(
                always_failing(calls),
                policy=RetryPolicy(budget=30.0, jitter="none"),
                retry_on=lambda e: True,
                on_retry=lambda n, d, e: retries.append(d),
                sleep=slept.append,
            )
    assert not is_testing()
    assert slept == []
    # 0.25+0.5+1+2+4+5+5+5+5 = 27.75 s of virtual delay; one more 5 s would pass 30 s.
    assert retries == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    assert len(calls) == 10


def test_testing_mode_can_cap_attempts_and_restores_the_previous_mode():
    """set_testing(attempts=N) caps attempts; nested scopes restore what was there before."""
    calls: list[int] = []
    with set_testing(True, attempts=2):
        with set_testing(False):
            assert not is_testing()
        assert is_testing()
        with pytest.raises(Flaky):
            call_with_retry(always_failing(calls), policy=RetryPolicy(), retry_on=lambda e: True)
    assert calls == [1, 1]
    assert not is_testing()


def test_set_testing_applies_without_a_with_block():
    """Calling set_testing() switches the mode at once, like stamina.set_testing."""
    try:
        set_testing(True)
        assert is_testing()
    finally:
        set_testing(False)
    assert not is_testing()
