"""A fake clock for the tracker's time budget: tests set a run's timing, not the machine."""
from __future__ import annotations

import svcca_torch.capture
import svcca_torch.freeze.chance
import svcca_torch.freeze.signal
import svcca_torch.schedule
from svcca_torch.tracker import DynamicsTracker

#: every module of the tracker that reads ``time.perf_counter``
TIMED = (svcca_torch.schedule, svcca_torch.capture, svcca_torch.freeze.signal, svcca_torch.freeze.chance)


class Clock:
    """``time.perf_counter`` for the tracker that advances only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def fake_clock(monkeypatch, tracker: DynamicsTracker, recording_seconds: float) -> Clock:
    """Install a :class:`Clock` in the tracker's modules; every recording of ``tracker`` then
    costs ``recording_seconds`` of it (advance ``clock.now`` yourself for the training steps)."""
    clock = Clock()
    for module in TIMED:
        monkeypatch.setattr(module, "time", clock)
    tracker.setup()
    record = tracker.capturer.record

    def slow_record(*args, **kwargs):
        clock.now += recording_seconds
        return record(*args, **kwargs)

    monkeypatch.setattr(tracker.capturer, "record", slow_record)
    return clock
