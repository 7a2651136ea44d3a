"""CPU thread count chosen while training, for machines whose cores other processes share."""

from __future__ import annotations

import torch


class ThreadTuner:
    """Re-picks the CPU thread count while training. On a shared machine, two OpenMP threads slow down several
    times when another process takes one of the cores, while one thread degrades gracefully; every ``every``
    steps the other setting is tried for ``probe`` steps and the faster one is kept. A probe that loses doubles
    the interval (up to ``max_every``), since probing two threads on a contended machine is itself expensive;
    a probe that wins resets it."""

    def __init__(self, max_threads: int, every: int = 60, probe: int = 6, max_every: int = 240):
        self.options = sorted({1, max_threads}, reverse=True)
        self.current, self.probe = self.options[0], probe
        self.base_every, self.every, self.max_every = every, every, max_every
        self.times: list[float] = []
        self.trial: int | None = None
        self.trial_times: list[float] = []
        torch.set_num_threads(self.current)

    @staticmethod
    def _median(xs):
        return sorted(xs)[len(xs) // 2]

    def record(self, seconds: float) -> None:
        """Account one step's duration; may switch the thread count for the next steps."""
        if len(self.options) == 1:
            return
        if self.trial is not None:
            self.trial_times.append(seconds)
            if len(self.trial_times) >= self.probe:
                if self._median(self.trial_times[1:]) < 0.85 * self._median(self.times[-self.probe:]):
                    self.current, self.every = self.trial, self.base_every
                else:
                    self.every = min(2 * self.every, self.max_every)
                self.trial, self.trial_times, self.times = None, [], []
                torch.set_num_threads(self.current)
            return
        self.times.append(seconds)
        if len(self.times) >= self.every:
            self.trial = next(o for o in self.options if o != self.current)
            torch.set_num_threads(self.trial)
