"""The logging of a training run: TensorBoard (and W&B) set-up, and the progress line with an ETA from the
recent durations of each phase's steps.

Random steps (before `--random-steps`) take milliseconds, training steps (an action and `train_ratio` updates)
seconds: one average over both would promise a run at 3 s per update to end hours too early.
"""

import time
from collections import deque

import numpy as np


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


class ProgressLine:
    """The run's progress: `charts/SPS` every 100 steps, and every 10 s (and at the first and last step) the line
    `step i/total updates u SPS s s/update x ETA e return(mean of 5) r`."""

    def __init__(self, first_step: int, total_timesteps: int, random_steps: int, train_ratio: float):
        self.first_step, self.total, self.random_steps, self.train_ratio = (
            first_step, total_timesteps, random_steps, train_ratio)  # fmt: skip
        self.clock = StepClock()  # recent seconds per random step and per training step, for the ETA
        self.start_time = self.last_print = time.time()

    def step(self, global_step: int, updates: int, recent_returns, writer) -> None:
        """Call once after each env step `global_step` (its updates included)."""
        self.clock.tick("random" if global_step < self.random_steps else "training")
        sps = (global_step + 1 - self.first_step) / (time.time() - self.start_time)
        if global_step % 100 == 0:
            writer.add_scalar("charts/SPS", sps, global_step)
        if time.time() - self.last_print > 10 or global_step in (self.first_step, self.total - 1):
            self.last_print = time.time()
            steps_left = self.total - global_step - 1
            random_left = min(steps_left, max(0, self.random_steps - global_step - 1))
            training_s = self.clock.seconds_per_step("training")  # an action and train_ratio updates
            eta = eta_seconds(random_left, steps_left - random_left, self.clock.seconds_per_step("random"), training_s)
            eta_text = "after the first updates" if eta is None else f"{eta / 3600:.1f} h"
            update_s = f"{training_s / self.train_ratio:.2f}" if training_s and self.train_ratio else "-"
            mean_return = f"{np.mean(recent_returns):.1f}" if recent_returns else "-"
            print(
                f"step {global_step + 1}/{self.total} updates {updates} SPS {sps:.1f} "
                f"s/update {update_s} ETA {eta_text} return(mean of 5) {mean_return}",
                flush=True,
            )


def start_logging(args, run_name: str, run_dir: str, purge_step: int | None):
    """A TensorBoard writer on `run_dir` holding the hyperparameter table, synced to W&B with `--track`; a resumed
    run (`purge_step`: where it stopped) drops the events its crashed predecessor wrote after its checkpoint."""
    from utils import UserError

    if args.track:
        try:
            import wandb
        except ImportError:
            raise UserError("--track needs Weights and Biases: pip install wandb") from None
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, monitor_gym=True, save_code=True,
                   resume="allow" if purge_step is not None else None)  # fmt: skip
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run_dir, purge_step=purge_step)
    table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return writer
