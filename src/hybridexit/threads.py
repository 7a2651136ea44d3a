"""CPU thread counts for machines whose cores other processes share: the default of ``serve`` and ``edge``, and the
count re-picked while training."""

from __future__ import annotations

import math
import os


def cores_available() -> int:
    """The CPU cores this process may run on: its affinity mask (taskset, cpusets), capped by a cgroup CPU quota
    (docker --cpus, kubernetes limits) when there is one."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(n, 1)


def runtime_threads(cores: int | None = None) -> int:
    """Torch threads of ``hybridexit serve`` and ``hybridexit edge`` when not given: half the cores available, at
    least 1. An edge and a server on one machine then take at most all its cores between them. torch's own default
    (every core, in each process) oversubscribes such a machine, and its OpenMP workers spin-wait for each other:
    on 2 cores with a CPU-bound job beside the pair, issue 35 measured 3.7 images/s against 66.9 with one thread
    each."""
    return max(1, (cores or cores_available()) // 2)


def runtime_threads_help(role: str) -> str:
    c = cores_available()
    return (f"torch CPU threads (default: {runtime_threads(c)}, half of the {c} cores available here, so that an edge "
            f"and a server on one machine, and other work beside them, do not oversubscribe it: torch's own default "
            f"of every core in each process slows both many times over; give the {role} more where it has the machine "
            f"to itself)")


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
        _set_threads(self.current)

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
                _set_threads(self.current)
            return
        self.times.append(seconds)
        if len(self.times) >= self.every:
            self.trial = next(o for o in self.options if o != self.current)
            _set_threads(self.trial)


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
