"""The training progress bar: loss, rank and images/s, validation shown while it runs, and an ETA that
counts the validations still to come (tqdm's own ETA spreads their time over the steps only after the
first one, and then unevenly)."""
import contextlib
import time

from tqdm import tqdm


def clock(seconds):
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class TrainingBar(tqdm):
    """`validations_after(step)`: how many validations the run still makes after `step`."""

    WINDOW = 20   # steps over which the step time is averaged

    def __init__(self, total, initial, validations_after, disable=False):
        self.validations_after = validations_after
        self.step_times, self.validation_times, self.counted = [], [], (None, 0)
        super().__init__(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True, disable=disable,
                         bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{left}, {rate_fmt}{postfix}]")

    def step_done(self, seconds):
        self.step_times = (self.step_times + [seconds])[-self.WINDOW:]
        self.update(1)

    @contextlib.contextmanager
    def validating(self):
        """Shows `validating` while the block runs and adds its time to the ETA of later validations."""
        self.set_description("validating", refresh=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.validation_times.append(time.perf_counter() - start)
            self.set_description("training", refresh=False)

    def seconds_left(self):
        """Steps left × mean step time + validations left × mean validation time; None before a step."""
        if not self.step_times:
            return None
        left = (self.total - self.n) * sum(self.step_times) / len(self.step_times)
        if self.validation_times:
            if self.counted[0] != self.n:   # a sum over the remaining steps: once per step, not per redraw
                self.counted = (self.n, self.validations_after(self.n))
            left += self.counted[1] * sum(self.validation_times) / len(self.validation_times)
        return left

    @property
    def format_dict(self):
        d = super().format_dict
        left = self.seconds_left()
        d["left"] = "?" if left is None else clock(left)
        return d
