"""The adaptive freeze signal (issue 21): its cost counts against ``max_overhead`` for any
model (what the budget skipped is reported), and each layer is judged against its chance
level (the same layer of an independently initialised copy), so that a layer whose
similarity is ~1 whatever its weights (a first conv layer) no longer freezes at the first
window."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from svcca_torch.data import load_digits_dataset, probe_set
from svcca_torch.freeze import CHANCE_LIMIT
from svcca_torch.freeze.signal import SIGNAL_SHARE
from svcca_torch.schedule import SHORT_RUN_SECONDS
from svcca_torch.tracker import DynamicsTracker

from _clock import fake_clock


class _LSTMClassifier(nn.Module):
    def __init__(self, vocab: int = 40, width: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, width, batch_first=True)
        self.fc1 = nn.Linear(width, width)
        self.fc = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.emb(x))
        return self.fc(torch.relu(self.fc1(out[:, -1])))


def _lstm_run(tmp_path, monkeypatch, max_overhead, *, steps: int = 200, step_seconds: float = 2.0,
              recording_seconds: float = 1.0, window: int = 4) -> DynamicsTracker:
    """A tiny LSTM classifier on random tokens whose every recording (a capture or a signal
    recording) costs ``recording_seconds`` of the tracker's clock and every training step
    ``step_seconds`` (200 x 2 s: a run of 400 s of training; a signal recording every 4
    steps, without a budget, is 1/8 of the training time)."""
    torch.manual_seed(0)
    model = _LSTMClassifier()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 40, (256, 12), generator=g)
    y = (x[:, 0] >= 20).long()
    probe = torch.randint(0, 40, (128, 12), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = DynamicsTracker(model, probe, ["emb", "lstm", "fc1", "fc"], run_dir=tmp_path, freeze="adaptive",
                              freeze_window=window, freeze_threshold=0.999, max_overhead=max_overhead,
                              total_steps=steps, final_analysis=True, figures=False)
    clock = fake_clock(monkeypatch, tracker, recording_seconds)
    tracker.start()
    for step in range(1, steps + 1):
        i = (step * 32) % 256
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
        opt.step()
        clock.now += step_seconds
        tracker.maybe_capture(step)
    tracker.finish(steps)
    return tracker


def test_the_signal_of_an_lstm_stays_within_its_share_of_the_budget(tmp_path, monkeypatch):
    """On LSTM and attention classifiers the tracker's own time was 431x and 210x the training
    time: the signal recorded every window whatever it cost. Its recordings now count against
    max_overhead: taken while they fit the signal's share, thinned, else skipped, and the
    summary says which windows and why."""
    free = _lstm_run(tmp_path / "free", monkeypatch, None)
    assert free.signal_stats["skipped"] == 0 and free.signal_stats["recordings"] == free.signal_stats["windows"] > 20
    free_summary = free.signal_summary()

    tracker = _lstm_run(tmp_path / "budget", monkeypatch, 0.05)
    stats = tracker.signal_summary()
    train = stats["training_seconds"]
    assert train == pytest.approx(400.0)
    # the signal's own accounting stays within its share of the budget
    assert stats["allowance"] == pytest.approx(SIGNAL_SHARE * 0.05 * max(train, SHORT_RUN_SECONDS))
    assert stats["seconds"] <= stats["allowance"] + 1e-9
    assert free_summary["seconds"] > 2 * stats["allowance"]  # what it spends without a budget
    # what the budget decided: early windows recorded, then windows skipped (with the reason), then
    # recorded again once the training time affords them
    assert stats["recordings"] > 0 and stats["skipped"] > 0
    assert stats["recordings"] + stats["skipped"] == stats["windows"]
    assert stats["skipped_steps"] == sorted(stats["skipped_steps"]) and stats["skipped_steps"][0] > 4
    assert "did not fit in the signal's share of the budget" in stats["reason"]
    assert f"{stats['skipped']} windows skipped" in stats["message"]
    summary = json.loads((tmp_path / "budget" / "svcca_summary.json").read_text())
    assert summary["freeze"]["signal_budget"]["skipped"] == stats["skipped"]
    assert summary["freeze"]["signal_budget"]["recordings"] == stats["recordings"]


def _digits(n_train: int = 320):
    train, _ = load_digits_dataset()
    x, y = train.tensors
    return x[:n_train], y[:n_train], probe_set(train, 200, seed=0)


def _first_conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(1296, 10))


def test_the_first_conv_layer_is_judged_against_its_chance_level(tmp_path):
    """A conv over image patches spans nearly the same subspace whatever its weights: its signal
    reads ~1 against an unrelated network too, so it always froze at the first window. Now its
    chance level says so: it is not judged on its own signal and freezes with the group above it,
    once that one (judged on (s - chance) / (1 - chance)) has settled."""
    x, y, probe = _digits()
    model = _first_conv_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = DynamicsTracker(model, probe, ["0", "2", "4", "7"], run_dir=tmp_path, freeze="adaptive",
                              freeze_window=5, freeze_threshold=0.95, max_overhead=None, final_analysis=False)
    tracker.start()
    for step in range(1, 21):
        i = (step * 32) % 320
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
        opt.step()
        tracker.maybe_capture(step)
    tracker.close()
    info = tracker.chance_info
    assert info["error"] is None and set(info["layers"]) == {"0", "2", "4"}  # the freezable groups
    # against an unrelated network the first conv reads above any threshold: it cannot be judged on it
    assert tracker.chance["0"] > CHANCE_LIMIT >= 0.95 and not info["layers"]["0"]["judged"]
    assert "cannot tell learning from no learning" in info["layers"]["0"]["reason"]
    assert info["layers"]["2"]["judged"] and tracker.chance["2"] < 0.95
    # the next group is judged on the part of its similarity that can change
    for raw, judged in zip(tracker.signal_raw_log, tracker.signal_log):
        assert "0" not in raw  # not recorded for the signal
        if "2" in raw:
            c = tracker.chance["2"]
            assert judged["2"] == pytest.approx(min(1.0, max(0.0, (raw["2"] - c) / (1 - c))))
            assert judged["0"] == judged["2"]  # and the first conv goes with it
    # so the first conv freezes when the group above it settles, together with it
    settled = next(e["step"] for e in tracker.signal_log if e["2"] >= 0.95)
    assert tracker.freeze_log[0]["step"] == settled and tracker.freeze_log[0]["groups"][:2] == ["0", "2"]
    summary_reason = tracker.chance_info["layers"]["0"]["reason"]
    assert f"{tracker.chance['0']:.5f}" in summary_reason


class _LowRankInput(nn.Module):
    """``body`` is a linear map of a 5-d input: it spans the input's space whatever its
    weights (chance level 1), so its signal cannot see it learn."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(5, 16)
        self.mid = nn.Linear(16, 16)
        self.top = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.top(torch.relu(self.mid(torch.relu(self.body(x)))))))


def test_a_layer_at_chance_one_is_not_judged_and_freezes_with_the_group_above(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, probe = torch.randn(64, 5, generator=g), torch.randn(200, 5, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    model = _LowRankInput()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rng = torch.get_rng_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tracker = DynamicsTracker(model, probe, ["body", "mid", "top", "head"], run_dir=tmp_path, freeze="adaptive",
                              freeze_window=3, freeze_threshold=0.5, max_overhead=None, final_analysis=False)
    tracker.start()
    # measuring the chance levels left the model bit-identical and the caller's random stream untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(torch.get_rng_state(), rng)
    info = tracker.chance_info["layers"]
    assert tracker.chance["body"] > CHANCE_LIMIT and not info["body"]["judged"]
    assert "not judged" in info["body"]["reason"] and info["mid"]["judged"]
    for step in range(1, 10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        tracker.maybe_capture(step, request=False)
    tracker.close()
    assert "body" not in tracker.signal_raw_log[0]  # never recorded for the signal
    # it goes with the next judged group: the same value, frozen together
    first = tracker.freeze_log[0]
    assert first["groups"][:2] == ["body", "mid"]
    sig = next(e for e in tracker.signal_log if e["step"] == first["step"])
    assert sig["body"] == sig["mid"]
