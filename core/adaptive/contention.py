"""Background CPU load for the contention experiment: busy processes on the machine's cores.

`CPULoad` starts `workers` Python processes that spin until stopped. They are stopped (terminated,
then killed by pid) by `stop()`, on leaving the `with` block whatever the exit, and at interpreter
exit, so an interrupted run leaves no load behind.
"""

from __future__ import annotations

import atexit
import subprocess
import sys

_SPIN = "while True:\n    pass\n"


class CPULoad:
    """Busy-loop processes on demand (module doc)."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"parameter contention_workers must be >= 1, got {workers}")
        self.workers = workers
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
        self.processes = [subprocess.Popen([sys.executable, "-c", _SPIN], stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                          for _ in range(self.workers)]

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
