"""The progress line's ETA (utils/progress.py): each phase's steps left at that phase's recent step duration."""

import itertools

import pytest

from utils import progress
from utils.progress import StepClock, eta_seconds


def test_eta_counts_each_phase_at_its_own_rate():
    assert eta_seconds(100, 50, 0.01, 3.0) == pytest.approx(100 * 0.01 + 50 * 3.0)
    assert eta_seconds(0, 50, None, 3.0) == pytest.approx(150.0)  # after the random steps: their rate is not needed
    assert eta_seconds(0, 0, None, None) == 0.0  # the last step
    assert eta_seconds(10, 0, 0.5, None) == pytest.approx(5.0)  # a run that never trains


def test_eta_is_unknown_until_a_training_step_has_been_timed():
    """During the random steps nothing tells how long an update takes: no number rather than a wrong one."""
    assert eta_seconds(900, 3000, 0.002, None) is None


def test_eta_of_a_run_at_3_s_per_update_after_its_random_steps(monkeypatch):
    """A paper-sized run on a CPU: 1,032 random steps at 2 ms, then 3 s per training step. At step 1,100 the run-average
    rate (the old ETA) promises about 0.15 h; the 2,900 training steps left at 3 s take 2.4 h."""
    now = itertools.accumulate([0.0] + [0.002] * 1032 + [3.0] * 68)
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(now))
    clock = StepClock()
    for step in range(1100):
        clock.tick("random" if step < 1032 else "training")
    steps_left = 4000 - 1100
    run_average_eta = steps_left / (1100 / clock.last)
    assert run_average_eta / 3600 == pytest.approx(0.15, abs=0.01)  # what the progress line used to print
    eta = eta_seconds(0, steps_left, clock.seconds_per_step("random"), clock.seconds_per_step("training"))
    assert eta / 3600 == pytest.approx(steps_left * 3.0 / 3600)


def test_step_clock_averages_the_recent_steps_of_each_phase(monkeypatch):
    now = iter([0.0, 1.0, 1.5, 11.5, 12.0, 32.0, 62.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(now))
    clock = StepClock(window=2)
    assert clock.seconds_per_step("random") is None and clock.seconds_per_step("training") is None
    clock.tick("random")  # 1 s
    clock.tick("random")  # 0.5 s
    clock.tick("training")  # 10 s
    clock.tick("random")  # 0.5 s: the first random step leaves the window of 2
    assert clock.seconds_per_step("random") == pytest.approx(0.5)
    assert clock.seconds_per_step("training") == pytest.approx(10.0)
    clock.tick("training")  # 20 s
    clock.tick("training")  # 30 s: the rate follows the recent steps
    assert clock.seconds_per_step("training") == pytest.approx(25.0)
