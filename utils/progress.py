"""The progress line of a training run: an ETA from the recent durations of each phase's steps.

Random steps (before `--random-steps`) take milliseconds, training steps (an action and `train_ratio` updates)
seconds: one average over both would promise a run at 3 s per update to end hours too early.
"""

import time
from collections import deque


class StepClock:
    """Mean duration of each phase's last `window` env steps ("random" or "training")."""

    def __init__(self, window: int = 100):
        self.durations = {"random": deque(maxlen=window), "training": deque(maxlen=window)}
        self.last = time.perf_counter()

    def tick(self, phase: str) -> None:
        """Record the time since the previous tick (or since the clock was made) as one step of `phase`."""
        now = time.perf_counter()
        self.durations[phase].append(now - self.last)
        self.last = now

    def seconds_per_step(self, phase: str) -> float | None:
        """Mean over the recent steps of `phase`; None before its first step."""
        durations = self.durations[phase]
        return sum(durations) / len(durations) if durations else None


def eta_seconds(
    random_left: int, training_left: int, random_step_s: float | None, training_step_s: float | None
) -> float | None:
    """Seconds until the run ends: each phase's steps left at its recent seconds per step.

    None while a phase that still has steps left has not been timed (during the random steps nothing
    tells how long an update takes).
    """
    total = 0.0
    for left, seconds in ((random_left, random_step_s), (training_left, training_step_s)):
        if left > 0:
            if seconds is None:
                return None
            total += left * seconds
    return total
