"""A new freeze policy is its own class and one registration (issue 20): the tracker and the
callback drive it by name, never asking which policy they hold."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from svcca_torch.freeze import (AdaptiveFreezePolicy, FreezePolicy, get_policy, policy_names, register_policy,
                                unregister_policy)
from svcca_torch.models import ConvNet
from svcca_torch.settings import TrackerSettings
from svcca_torch.tracker import DynamicsTracker


class MovingAverageFreezePolicy(AdaptiveFreezePolicy):
    """Freeze when an exponential moving average of the adaptive signal crosses the threshold
    (the example of issue 20: its own options come from ``settings.freeze_options``)."""

    kind = "moving_average"

    def __init__(self, groups: Sequence[str], threshold: float = 0.5, alpha: float = 0.5,
                 max_frozen_fraction: float = 0.75) -> None:
        super().__init__(groups, threshold=threshold, patience=1, max_frozen_fraction=max_frozen_fraction)
        self.alpha = alpha
        self.average: Dict[str, float] = {}

    @classmethod
    def from_settings(cls, groups: Sequence[str], settings: Any) -> "MovingAverageFreezePolicy":
        return cls(groups, threshold=settings.freeze_threshold, max_frozen_fraction=settings.max_frozen_fraction,
                   **settings.freeze_options)

    def update(self, step: int, similarities: Optional[Mapping[str, float]] = None,
               fraction: Optional[float] = None) -> List[str]:
        for g, s in (similarities or {}).items():
            self.average[g] = s if g not in self.average else self.alpha * s + (1 - self.alpha) * self.average[g]
        return super().update(step, {g: self.average[g] for g in similarities or {}})


class EveryNStepsPolicy(FreezePolicy):
    """Freeze one more group every ``every`` steps: a policy that records nothing."""

    kind = "every_n"

    def __init__(self, groups: Sequence[str], every: int = 5, max_frozen_fraction: float = 0.75) -> None:
        super().__init__(groups, max_frozen_fraction)
        self.every = every

    def on_step(self, step: int, fraction: Optional[float]) -> Optional[Dict[str, Any]]:
        if step % self.every == 0 and len(self.frozen) < self.max_frozen:
            self._freeze(step, [self.groups[len(self.frozen)]])
        return None

    def reason(self, groups: Sequence[str], step: int) -> str:
        return f"every {self.every} steps"


@pytest.fixture
def registered():
    register_policy("moving_average", MovingAverageFreezePolicy)
    register_policy("every_n", EveryNStepsPolicy)
    yield
    unregister_policy("moving_average")
    unregister_policy("every_n")


def _loop(tracker: DynamicsTracker, model: nn.Module, epochs: int = 3) -> int:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 4, (96,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker.start()
    step = 0
    for epoch in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            step += 1
            tracker.maybe_capture(step, epoch=epoch)
    tracker.finish(step)
    return step


def test_a_registered_policy_runs_by_name_with_its_own_options(tmp_path, registered):
    assert {"adaptive", "schedule", "moving_average"} <= set(policy_names())
    torch.manual_seed(0)
    model = ConvNet(in_channels=1, num_classes=4, width=4, depth=3, hidden=16)
    probe = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    tracker = DynamicsTracker(model, probe, run_dir=tmp_path, freeze="moving_average", freeze_window=6,
                              freeze_threshold=0.95, freeze_options={"alpha": 0.25}, max_overhead=None,
                              final_analysis=False)
    _loop(tracker, model)
    policy = tracker.policy
    assert isinstance(policy, MovingAverageFreezePolicy) and policy.alpha == 0.25
    # it was fed the signal the adaptive policy computes, and decided on its own average of it
    log = tracker.signal_log
    assert len(log) >= 2
    expected: Dict[str, float] = {}
    for entry in log:
        for g, s in entry.items():
            if g != "step":
                expected[g] = s if g not in expected else 0.25 * s + 0.75 * expected[g]
    assert policy.average == pytest.approx(expected)
    assert tracker.freeze_log and all("similarity to one window earlier" in e["reason"] for e in tracker.freeze_log)
    summary = json.loads((tmp_path / "svcca_summary.json").read_text())
    assert summary["freeze"]["policy"] == "moving_average" and summary["freeze"]["signal"]
    # resumable under its own kind
    restored = MovingAverageFreezePolicy(policy.groups)
    restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert restored.frozen == policy.frozen


def test_a_policy_that_records_nothing_uses_only_the_hooks(tmp_path, registered):
    torch.manual_seed(0)
    model = ConvNet(in_channels=1, num_classes=4, width=4, depth=3, hidden=16)
    probe = torch.randn(32, 1, 8, 8)
    tracker = DynamicsTracker(model, probe, run_dir=tmp_path, freeze="every_n", freeze_options={"every": 4},
                              max_overhead=None, final_analysis=False)
    _loop(tracker, model, epochs=1)
    assert [e["step"] for e in tracker.freeze_log] == [4]  # max_frozen of 3 groups at 0.75: one group
    assert tracker.freeze_log[0]["reason"] == "every 4 steps"
    assert tracker.signal_log == [] and tracker.signal_report() == ""


def test_policy_names_are_checked_once_with_the_registered_list():
    with pytest.raises(ValueError, match=r"registered policy name \('adaptive', 'schedule'"):
        TrackerSettings(freeze="ema")
    with pytest.raises(ValueError, match="unknown freeze policy 'ema'"):
        get_policy("ema")
    with pytest.raises(ValueError, match="registered already"):
        register_policy("adaptive", MovingAverageFreezePolicy)
    with pytest.raises(ValueError, match="FreezePolicy subclass"):
        register_policy("x", dict)
