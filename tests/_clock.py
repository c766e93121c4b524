"""A fake clock for the tracker's time budget: tests set a run's timing, not the machine."""
from __future__ import annotations

import svcca_torch.tracker as tracker_module


class Clock:
    """``time.perf_counter`` for the tracker that advances only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def fake_clock(monkeypatch, tracker: tracker_module.DynamicsTracker, recording_seconds: float) -> Clock:
    """Install a :class:`Clock` in the tracker module; every recording of ``tracker`` then costs
    ``recording_seconds`` of it (advance ``clock.now`` yourself for the training steps)."""
    clock = Clock()
    monkeypatch.setattr(tracker_module, "time", clock)
    record = tracker._record

    def slow_record(*args, **kwargs):
        clock.now += recording_seconds
        return record(*args, **kwargs)

    monkeypatch.setattr(tracker, "_record", slow_record)
    return clock
