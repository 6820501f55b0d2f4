"""Background CPU load for the contention experiment: busy processes on the machine's cores.

`CPULoad` starts `workers` Python processes that spin until stopped: each busy for `duty` of every
`period_ms` and asleep for the rest (duty 1: always busy). Measured on 2 cores with a 1-thread model
(p50 of the adaptive answers under load over before it): two always-busy workers x2.3 (no config fits a
budget below L_full), one x1.0, two at duty 0.5 x1.1, two at duty 0.85 x1.1-1.3 with a tail (the
experiment's default: slower, and still servable).
They are stopped (terminated, then killed by pid) by `stop()`, on leaving the `with` block whatever
the exit, and at interpreter exit, so an interrupted run leaves no load behind.
"""

from __future__ import annotations

import atexit
import subprocess
import sys
import time

_SPIN = """import time
busy, idle = {busy}, {idle}
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < busy:
        pass
    if idle > 0:
        time.sleep(idle)
"""


class CPULoad:
    """Busy-loop processes on demand (module doc)."""

    def __init__(self, workers: int, duty: float = 1.0, period_ms: float = 20.0, settle_s: float = 0.5) -> None:
        if workers < 1:
            raise ValueError(f"parameter contention_workers must be >= 1, got {workers}")
        if not 0 < duty <= 1:
            raise ValueError(f"parameter contention_duty must lie in (0, 1], got {duty}")
        if not period_ms > 0:
            raise ValueError(f"parameter contention_period_ms must be > 0, got {period_ms}")
        self.workers, self.duty, self.period_ms, self.settle_s = workers, duty, period_ms, settle_s
        self.processes: list[subprocess.Popen] = []
        atexit.register(self.stop)

    @property
    def running(self) -> bool:
        return any(p.poll() is None for p in self.processes)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def start(self) -> None:
        if self.running:
            return
        busy = self.duty * self.period_ms / 1e3
        code = _SPIN.format(busy=busy, idle=self.period_ms / 1e3 - busy)
        self.processes = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                          for _ in range(self.workers)]
        # An interpreter's start-up is a burst of CPU that no steady load has: the first loaded request
        # paid it (35 ms against a 26 ms budget, calibration on and off alike). The load counts from here.
        time.sleep(self.settle_s)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []

    def __enter__(self) -> "CPULoad":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
