"""DynamicsTracker in a plain PyTorch loop (no Lightning): captures, the store, freeze
decisions that do not depend on the capture schedule, resume, and probe edge cases."""
from __future__ import annotations

import fcntl
import json
from pathlib import Path
import os
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from svcca_torch.data import load_digits_dataset, probe_set
from svcca_torch.dynamics import learning_dynamics, similarity_to_previous
from svcca_torch.freeze import is_frozen
from svcca_torch.models import ConvNet
from svcca_torch.store import RepresentationStore
from svcca_torch.tracker import DynamicsTracker

STEPS_PER_EPOCH = 10  # 640 digits, batches of 64


def _data(n_probe: int = 200):
    train, _ = load_digits_dataset()
    x, y = train.tensors
    loader = DataLoader(TensorDataset(x[:640], y[:640]), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    return loader, probe_set(train, n_probe, seed=0)


def _train(tracker_kwargs, run_dir, epochs: int = 3, lr: float = 0.05):
    """A plain training loop with the tracker, as in the README; returns (model, tracker)."""
    loader, probe = _data()
    torch.manual_seed(0)
    model = ConvNet(width=8, depth=4, hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    tracker = DynamicsTracker(model, probe, run_dir=run_dir, **tracker_kwargs)
    tracker.start()
    step = 0
    for epoch in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            tracker.maybe_capture(step, epoch=epoch)
    tracker.finish(step, epochs - 1)
    return model, tracker


def test_plain_loop_captures_stores_and_summarises(tmp_path):
    model, tracker = _train(dict(every_n_steps=STEPS_PER_EPOCH, max_overhead=None, final_analysis=True), tmp_path)
    steps = [0, 10, 20, 30]
    assert tracker.captured_steps == steps
    store = RepresentationStore(tmp_path / "store")
    assert [c.step for c in store.checkpoints] == steps
    assert store.layers == model.layer_names
    assert [e["step"] for e in tracker.to_previous] == steps[1:]
    summary = json.loads((tmp_path / "svcca_summary.json").read_text())
    assert summary["steps"] == steps and summary["probe_checksum"] == tracker.probe_checksum
    final = torch.tensor(summary["matrices"][-1]).diagonal()
    torch.testing.assert_close(final, torch.ones_like(final), rtol=0, atol=1e-5)  # float32 bases
    json.dumps(tracker.state_dict())  # JSON-serialisable


def test_maybe_capture_before_start_is_a_clear_error(tmp_path):
    _, probe = _data()
    tracker = DynamicsTracker(ConvNet(width=8, depth=4, hidden=32), probe, run_dir=tmp_path)
    with pytest.raises(RuntimeError, match="start"):
        tracker.maybe_capture(1)


def test_explicit_schedule_is_honoured_and_the_budget_says_what_it_skipped(tmp_path):
    # an explicit schedule is taken in full, whatever the budget, and the report says so
    _, every = _train(dict(every_n_steps=1, max_overhead=1e-9, final_analysis=False), tmp_path / "a", epochs=1)
    assert every.captured_steps == list(range(STEPS_PER_EPOCH + 1))
    assert every.schedule_report().startswith("11 captures (step 0, 10 every step), every one taken")
    # the default schedule with no budget: every front-loaded point (1% .. 90% of 10 steps)
    _, free = _train(dict(max_overhead=None, total_steps=STEPS_PER_EPOCH, final_analysis=False), tmp_path / "b",
                     epochs=1)
    assert free.captured_steps == [0, 1, 2, 3, 4, 5, 7, 10]
    # under a budget no capture fits in: the short-run floor (the points at 1..8% of training
    # fall on step 1), the other front-loaded points skipped and counted, with the reason
    _, tight = _train(dict(max_overhead=1e-9, total_steps=STEPS_PER_EPOCH), tmp_path / "c", epochs=1)
    assert tight.captured_steps == [0, 1, 10]
    schedule = json.loads((tmp_path / "c" / "svcca_summary.json").read_text())["schedule"]
    assert schedule["over_budget"] == [1] and schedule["front_loaded"] == [1] and schedule["budget"] == []
    assert [e["step"] for e in schedule["skipped"]] == [2, 3, 4, 5, 7]
    assert all("did not fit in max_overhead=1e-09" in e["reason"] for e in schedule["skipped"])
    assert "the budget skipped 5 front-loaded points (steps 2, 3, 4, 5, 7)" in schedule["message"]
    assert "taken over the budget" in schedule["message"] and "of training" in schedule["message"]


def test_freeze_decisions_do_not_depend_on_capture_frequency(tmp_path):
    """The adaptive signal runs on its own grid of steps (freeze_window), so capturing every
    step or only at start and end freezes the same groups at the same steps; training is
    otherwise untouched by the captures (eval mode, no grad, no RNG use)."""
    common = dict(freeze="adaptive", freeze_window=5, freeze_threshold=0.9, freeze_patience=1,
                  max_overhead=None, final_analysis=False)
    m1, every_step = _train(dict(common, every_n_steps=1), tmp_path / "a")
    m2, ends_only = _train(dict(common, max_overhead=None), tmp_path / "b")
    assert len(every_step.captured_steps) == 31 and ends_only.captured_steps == [0, 30]
    assert every_step.policy.events, "the reference run should freeze a group"
    assert every_step.policy.events == ends_only.policy.events
    assert every_step.signal_log == ends_only.signal_log
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    # bottom-up, contiguous, BatchNorm of frozen groups in eval, the output group never frozen
    names = [g.name for g in every_step.groups]
    frozen = every_step.policy.frozen
    assert frozen == names[: len(frozen)] and names[-1] not in frozen
    for g in every_step.groups:
        assert is_frozen(g) == (g.name in frozen)


def test_signal_records_only_the_groups_it_judges(tmp_path, monkeypatch):
    """A signal recording asks the one recorder for the judged layers only, each on its own
    grid (per-layer rows), and the forward stops after the highest of them."""
    loader, probe = _data()
    torch.manual_seed(0)
    model = ConvNet(width=8, depth=4, hidden=32)
    # patience 2: no group is one window from freezing at the start, so no look-ahead groups
    tracker = DynamicsTracker(model, probe, run_dir=tmp_path, freeze="adaptive", freeze_window=5,
                              freeze_patience=2, max_overhead=None, final_analysis=False)
    tracker.setup()
    calls = []
    record = tracker.recorder.record

    def spy(probe, **kwargs):
        out = record(probe, **kwargs)
        calls.append((kwargs, {n: t.shape[0] for n, t in out.items()}, tracker.recorder.last_stopped_early))
        return out

    monkeypatch.setattr(tracker.recorder, "record", spy)
    tracker.start()
    first_two = [n for g in tracker.policy.groups[:2] for n in tracker.group_layers[g]]
    judgeable = [n for g in tracker.policy.groups[:tracker.policy.max_frozen] for n in tracker.group_layers[g]]
    full = [c for c in calls if c[0].get("layers") is None]
    assert len(full) == 1 and full[0][0]["rows"] == "common"
    # at the start: the chance calibration, every judgeable layer on the model and on its independent copy
    calibration = [c for c in calls if c[0].get("layers") is not None and c[1][first_two[0]] > 2 * 4]
    assert [c[0]["layers"] for c in calibration] == [judgeable, judgeable]
    calls.clear()
    tracker.maybe_capture(5, request=False)  # the first window: the judged groups only
    signal = [c for c in calls if c[0].get("layers") is not None and c[1][first_two[0]] > 2 * 4]
    assert len(signal) == 1
    kwargs, rows, stopped = signal[0]
    assert kwargs["layers"] == first_two and kwargs["rows"] == "per_layer" and stopped
    # each layer has ratio x neurons datapoints at its own grid (whole images), sliced from the recording
    for n in first_two:
        neurons, cells = tracker.capturer.layer_shapes([n])[n]
        assert tracker.recorder.layer_grids[n][0] * tracker.recorder.layer_grids[n][1] == cells
        assert tracker.policy.signal.ref["bases"][n].n_datapoints == -(-10 * neurons // cells) * cells
    # the full capture is on the common grid of all layers (1x1 here: the last map is dense)
    assert len({t for t in full[0][1].values()}) == 1
    tracker.close()


def test_resume_refreezes_from_state(tmp_path):
    common = dict(freeze="adaptive", freeze_window=5, freeze_threshold=0.9, freeze_patience=1,
                  max_overhead=None, final_analysis=False)
    model, tracker = _train(common, tmp_path, epochs=2)
    assert tracker.policy.frozen
    state = json.loads(json.dumps(tracker.state_dict()))
    _, probe = _data()
    fresh = ConvNet(width=8, depth=4, hidden=32)
    fresh.load_state_dict(model.state_dict())
    resumed = DynamicsTracker(fresh, probe, run_dir=tmp_path, **common)
    resumed.load_state_dict(state)
    resumed.start(step=20)
    assert resumed.policy.frozen == tracker.policy.frozen
    frozen = {g.name for g in resumed.groups if is_frozen(g)}
    assert frozen == set(tracker.policy.frozen)
    assert resumed.captured_steps == tracker.captured_steps  # nothing re-captured at step 20


# ---------------------------------------------------------------------------- probe edge cases
def test_single_use_generator_probe_is_refused_at_construction():
    _, probe = _data()
    model = ConvNet(width=8, depth=4, hidden=32)
    with pytest.raises(ValueError, match="single-use"):
        DynamicsTracker(model, (b for b in probe.split(50)))
    with pytest.raises(ValueError, match="single-use"):
        DynamicsTracker(model, iter(DataLoader(TensorDataset(probe), batch_size=50)))
    # re-iterables are fine: a list of batches, a DataLoader
    DynamicsTracker(model, list(probe.split(50)))
    DynamicsTracker(model, DataLoader(TensorDataset(probe), batch_size=50))


def test_one_sample_probe_fails_at_setup_with_a_probe_message(tmp_path):
    _, probe = _data()
    model = ConvNet(width=8, depth=4, hidden=32)
    tracker = DynamicsTracker(model, DataLoader(TensorDataset(probe[:1]), batch_size=1), run_dir=tmp_path)
    with pytest.raises(ValueError, match=r"`probe` holds 1 input"):
        tracker.setup()


class _DriftingProbe:
    """Re-iterable probe whose second batch changes from one pass to the next."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        yield self.x[:100]
        yield self.x[100:] + float(self.passes)


def test_probe_checksum_covers_every_batch(tmp_path):
    _, probe = _data()
    model = ConvNet(width=8, depth=4, hidden=32)
    tracker = DynamicsTracker(model, _DriftingProbe(probe), run_dir=tmp_path, max_overhead=None, final_analysis=False)
    tracker.start()
    with pytest.raises(ValueError, match="batch 1 differs"):
        tracker.capture(1)


# ---------------------------------------------------------------------------- forward order, store, bad layers
from _clock import fake_clock  # noqa: E402
from _modules import Scrambled as _Scrambled  # noqa: E402  (issue 8, section 1)


def test_freeze_groups_follow_the_forward_pass_not_registration(tmp_path):
    torch.manual_seed(0)
    model = _Scrambled()
    probe = torch.randn(200, 5)
    tracker = DynamicsTracker(model, probe, run_dir=tmp_path, freeze="schedule", total_steps=8,
                              max_overhead=None, final_analysis=False)
    tracker.start()
    assert tracker.recorder.layers == ["body", "hidden", "head"]
    assert [g.name for g in tracker.groups] == ["body", "hidden", "head"]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, 9):
        opt.zero_grad()
        model(torch.randn(16, 5)).square().mean().backward()
        opt.step()
        tracker.maybe_capture(step, request=False)
    events = tracker.policy.events
    assert events and events[0]["group"] == "body"  # bottom-up: the true bottom first
    assert tracker.policy.frozen == ["body", "hidden"]
    assert "head" not in tracker.policy.frozen and not is_frozen(tracker.groups[-1])
    assert is_frozen(tracker.groups[0])
    tracker.close()


class _WithDeadLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 8)
        self.dead = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            self.dead.weight.zero_()  # constant output (its bias) on every input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        return self.head(self.dead(h) + h)


def test_a_constant_probe_is_a_clear_error_at_the_first_capture(tmp_path):
    """Every layer constant at the first capture: the probe is to blame (nothing to store)."""
    tracker = DynamicsTracker(_WithDeadLayer(), torch.ones(100, 5), run_dir=tmp_path, max_overhead=None,
                              final_analysis=False)
    with pytest.raises(ValueError, match=r"layer 'body' is constant over the probe at step 0.*varied real inputs"):
        tracker.start()
    tracker.close()
    assert not (tmp_path / "store" / "index.json").exists()  # nothing stored


def test_a_layer_constant_at_initialisation_is_judged_from_when_it_varies(tmp_path):
    """Issue 21: a zero-initialised layer (ViT's heads.head, GoogLeNet's fc) raised "constant over
    the probe" at start(). Now: one warning naming it, left out until it varies, then stored and
    compared; its freeze signal starts when it varies; the summary says when."""
    torch.manual_seed(0)
    model = _WithDeadLayer()
    x = torch.randn(64, 5)
    y = torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = DynamicsTracker(model, torch.randn(100, 5), ["body", "dead", "head"], run_dir=tmp_path,
                              every_n_steps=2, max_overhead=None, freeze="adaptive", freeze_window=2,
                              freeze_threshold=0.99, max_frozen_fraction=0.67)
    with pytest.warns(UserWarning, match=r"layer 'dead' is constant over the probe at step 0") as caught:
        tracker.start()
    assert len([w for w in caught if "'dead' is constant" in str(w.message)]) == 1
    assert [c.layers for c in tracker.store.checkpoints] == [("body", "head")]
    assert "dead" not in tracker.policy.signal.ref["bases"]  # nor in the signal's first recording
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        for step in range(1, 7):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            tracker.maybe_capture(step)
        tracker.finish(6)
    assert not [w for w in later if "constant" in str(w.message)]  # one warning in all
    assert tracker.constant_layers == {"dead": {"constant_at": 0, "first_varied": 2, "signal_from": 2}}
    store = RepresentationStore(tmp_path / "store", read_only=True)
    assert [set(c.layers) for c in store.checkpoints] == [{"body", "head"}] + [{"body", "dead", "head"}] * 3
    assert "dead" not in tracker.to_previous[0] and "dead" in tracker.to_previous[1]  # compared from step 4
    # its group is judged from the signal window after it first varied (step 2), not before
    judged = [e["step"] for e in tracker.signal_log if "dead" in e]
    assert judged and judged[0] == 4 and "dead" not in tracker.signal_log[0]
    summary = json.loads((tmp_path / "svcca_summary.json").read_text())
    assert summary["constant_at_start"]["dead"]["first_varied"] == 2
    assert summary["layers"] == ["body", "dead", "head"]  # depth order, though stored after the others
    i = summary["layers"].index("dead")
    assert summary["to_final"][0][i] is None and summary["to_final"][-1][i] == pytest.approx(1.0, abs=1e-5)


def test_close_releases_the_store_and_a_second_start_resumes(tmp_path):
    """close() lets another writer in; a second start() in the same process (a resume) reopens it."""
    _, probe = _data()
    model = ConvNet(width=8, depth=4, hidden=32)
    tracker = DynamicsTracker(model, probe, run_dir=tmp_path, max_overhead=None, final_analysis=False)
    tracker.start()
    tracker.capture(5)
    state = tracker.state_dict()
    tracker.close()
    tracker.close()  # idempotent
    fd = os.open(tmp_path / "store" / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: nothing holds it any more
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    resumed = DynamicsTracker(model, probe, run_dir=tmp_path, max_overhead=None, final_analysis=False)
    resumed.load_state_dict(state)
    resumed.start(step=5)
    assert resumed.captured_steps == [0, 5]
    assert resumed.last_capture is not None and set(resumed.last_capture) == set(model.layer_names)
    resumed.capture(6)
    assert [c.step for c in RepresentationStore(tmp_path / "store", read_only=True).checkpoints] == [0, 5, 6]
    resumed.start(step=6)  # the same tracker started again: the store is reopened, nothing re-captured
    assert resumed.captured_steps == [0, 5, 6]
    resumed.close()


def test_kept_directions_stay_within_the_datapoints_reach(tmp_path):
    """A layer wider than its datapoints / 5 kept up to every direction (CCA then reports
    spuriously high similarity); now it keeps at most rows // 5, with one warning."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))
    probe = torch.randn(100, 20, generator=g)  # 100 datapoints: at most 20 directions
    tracker = DynamicsTracker(model, probe, layers=["0", "2"], run_dir=tmp_path, max_overhead=None,
                              final_analysis=False)
    with pytest.warns(UserWarning, match=r"'0' \(at most 20 directions from 100 datapoints\)"):
        tracker.start()
    store = tracker.store
    assert store.load(store.final, "0").k == 20  # 64 neurons, full rank: capped at 100 // 5
    assert store.load(store.final, "2").k == 3  # narrow layer unaffected
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every capture
        tracker.capture(1)
    tracker.close()


def test_final_analysis_full_matrices_only_for_the_captures_shown(tmp_path):
    """Every capture gets its to-final diagonal; only the chosen ones (the grid and the
    heatmaps) a full layers x layers matrix, equal to the naive analysis's there."""
    _, tracker = _train(dict(every_n_steps=1, max_overhead=None, analysis_device="cpu"), tmp_path, epochs=2)
    assert tracker.analysis_device == torch.device("cpu")
    summary = json.loads((tmp_path / "svcca_summary.json").read_text())
    steps = summary["steps"]
    assert len(steps) == 21 and steps[0] == 0 and steps[-1] == 20
    full = summary["full_steps"]
    assert 0 in full and 20 in full and len(full) <= 12
    m = torch.tensor([[[math.nan if v is None else v for v in row] for row in c] for c in summary["matrices"]],
                     dtype=torch.float64)
    store = RepresentationStore(tmp_path / "store", read_only=True)
    naive = learning_dynamics(store).matrices
    # float32 bases and eigensolves, products summed in another order: ~sqrt(n) eps, 8x margin
    tol = 8 * math.sqrt(store.n_datapoints) * torch.finfo(torch.float32).eps
    off = ~torch.eye(m.shape[1], dtype=torch.bool)
    for c, step in enumerate(steps):
        torch.testing.assert_close(m[c].diagonal(), naive[c].diagonal(), rtol=0, atol=tol)
        if step in full:
            torch.testing.assert_close(m[c], naive[c], rtol=0, atol=tol)
        else:
            assert m[c][off].isnan().all()
    assert (tmp_path / "learning_dynamics.png").stat().st_size > 0
    # to-previous: the values computed at each capture (on the bases before encoding), not a
    # third pass over the store; within the int12 encoding's 1e-3 of a recomputation
    prev = torch.tensor([[math.nan if v is None else v for v in row] for row in summary["to_previous"]],
                        dtype=torch.float64)
    online = torch.tensor([[e[n] for n in tracker.store.layers] for e in tracker.to_previous], dtype=torch.float64)
    torch.testing.assert_close(prev[1:], online, rtol=0, atol=0)
    again = similarity_to_previous(store).values
    assert bool(prev[0].isnan().all()) and float((prev[1:] - again[1:]).abs().max()) < 1e-3


def test_final_analysis_recomputes_to_previous_it_did_not_see(tmp_path):
    """A capture without an online to-previous value (e.g. state lost): the analysis
    computes the curves from the store in its one pass."""
    model, tracker = _train(dict(every_n_steps=5, max_overhead=None, final_analysis=False), tmp_path, epochs=2)
    state = tracker.state_dict()
    state["to_previous"] = state["to_previous"][1:]  # the value at step 5 is unknown
    last = tracker.captured_steps[-1]
    resumed = DynamicsTracker(model, _data()[1], run_dir=tmp_path, every_n_steps=5, max_overhead=None)
    resumed.load_state_dict(state)
    resumed.start(last)
    analysis = resumed.finish(last)
    again = similarity_to_previous(RepresentationStore(tmp_path / "store", read_only=True))
    torch.testing.assert_close(analysis.to_previous.values, again.values, rtol=0, atol=0, equal_nan=True)


def test_analysis_device_is_validated(tmp_path):
    _, probe = _data()
    with pytest.raises(ValueError, match="analysis_device"):
        DynamicsTracker(ConvNet(width=8, depth=4, hidden=32), probe, run_dir=tmp_path, analysis_device="gpu0")


@pytest.mark.parametrize("kwargs, name", [(dict(final_heatmaps=1), "`final_heatmaps`"),
                                          (dict(final_heatmaps=2.5), "`final_heatmaps`"),
                                          (dict(figures="no"), "`figures`"),
                                          (dict(final_analysis=1), "`final_analysis`")])
def test_end_of_run_options_are_validated(tmp_path, kwargs, name):
    _, probe = _data()
    with pytest.raises(ValueError, match=name):
        DynamicsTracker(ConvNet(width=8, depth=4, hidden=32), probe, run_dir=tmp_path, **kwargs)


def test_signal_looks_ahead_so_the_next_groups_are_judged_right_after_a_freeze(tmp_path):
    """Once the lowest group may freeze at the next window, the two groups above are
    recorded too: after the freeze they are compared at the very next window (no window
    spent on a first recording), so they can freeze one window after the groups below."""
    common = dict(freeze="adaptive", freeze_window=5, freeze_threshold=1e-6, freeze_patience=2,
                  max_overhead=None, final_analysis=False)
    _, tracker = _train(common, tmp_path, epochs=3)
    groups = tracker.policy.groups
    assert [(e["step"], e["groups"]) for e in tracker.freeze_log] == [(10, groups[:2]), (20, groups[2:4])]
    judged = {e["step"]: sorted(k for k in e if k != "step") for e in tracker.signal_log}
    assert judged[5] == sorted(groups[:2])  # streak 0 at the decision: the lowest two only
    assert judged[15] == sorted(groups[2:4])  # recorded at step 10 as the look-ahead


# ---------------------------------------------------------------------------- data errors during a run
class _Skip(nn.Module):
    """body -> mid -> head with a skip around mid: zeroing mid's weight makes mid alone constant."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(5, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        return self.head(self.mid(h) + h)


def _skip_tracker(tmp_path, probe=None, **kwargs):
    kwargs = dict(dict(run_dir=tmp_path, max_overhead=None, final_analysis=True), **kwargs)
    probe = torch.randn(100, 5, generator=torch.Generator().manual_seed(0)) if probe is None else probe
    return DynamicsTracker(_Skip(), probe, layers=["body", "mid", "head"], **kwargs)


def _poison(module: nn.Module, value: float = math.nan) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def test_non_finite_activations_name_the_layer_the_step_and_the_fix(tmp_path):
    tracker = _skip_tracker(tmp_path)
    tracker.start()
    _poison(tracker.model.mid)  # mid and head (which reads it) are NaN, body is fine
    with pytest.raises(ValueError, match=r"layer 'mid' .*NaN.* at step 40 \(capture\)") as info:
        tracker.capture(40)
    msg = str(info.value)
    assert "diverged" in msg and "learning rate" in msg and "leave 'mid' out of `layers`" in msg
    assert "`x`" not in msg and "remove those datapoints" not in msg  # the kernel's advice is not the fix here
    assert (info.value.step, info.value.layer, info.value.kind) == (40, "mid", "capture")
    tracker.close()


def test_non_finite_probe_is_blamed_on_the_probe_at_start(tmp_path):
    probe = torch.randn(100, 5, generator=torch.Generator().manual_seed(0))
    probe[3, 1] = math.inf
    tracker = _skip_tracker(tmp_path, probe=probe)
    with pytest.raises(ValueError, match=r"at step 0 \(start\).*the probe holds 1 input with NaN or Inf values "
                                         r"\(the first: input 3\)") as info:
        tracker.start()
    assert "diverged" not in str(info.value)
    tracker.close()


def test_non_finite_freeze_signal_names_the_signal(tmp_path):
    tracker = _skip_tracker(tmp_path, freeze="adaptive", freeze_window=5, freeze_patience=2)
    tracker.start()
    # body (a linear map of the 5-d probe) spans the probe's space whatever its weights: chance level 1,
    # not judged, so not recorded; mid is the group the signal records
    assert tracker.chance["body"] > 0.999 and tracker.policy.groups[0] == "body"
    _poison(tracker.model.body)
    with pytest.raises(ValueError, match=r"layer 'mid' .* at step 5 \(freeze signal\).*learning rate"):
        tracker.maybe_capture(5, request=False)
    tracker.close()


def test_constant_layer_later_in_training_is_not_blamed_on_the_probe(tmp_path):
    tracker = _skip_tracker(tmp_path)
    tracker.start()
    with torch.no_grad():
        tracker.model.mid.weight.zero_()
    with pytest.raises(ValueError, match=r"layer 'mid' is constant over the probe at step 7 \(capture\)") as info:
        tracker.capture(7)
    msg = str(info.value)
    assert "died during training" in msg and "out of `layers`" in msg and "probe of varied" not in msg
    tracker.close()


def _summary(run_dir):
    return json.loads((run_dir / "svcca_summary.json").read_text())


def _lock_is_free(run_dir) -> bool:
    fd = os.open(run_dir / "store" / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_layer_constant_at_the_final_capture_is_recorded_and_the_run_still_summarised(tmp_path):
    tracker = _skip_tracker(tmp_path)
    tracker.start()
    tracker.capture(10)
    with torch.no_grad():
        tracker.model.mid.weight.zero_()
    with pytest.warns(UserWarning, match=r"(?s)1 failure at the end.*svcca_summary.json.*\n  - layer 'mid' is constant over "
                                          r"the probe at step 20 \(final capture\)"):
        analysis = tracker.finish(20)
    assert analysis is not None
    summary = _summary(tmp_path)
    assert summary["steps"] == [0, 10, 20] and tracker.captured_steps == [0, 10, 20]
    [failure] = summary["failures"]
    assert (failure["step"], failure["layer"], failure["kind"]) == (20, "mid", "final capture")
    assert "constant over the probe" in failure["message"]
    store = RepresentationStore(tmp_path / "store", read_only=True)
    assert sorted(store.final.layers) == ["body", "head"]  # the final capture without the failed layer
    for name in ("learning_dynamics.png", "convergence.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert _lock_is_free(tmp_path)


def test_a_model_diverged_at_the_final_capture_keeps_the_earlier_captures(tmp_path):
    tracker = _skip_tracker(tmp_path)
    tracker.start()
    tracker.capture(10)
    _poison(tracker.model)
    with pytest.warns(UserWarning, match=r"(?s)3 failures.*\n  - layer 'body' has .* at step 30 \(final capture\)") as record:
        tracker.finish(30)
    assert len([w for w in record if "failure" in str(w.message)]) == 1  # one warning, every failure in it
    summary = _summary(tmp_path)
    assert summary["steps"] == [0, 10] and tracker.captured_steps == [0, 10]  # nothing stored at step 30
    assert [(f["step"], f["layer"]) for f in summary["failures"]] == [(30, "body"), (30, "mid"), (30, "head")]
    assert (tmp_path / "learning_dynamics.png").stat().st_size > 0


def test_an_unexpected_error_at_the_final_capture_raises_after_the_summary_is_written(tmp_path, monkeypatch):
    tracker = _skip_tracker(tmp_path)
    tracker.start()
    tracker.capture(10)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(tracker.capturer, "record", broken)
    with pytest.raises(RuntimeError, match="boom"):
        tracker.finish(20)
    summary = _summary(tmp_path)
    assert summary["steps"] == [0, 10] and summary["failures"] == []
    assert (tmp_path / "convergence.png").stat().st_size > 0
    assert _lock_is_free(tmp_path)


@pytest.mark.parametrize("where", ["dynamics", "figure"])
def test_a_failing_final_analysis_still_writes_the_summary(tmp_path, monkeypatch, where):
    import svcca_torch.plotting
    import svcca_torch.analysis
    from svcca_torch import ZeroVarianceError

    tracker = _skip_tracker(tmp_path)
    tracker.start()
    tracker.capture(10)
    if where == "dynamics":  # a data error: recorded, reported, the rest written
        def bad(*args, **kwargs):
            raise ZeroVarianceError("`layers['mid']` has zero variance")

        monkeypatch.setattr(svcca_torch.analysis, "shown_dynamics", bad)
        with pytest.warns(UserWarning, match=r"(?s)1 failure.*\n  - final analysis: `layers\['mid'\]` has zero variance"):
            tracker.finish(20)
        summary = _summary(tmp_path)
        assert summary["captured_steps"] == [0, 10, 20] and "matrices" not in summary
        assert [f["kind"] for f in summary["failures"]] == ["final analysis"]
    else:  # a programming error: raised, after the summary and what was computed are written
        def bad(*args, **kwargs):
            raise RuntimeError("figure broke")

        monkeypatch.setattr(svcca_torch.plotting, "plot_convergence", bad)
        with pytest.raises(RuntimeError, match="figure broke"):
            tracker.finish(20)
        summary = _summary(tmp_path)
        assert summary["steps"] == [0, 10, 20] and len(summary["matrices"]) == 3
        assert (tmp_path / "learning_dynamics.png").stat().st_size > 0
    assert _lock_is_free(tmp_path)


def test_non_finite_conv_layer_is_named_not_called_x(tmp_path):
    """Conv maps are folded by the recorder without a check of their own, so a NaN in one
    reaches the reduction, which names the layer and the step (it used to say "`x` contains")."""
    _, probe = _data()
    model = ConvNet(width=8, depth=4, hidden=32)
    tracker = DynamicsTracker(model, probe, run_dir=tmp_path, max_overhead=None, final_analysis=False)
    tracker.start()
    _poison(model)
    first = model.layer_names[0]
    with pytest.raises(ValueError, match=rf"layer '{first}' has .* at step 40 \(capture\): the model diverged"):
        tracker.capture(40)
    tracker.close()


# ----------------------------------------------------------------------------------- issue 22: the schedule
def _settling_run(run_dir, tracker_kwargs, monkeypatch, *, steps: int = 384, step_seconds: float = 1.0,
                  capture_seconds: float = 1.0, settle: int = 12):
    """A plain conv net on digits trained at a high learning rate for ``settle`` steps, then
    at 0: its layers settle within the first ``settle`` steps and never change again. The
    tracker's clock is fake: each training step takes ``step_seconds``, each recording
    ``capture_seconds`` (``steps`` x 1 s: a 6.4-minute run)."""
    train, _ = load_digits_dataset()
    x, y = train.tensors
    probe = probe_set(train, 200, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    tracker = DynamicsTracker(model, probe, ["0", "2", "5"], run_dir=run_dir, total_steps=steps, **tracker_kwargs)
    clock = fake_clock(monkeypatch, tracker, capture_seconds)
    tracker.start()
    g = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        if step <= settle:
            idx = torch.randint(0, x.shape[0], (32,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        clock.now += step_seconds
        tracker.maybe_capture(step)
    tracker.finish(steps)
    return tracker


def test_default_schedule_captures_where_a_fast_settling_run_changes(tmp_path, monkeypatch):
    """Issue 22: at the defaults, a run whose layers settle within its first 10% gets at
    least 3 captures there (front-loaded), and a 6.4-minute run stays within the 5% budget."""
    steps = 384
    tracker = _settling_run(tmp_path, {}, monkeypatch, steps=steps)
    early = [s for s in tracker.captured_steps if 0 < s <= 0.1 * steps]
    assert len(early) >= 3, tracker.captured_steps
    # the layers did settle in the first 10%: the captures after it see no change at all
    late = [e for e in tracker.to_previous if e["step"] > 0.1 * steps]
    assert late and all(v > 0.999 for e in late for k, v in e.items() if k != "step")
    summary = json.loads((tmp_path / "svcca_summary.json").read_text())
    schedule = summary["schedule"]
    assert schedule["mode"] == "default" and set(early) <= set(schedule["front_loaded"])
    assert not schedule["over_budget"]  # a run of 5 minutes or more: no capture over the budget
    assert schedule["overhead"] <= 0.05
    # what the budget could not afford is counted and explained
    assert schedule["skipped"] and all("did not fit" in e["reason"] for e in schedule["skipped"])
    assert f"the budget skipped {len(schedule['skipped'])} front-loaded point" in schedule["message"]


def test_default_schedule_without_a_budget_takes_every_front_loaded_point(tmp_path, monkeypatch):
    tracker = _settling_run(tmp_path, dict(max_overhead=None, final_analysis=False), monkeypatch, steps=200)
    # 1%, 1.4%, 2%, 2.8%, 4%, 5.7%, 8%, 11%, 16%, 23%, 32%, 45%, 64%, 91% of 200 steps
    assert tracker.captured_steps == [0, 2, 3, 4, 6, 8, 12, 16, 23, 32, 46, 64, 91, 128, 182, 200]


def test_a_state_saved_by_0_2_resumes_with_the_same_decisions(tmp_path):
    """``tests/data/tracker_state_0_2.json`` is ``state_dict()`` of svcca-torch 0.2 (95022bb)
    after this very run; the split tracker takes the same decisions and resumes from it."""
    settings = dict(freeze="adaptive", freeze_window=10, freeze_threshold=0.3, every_n_steps=10, max_overhead=None,
                    final_analysis=False)
    old = json.loads((Path(__file__).parent / "data" / "tracker_state_0_2.json").read_text())
    model, tracker = _train(settings, tmp_path, epochs=4)
    assert [(e["step"], e["groups"]) for e in tracker.freeze_log] == [(e["step"], e["groups"]) for e in old["freeze_log"]]
    assert tracker.captured_steps == old["captured_steps"]
    for now, then in zip(tracker.signal_log, old["signal_log"], strict=True):
        assert now == pytest.approx(then, rel=1e-5, abs=1e-6)  # float32 recordings, float64 kernels
    resumed = DynamicsTracker(model, _data()[1], run_dir=tmp_path, **settings)
    resumed.load_state_dict(old)
    resumed.start(step=old["captured_steps"][-1])
    assert resumed.signal_log == old["signal_log"] and resumed.chance == old["chance"]
    assert resumed.policy.frozen == old["policy"]["frozen"] and resumed.freeze_log == old["freeze_log"]
    assert all(not p.requires_grad for g in resumed.groups if g.name in old["policy"]["frozen"] for p in g.parameters())
    assert resumed.state_dict()["policy"]["signal"]["log"] == old["signal_log"]  # saved again in 0.3's shape
    resumed.close()


def test_the_run_folders_figures_and_summary_never_write_through_a_link(tmp_path):
    """A link where the run writes its PNGs or svcca_summary.json is replaced, never written
    through: the files it points to, outside the run folder, stay as they were."""
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    targets = {}
    for name in ("learning_dynamics.png", "convergence.png", "svcca_summary.json"):
        targets[name] = outside / name
        targets[name].write_bytes(b"keep me")
        (run / name).symlink_to(targets[name])
    _train(dict(every_n_steps=STEPS_PER_EPOCH, max_overhead=None), run, epochs=1)
    for name, target in targets.items():
        assert target.read_bytes() == b"keep me", name
        assert not (run / name).is_symlink() and (run / name).stat().st_size > 0, name
    assert json.loads((run / "svcca_summary.json").read_text())["captured_steps"]
