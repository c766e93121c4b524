"""Freeze-signal recordings reuse the frozen prefix's output on the probe (issue 10)."""
from __future__ import annotations

import torch
from torch import nn

from svcca_torch.data import load_digits_dataset, probe_set
from svcca_torch.frozen_prefix import FrozenPrefix, outermost
from svcca_torch.models import ConvBNReLU, ConvNet
from svcca_torch.tracker import DynamicsTracker

from _modules import Skip

# every group settles at once: the signal freezes bottom-up, one window after another
SIGNAL = dict(freeze="adaptive", freeze_window=5, freeze_threshold=1e-6, freeze_patience=2,
              max_overhead=None, final_analysis=False)


def _train(model: nn.Module, run_dir, steps: int = 30, change=None, **kwargs):
    train, _ = load_digits_dataset()
    x, y = train.tensors
    probe = probe_set(train, 300, seed=0)
    before = probe.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = DynamicsTracker(model, probe, run_dir=run_dir, **{**SIGNAL, **kwargs})
    tracker.start()
    g = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        if change is not None:
            change(step, model)
        idx = torch.randint(0, len(x), (64,), generator=g)
        model.train()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        tracker.maybe_capture(step)
    tracker.finish(steps)
    assert torch.equal(probe, before), "the probe must not be changed in place"
    return tracker


def _same_signal(a: DynamicsTracker, b: DynamicsTracker) -> None:
    assert [(e["step"], e["groups"]) for e in a.freeze_log] == [(e["step"], e["groups"]) for e in b.freeze_log]
    assert [sorted(e) for e in a.signal_log] == [sorted(e) for e in b.signal_log]
    for e, f in zip(a.signal_log, b.signal_log):
        for k in e:
            # float32 recordings (~1e-6 on a similarity), the kept output possibly from another batch size
            assert abs(e[k] - f[k]) <= 1e-5, (e["step"], k, e[k], f[k])


def test_signal_reuses_the_frozen_prefix_with_the_same_similarities(tmp_path, monkeypatch):
    """After a freeze, a signal recording runs only the modules above the frozen prefix
    (the frozen blocks' own computation is skipped, apart from a few images of a check),
    and every similarity and freeze is what a full recording gives."""
    real = {"n": 0}
    forward = ConvBNReLU.forward

    def counted(self, x):
        real["n"] += x.shape[0]  # images the block really computes
        return forward(self, x)

    monkeypatch.setattr(ConvBNReLU, "forward", counted)
    torch.manual_seed(0)
    reused = _train(ConvNet(width=8, depth=6, hidden=32), tmp_path / "reused", steps=40)
    runs_reused = real["n"]
    real["n"] = 0
    monkeypatch.setattr(FrozenPrefix, "PROBE_BYTES", 0)  # nothing may be kept: every recording runs in full
    torch.manual_seed(0)
    full = _train(ConvNet(width=8, depth=6, hidden=32), tmp_path / "full", steps=40)
    # three freezes: a recording serves the probe from the prefix kept before the last freeze
    # (running the newly frozen blocks), a later one from its own kept output; a recording on
    # more images than were kept (the look-ahead records deeper layers on more) runs in full
    assert len(reused.freeze_log) >= 3, "the run should freeze groups one window after another"
    _same_signal(reused, full)
    probe = reused.frozen_prefix.stats().probe
    assert probe.forwards_served >= 2 and probe.off is None
    assert full.frozen_prefix.stats().probe.served == 0
    assert runs_reused < real["n"]


def test_a_prefix_that_does_not_determine_what_follows_is_not_reused(tmp_path, monkeypatch):
    torch.manual_seed(0)
    checked = _train(Skip(), tmp_path / "checked")
    monkeypatch.setattr(FrozenPrefix, "PROBE_BYTES", 0)
    torch.manual_seed(0)
    full = _train(Skip(), tmp_path / "full")
    frozen = [g for e in checked.freeze_log for g in e["groups"]]
    assert "block2.conv" in frozen, "the run should freeze block1 and block2 while judging block3"
    stats = checked.frozen_prefix.stats()
    assert "skip connection" in stats.probe.off and stats.probe.served == 0  # the check saw the difference
    _same_signal(checked, full)


def test_outermost():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    mods = dict(model.named_modules())
    assert list(outermost({n: mods[n] for n in ("0", "2", "2.1")})) == ["0", "2"]


def test_a_kept_output_whose_prefix_changed_is_kept_again(tmp_path, monkeypatch):
    """A frozen weight rebound between recordings (``.data =``: no version counter sees it)
    must not leave the signal reading the old prefix's output."""
    def change(step: int, model: nn.Module) -> None:
        if step == 17:
            w = model.features.block1.conv.weight
            w.data = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))

    torch.manual_seed(0)
    # the recording after the change starts from the output kept before it (same frozen groups)
    reused = _train(ConvNet(width=8, depth=6, hidden=32), tmp_path / "reused", steps=40, change=change,
                    max_frozen_fraction=0.5)
    monkeypatch.setattr(FrozenPrefix, "PROBE_BYTES", 0)
    torch.manual_seed(0)
    full = _train(ConvNet(width=8, depth=6, hidden=32), tmp_path / "full", steps=40, change=change,
                  max_frozen_fraction=0.5)
    assert reused.freeze_log and reused.freeze_log[0]["step"] < 17, "block1 should be frozen before the change"
    _same_signal(reused, full)
    stats = reused.frozen_prefix.stats()
    # seen as a change and kept again, not found later by a check
    assert stats.probe.off is None and any(kind == "state" for kind, _ in stats.events)
