"""Tests of keeper_task.agent.retry: backoff delays, the budget, the testing switch."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


class Fraction(random.Random):
    """A random source whose ``uniform(a, b)`` is always ``a + f * (b - a)``."""

    def __init__(self, f: float) -> None:
        super().__init__(0)
        self.f = f
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return a + self.f * (b - a)


@pytest.mark.parametrize("f", [0.0, 0.3, 1.0])
def test_full_jitter_draws_each_delay_from_zero_to_the_step(f):
    """The delay is uniform(0, step): exactly that interval is asked for, its draw returned."""
    policy = RetryPolicy(initial_delay=0.25, multiplier=2, max_delay=5.0)
    rng = Fraction(f)
    got = [policy.delay(n, rng) for n in range(1, 8)]
    steps = [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert rng.calls == [(0.0, step) for step in steps]
    assert got == pytest.approx([f * step for step in steps])


def test_full_jitter_spreads_delays_over_the_whole_interval():
    """Drawn with a real generator, delays cover [0, step]: near both ends, mean near the middle."""
    policy = RetryPolicy(initial_delay=1.0, max_delay=1.0)
    rng = random.Random(20261201)
    samples = [policy.delay(1, rng) for _ in range(4000)]
    assert all(0.0 <= s <= 1.0 for s in samples)
    assert min(samples) < 0.01 and max(samples) > 0.99
    assert 0.47 < sum(samples) / len(samples) < 0.53


@pytest.mark.parametrize(
    "kwargs",
    [
        {"budget": -1},
        {"budget": float("nan")},
        {"budget": float("inf")},
        {"refused_budget": -0.5},
        {"initial_delay": 0},
        {"multiplier": 0.5},
        {"max_delay": 0.1, "initial_delay": 0.25},
    ],
)
def test_invalid_policy_is_a_settings_error(kwargs):
    """A policy that cannot work is refused when it is built, with SettingsError (exit 78)."""
    with pytest.raises(SettingsError) as info:
        RetryPolicy(**kwargs)
    assert info.value.exit_code == 78


def test_the_last_wait_is_shortened_to_end_at_the_budget():
    """Retries go on while budget is left; the last delay is cut to land on the deadline."""
    t = FakeTime()
    calls: list[int] = []
    with pytest.raises(Flaky):
        call_with_retry(
            always_failing(calls),
            policy=RetryPolicy(budget=10.0),
            retry_on=lambda e: True,
            clock=t.clock,
            sleep=t.sleep,
            rng=Fraction(1.0),
        )
    # 0.25 + 0.5 + 1 + 2 + 4 = 7.75 s; the next 5 s step is cut to the 2.25 s left.
    assert t.sleeps == [0.25, 0.5, 1.0, 2.0, 4.0, 2.25]
    assert len(calls) == 7
    assert t.now - 100.0 == pytest.approx(10.0)


def test_the_attempt_started_last_may_overrun_the_budget_by_its_own_length():
    """Slow attempts use the budget too; the call ends at most one attempt past it."""
    t = FakeTime()
    calls: list[int] = []
    with pytest.raises(Flaky):
        call_with_retry(
            always_failing(calls, cost=2.0, time=t),
            policy=RetryPolicy(budget=10.0),
            retry_on=lambda e: True,
            clock=t.clock,
            sleep=t.sleep,
            rng=Fraction(1.0),
        )
    # 2, .25, 2, .5, 2, 1, 2 (9.75), then .25 left: wait it, attempt 5 ends at 12.
    assert t.sleeps == [0.25, 0.5, 1.0, 0.25]
    assert len(calls) == 5
    assert t.now - 100.0 == pytest.approx(12.0)


@settings(max_examples=200, deadline=None)
@given(
    budget=st.floats(min_value=0.0, max_value=60.0),
    cost=st.floats(min_value=0.0, max_value=7.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_the_call_ends_inside_budget_plus_one_attempt(budget, cost, seed):
    """Whatever the budget, attempt cost and jitter: no give-up before the budget is spent,
    and the end is at most one attempt later."""
    t = FakeTime()
    with pytest.raises(Flaky):
        call_with_retry(
            always_failing([], cost=cost, time=t),
            policy=RetryPolicy(budget=budget),
            retry_on=lambda e: True,
            clock=t.clock,
            sleep=t.sleep,
            rng=random.Random(seed),
        )
    elapsed = t.now - 100.0
    assert max(budget, cost) <= elapsed + 1e-6  # 1 µs: the loop's clock resolution
    assert elapsed <= budget + cost + 1e-9


def test_budget_for_gives_one_kind_of_error_a_shorter_budget():
    """budget_for shortens the budget for the errors it names; others keep the policy's."""
    for short, expected_end in ((True, 1.0), (False, 10.0)):
        t = FakeTime()
        with pytest.raises(Flaky):
            call_with_retry(
                always_failing([]),
                policy=RetryPolicy(budget=10.0),
                retry_on=lambda e: True,
                budget_for=lambda e, short=short: 1.0 if short else 99.0,
                clock=t.clock,
                sleep=t.sleep,
                rng=Fraction(1.0),
            )
        assert t.now - 100.0 == pytest.approx(expected_end)


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
        policy=RetryPolicy(),
        retry_on=lambda e: True,
        on_retry=lambda n, d, e: seen.append((n, d, str(e))),
        clock=t.clock,
        sleep=t.sleep,
        rng=Fraction(1.0),
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

    with pytest.raises(Fatal, match="gave up after 4") as info:
        call_with_retry(
            always_failing([]),
            policy=RetryPolicy(budget=1.0),
            retry_on=lambda e: True,
            on_give_up=give_up,
            clock=t.clock,
            sleep=t.sleep,
            rng=Fraction(1.0),
        )
    assert isinstance(info.value.__cause__, Flaky)
    # .25 + .5, then the 1 s step cut to the .25 s left: 4 attempts, given up at 1.0 s.
    assert got == [(4, 1.0)]


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
                policy=RetryPolicy(budget=30.0),
                retry_on=lambda e: True,
                on_retry=lambda n, d, e: retries.append(d),
                clock=FakeTime().clock,  # only the virtual clock moves
                sleep=slept.append,
                rng=Fraction(1.0),
            )
    assert not is_testing()
    assert slept == []
    # 0.25+0.5+1+2+4+5+5+5+5 = 27.75 s of virtual delay, then the 2.25 s left.
    assert retries == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0, 2.25]
    assert len(calls) == 11


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
