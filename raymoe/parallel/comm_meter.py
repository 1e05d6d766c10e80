"""Opt-in accounting of communication: seconds spent in collectives and bytes this rank sent to other ranks.

Off by default (one attribute check per collective). `raymoe bench ep` turns it on to report the bytes exchanged
per step and the fraction of step time spent communicating.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class CommMeter:
    enabled: bool = False
    seconds: float = 0.0
    bytes_sent: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.seconds, self.bytes_sent, self.calls = 0.0, 0, 0

    @contextmanager
    def measure(self, bytes_sent: int):
        """Time the enclosed collective (synchronous on CPU/gloo; on GPU it times the enqueue unless synced)."""
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start
            self.bytes_sent += int(bytes_sent)
            self.calls += 1


METER = CommMeter()
