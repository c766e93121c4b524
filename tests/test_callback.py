"""SVCCACallback on real tiny trainings (digits, CPU, seconds each)."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from matplotlib.image import imread
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from _lightning_helpers import DigitsModule, digits_loaders, trainer
from svcca_torch.callbacks import SVCCACallback
from svcca_torch.freeze import is_frozen
from svcca_torch.store import RepresentationStore

STEPS_PER_EPOCH = 10  # 640 training digits, batches of 64


class FrozenSnapshot(Callback):
    """Snapshots each group's state_dict the first time it is seen frozen (after the SVCCA
    callback's hooks in the same event), and at the start of training."""

    def __init__(self, svcca: SVCCACallback) -> None:
        self.svcca = svcca
        self.at_freeze = {}
        self.frozen_at_start = None

    def _snap(self) -> None:
        for g in self.svcca.groups:
            if g.name not in self.at_freeze and is_frozen(g):
                self.at_freeze[g.name] = {f"{i}.{k}": v.clone() for i, m in enumerate(g.modules)
                                          for k, v in m.state_dict().items()}

    def on_train_start(self, trainer, pl_module):
        self.frozen_at_start = [g.name for g in self.svcca.groups if is_frozen(g)]
        self._snap()

    def on_train_batch_end(self, trainer, pl_module, *args):
        self._snap()

    def on_train_epoch_end(self, trainer, pl_module):
        self._snap()

    def assert_unchanged(self):
        assert self.at_freeze, "no group was frozen"
        for g in self.svcca.groups:
            if g.name in self.at_freeze:
                now = {f"{i}.{k}": v for i, m in enumerate(g.modules) for k, v in m.state_dict().items()}
                for k, v in self.at_freeze[g.name].items():
                    assert torch.equal(v, now[k]), f"{g.name}: {k} moved after freezing"


def _events(log_dir):
    """The event files as `tensorboard --logdir` serves them: TensorBoard's default size
    guidance (10 images per tag, reservoir-sampled beyond that)."""
    from tensorboard.backend.event_processing import data_ingester
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance=data_ingester.DEFAULT_SIZE_GUIDANCE,
                           tensor_size_guidance=data_ingester.DEFAULT_TENSOR_SIZE_GUIDANCE)
    acc.Reload()
    return acc


def _plugin_tags(acc, plugin):
    return [t for t in acc.Tags()["tensors"] if acc.SummaryMetadata(t).plugin_data.plugin_name == plugin]


def _matrices(nested):
    """svcca_summary.json's matrices (null off the diagonal where not computed) as a tensor."""
    return torch.tensor([[[math.nan if v is None else v for v in row] for row in m] for m in nested],
                        dtype=torch.float64)


def test_tensorboard_run_logs_live_and_final_views(tmp_path):
    pl.seed_everything(0)
    loader, probe = digits_loaders()
    model = DigitsModule()
    # 16 captures: more than TensorBoard keeps per image tag
    cb = SVCCACallback(probe, every_n_train_steps=2, max_overhead=None, freeze_training=True, freeze_threshold=0.9,
                       freeze_patience=1, progress=False)
    logger = TensorBoardLogger(str(tmp_path), name="tb", default_hp_metric=False)
    trainer(tmp_path, logger=logger, max_epochs=3, callbacks=[cb]).fit(model, loader)

    last = 3 * STEPS_PER_EPOCH
    steps = list(range(0, last + 1, 2))
    assert cb.captured_steps == steps
    run_dir = Path(logger.log_dir) / "svcca"
    store = RepresentationStore(run_dir / "store")
    assert [c.step for c in store.checkpoints] == steps
    assert store.layers == model.layer_names

    acc = _events(logger.log_dir)
    scalars, images = _plugin_tags(acc, "scalars"), _plugin_tags(acc, "images")
    # every tag the callback wrote is under its name (the module's own train_loss/epoch aside)
    ours = [t for t in acc.Tags()["tensors"] if t not in ("train_loss", "epoch", "custom_scalars__config__")]
    assert ours and all(t.startswith("svcca/") for t in ours), ours
    assert not any(t.startswith("freeze/") for t in acc.Tags()["tensors"])
    # the per-layer curves are images (at TensorBoard's defaults scalars would be misdrawn):
    # the scalars are the freeze step functions, in the main run
    assert sorted(t for t in scalars if t.startswith("svcca/")) == ["svcca/freeze/backward_flops_saved",
                                                                    "svcca/freeze/frozen_groups"]
    assert not [p for p in (Path(logger.log_dir) / "svcca").iterdir() if p.is_dir() and p.name[:2].isdigit()]
    # images: at most 10 per tag (what TensorBoard keeps), in step order, heatmaps from step 0
    assert {"svcca/live/to_previous_matrix", "svcca/live/to_previous_curves", "svcca/dynamics/to_final_matrix",
            "svcca/dynamics/grid", "svcca/dynamics/to_final_curves"} <= set(images)
    for tag in images:
        got = [e.step for e in acc.Tensors(tag)]
        assert 1 <= len(got) <= 10 and got == sorted(got), (tag, got)
    heatmaps = [e.step for e in acc.Tensors("svcca/dynamics/to_final_matrix")]
    assert heatmaps[0] == 0 and heatmaps[-1] == last and len(heatmaps) == cb.tracker.final_heatmaps == 6
    # live images were written while training ran, long before its last step
    live = acc.Tensors("svcca/live/to_previous_curves")
    assert live[0].step == 2 and live[-1].step == last
    last_loss = max(acc.Tensors("train_loss"), key=lambda e: e.step)
    assert live[0].wall_time < last_loss.wall_time
    # freeze training: count and fraction from 0 at step 0, at every capture
    for tag in ("svcca/freeze/frozen_groups", "svcca/freeze/backward_flops_saved"):
        events = acc.Tensors(tag)
        assert events[0].step == 0 and events[0].tensor_proto.float_val[0] == 0.0
        assert set(steps) <= {e.step for e in events}
    assert cb.policy.frozen and acc.Tensors("svcca/freeze/frozen_groups")[-1].tensor_proto.float_val[0] > 0
    assert "custom_scalars__config__" in acc.Tags()["tensors"]

    # the end-of-run analysis: full matrices only for the captures shown
    summary = json.loads((run_dir / "svcca_summary.json").read_text())
    assert summary["steps"] == steps and summary["probe_checksum"] == cb.probe_checksum
    assert set(heatmaps) <= set(summary["full_steps"]) and len(summary["full_steps"]) <= 12
    m = _matrices(summary["matrices"])
    for c, st in enumerate(steps):
        off = ~torch.eye(len(model.layer_names), dtype=torch.bool)
        assert bool(m[c][off].isnan().all()) != (st in summary["full_steps"])
        assert not m[c].diagonal().isnan().any()
    assert torch.allclose(m[-1].diagonal(), torch.ones(len(model.layer_names), dtype=torch.float64), atol=1e-5)
    for name in ("learning_dynamics.png", "convergence.png", "svcca_summary.json"):
        assert (run_dir / name).stat().st_size > 0
    # the run folder's figures are the images TensorBoard got, drawn once for both
    for name, tag in (("learning_dynamics.png", "svcca/dynamics/grid"), ("convergence.png", "svcca/dynamics/to_final_curves")):
        logged = imread(io.BytesIO(acc.Tensors(tag)[-1].tensor_proto.string_val[2]))
        saved = imread(run_dir / name)
        assert logged.shape[:2] == saved.shape[:2] and (abs(logged[..., :3] - saved[..., :3]) < 1e-6).all()


def test_every_n_train_steps_schedule(tmp_path):
    loader, probe = digits_loaders()
    cb = SVCCACallback(probe, every_n_train_steps=4, max_overhead=None, final_analysis=False, progress=False)
    trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(DigitsModule(), loader)
    assert cb.captured_steps == [0, 4, 8, 10]  # plus the end of training


def test_start_and_end_captures_draw_no_repeated_views(tmp_path):
    """Captured at step 0 and the end only (a short run at the default budget): the one
    comparison is the step-0 to-final heatmap; no live images repeat it, and the grid shows
    the two checkpoints once each."""
    loader, probe = digits_loaders()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    cb = SVCCACallback(probe, every_n_epochs=5, max_overhead=None, progress=False)
    trainer(tmp_path, logger=logger, max_epochs=2, callbacks=[cb]).fit(DigitsModule(), loader)
    assert cb.captured_steps == [0, 20]
    acc = _events(logger.log_dir)
    images = _plugin_tags(acc, "images")
    assert not [t for t in images if "/live/" in t]
    assert [e.step for e in acc.Tensors("svcca/dynamics/to_final_matrix")] == [0, 20]
    assert {"svcca/dynamics/grid", "svcca/dynamics/to_final_curves"} <= set(images)
    summary = json.loads((Path(logger.log_dir) / "svcca" / "svcca_summary.json").read_text())
    assert summary["to_previous"][1][0] is not None  # the one comparison is kept
    grid = imread(Path(logger.log_dir) / "svcca" / "learning_dynamics.png")
    assert grid.shape[0] < 0.7 * grid.shape[1]  # one row of two panels, not a 2x2 grid of both twice


@pytest.mark.parametrize("policy", ["adaptive", "schedule"])
def test_freeze_training_freezes_bottom_up_and_keeps_weights(tmp_path, policy):
    pl.seed_everything(0)
    loader, probe = digits_loaders()
    model = DigitsModule()
    kwargs = dict(freeze_threshold=0.9, freeze_patience=1) if policy == "adaptive" else dict(
        schedule_start=0.2, schedule_end=0.6)
    cb = SVCCACallback(probe, freeze_training=policy, progress=False, final_analysis=False, frozen_cache=True,
                       **kwargs)
    snap = FrozenSnapshot(cb)
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer(tmp_path, logger=logger, max_epochs=4, callbacks=[cb, snap]).fit(model, loader)

    names = [g.name for g in cb.groups]
    frozen = cb.policy.frozen
    assert frozen and frozen == names[: len(frozen)]  # contiguous from the bottom
    assert names[-1] not in frozen and len(frozen) <= int(0.75 * len(names))
    snap.assert_unchanged()
    # epochs over the same 640 digits: the frozen prefix's forward was skipped for batches seen before
    cache = cb.tracker.frozen_cache_stats
    assert cache["served"] > 0 and cache["off"] is None
    assert not any("forward" in m.__dict__ for m in model.modules())  # restored when training ended
    for g in cb.groups:
        assert is_frozen(g) == (g.name in frozen)
        for m in g.modules:
            for bn in m.modules():
                if isinstance(bn, torch.nn.BatchNorm2d):
                    assert bn.training is False if g.name in frozen else True
    if policy == "schedule":
        fractions = cb.policy.freeze_fractions
        for e in cb.policy.events:
            assert e["step"] / 40 >= fractions[e["group"]] - 1e-9
    last = cb.freeze_log[-1]
    assert last["frozen_parameters"] == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert 0.0 < last["backward_flops_saved"] < 1.0
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("svcca/freeze/frozen_groups") for r in rows)
    assert not any(k.startswith("freeze/") for k in rows[0])  # every tag under the callback's name


def test_resume_refreezes_and_keeps_history(tmp_path):
    pl.seed_everything(0)
    loader, probe = digits_loaders()
    cb1 = SVCCACallback(probe, every_n_epochs=1, max_overhead=None, freeze_training=True, freeze_threshold=0.9,
                        freeze_patience=1, progress=False)
    t1 = trainer(tmp_path, logger=TensorBoardLogger(str(tmp_path), name="tb"), max_epochs=2, callbacks=[cb1],
                 checkpointing=True)
    t1.fit(DigitsModule(), loader)
    frozen_before = list(cb1.policy.frozen)
    assert frozen_before, "the first run should have frozen a group"
    ckpt = t1.checkpoint_callback.best_model_path
    loaded = torch.load(ckpt, weights_only=False)
    saved = loaded["state_dict"]
    # the TensorBoard images written so far travel with the checkpoint
    board_state = loaded["callbacks"][cb1.state_key]["board"]
    assert board_state["images_written"]["svcca/live/to_previous_curves"]

    cb2 = SVCCACallback(probe, every_n_epochs=1, max_overhead=None, freeze_training=True, freeze_threshold=0.9,
                        freeze_patience=1, progress=False)
    snap = FrozenSnapshot(cb2)
    t2 = trainer(tmp_path, logger=TensorBoardLogger(str(tmp_path), name="tb"), max_epochs=4,
                 callbacks=[cb2, snap])
    model2 = DigitsModule()
    t2.fit(model2, loader, ckpt_path=ckpt)

    assert snap.frozen_at_start == frozen_before  # re-frozen before the first resumed step
    live = cb2.views.images_written["svcca/live/to_previous_curves"]
    assert live[: len(board_state["images_written"]["svcca/live/to_previous_curves"])] == \
        board_state["images_written"]["svcca/live/to_previous_curves"]  # restored, then continued
    assert len(live) <= 10 and live[-1] == 40
    assert cb2.run_dir == cb1.run_dir  # same store, history kept
    assert cb2.captured_steps == [0, 10, 20, 30, 40]
    assert cb2.policy.frozen[: len(frozen_before)] == frozen_before
    store = RepresentationStore(cb2.run_dir / "store")
    assert [c.step for c in store.checkpoints] == [0, 10, 20, 30, 40]
    # weights of the groups frozen in run 1 are bit-identical to the checkpoint's
    group = {g.name: g for g in cb2.groups}[frozen_before[0]]
    params = {id(p) for p in group.parameters()}
    for k, v in model2.state_dict().items():
        p = dict(model2.named_parameters()).get(k)
        if p is not None and id(p) in params:
            assert torch.equal(v, saved[k]), k
    summary = json.loads((cb2.run_dir / "svcca_summary.json").read_text())
    assert summary["steps"] == [0, 10, 20, 30, 40]
    # fractions of the whole resumed run (run 1 planned only 20 steps)
    assert summary["fractions"] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert (cb2.run_dir / "to_previous.png").stat().st_size > 0  # freeze training's signal


def test_resume_from_an_earlier_checkpoint_archives_the_lost_captures(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    loader, probe = digits_loaders()
    cb1 = SVCCACallback(probe, every_n_epochs=1, max_overhead=None, final_analysis=False, progress=False)
    keep_all = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    t1 = trainer(tmp_path, max_epochs=3, callbacks=[cb1, keep_all], checkpointing=True)
    t1.fit(DigitsModule(), loader)
    store_dir = cb1.run_dir / "store"
    assert [c.step for c in RepresentationStore(store_dir).checkpoints] == [0, 10, 20, 30]
    lost = RepresentationStore(store_dir).load(30, "net.fc").basis.clone()

    first_epoch = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]
    cb2 = SVCCACallback(probe, every_n_epochs=1, max_overhead=None, final_analysis=False, progress=False)
    t2 = trainer(tmp_path, max_epochs=3, callbacks=[cb2])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*already in the store.*")
        t2.fit(DigitsModule(lr=0.01), loader, ckpt_path=str(first_epoch))
    assert cb2.captured_steps == [0, 10, 20, 30]
    store = RepresentationStore(store_dir)
    assert [c.step for c in store.checkpoints] == [0, 10, 20, 30]
    # steps 20 and 30 now hold the resumed run; the lost run's are archived, not deleted
    assert not torch.equal(store.load(30, "net.fc").basis, lost)
    (archive,) = (store_dir / "superseded").iterdir()
    old = RepresentationStore(archive)
    assert [c.step for c in old.checkpoints] == [20, 30]
    torch.testing.assert_close(old.load(30, "net.fc").basis, lost)


def test_a_new_run_in_an_old_run_dir_archives_the_old_captures(tmp_path):
    loader, probe = digits_loaders()
    firsts = []
    for seed in (0, 1):
        pl.seed_everything(seed)
        cb = SVCCACallback(probe, every_n_epochs=1, max_overhead=None, final_analysis=False, progress=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(DigitsModule(), loader)
        store = RepresentationStore(cb.run_dir / "store", read_only=True)  # the next run writes it
        assert [c.step for c in store.checkpoints] == [0, STEPS_PER_EPOCH]
        firsts.append(store.load(0, "net.fc").basis.clone())
    assert any("captures of an earlier run" in str(w.message) for w in caught)
    # the store now holds the second run, not the first run's captures kept in its place
    assert not torch.equal(firsts[0], firsts[1])
    (archive,) = (cb.run_dir / "store" / "superseded").iterdir()
    torch.testing.assert_close(RepresentationStore(archive).load(0, "net.fc").basis, firsts[0])


def test_two_instances_coexist_by_state_key(tmp_path):
    loader, probe = digits_loaders()
    a = SVCCACallback(probe, name="a", final_analysis=False, progress=False)
    b = SVCCACallback(probe[:100], name="b", layers=["net.fc"], final_analysis=False, progress=False)
    assert a.state_key != b.state_key
    t = trainer(tmp_path, max_epochs=1, callbacks=[a, b])
    t.fit(DigitsModule(), loader)
    assert a.run_dir.name == "a" and b.run_dir.name == "b"
    assert RepresentationStore(b.run_dir / "store").layers == ["net.fc"]


@pytest.mark.parametrize("kind", ["csv", "none"])
def test_csv_and_no_logger_write_figures_and_json(tmp_path, kind):
    loader, probe = digits_loaders()
    logger = CSVLogger(str(tmp_path), name="csv") if kind == "csv" else None
    cb = SVCCACallback(probe, every_n_epochs=1, max_overhead=None, progress=False)
    trainer(tmp_path, logger=logger, max_epochs=2, callbacks=[cb]).fit(DigitsModule(), loader)
    run_dir = (Path(logger.log_dir) if logger else tmp_path) / "svcca"
    assert cb.run_dir == run_dir
    for name in ("learning_dynamics.png", "convergence.png", "svcca_summary.json"):
        assert (run_dir / name).stat().st_size > 0
    summary = json.loads((run_dir / "svcca_summary.json").read_text())
    assert summary["steps"] == [0, 10, 20] and len(summary["to_final"]) == 3
    if kind == "csv":
        with open(Path(logger.log_dir) / "metrics.csv") as f:
            header = next(csv.reader(f))
        assert "svcca/to_previous/net.features.block1" in header
        assert "svcca/to_final/net.fc" in header


def test_setup_errors_are_clear(tmp_path):
    loader, probe = digits_loaders()
    with pytest.raises(ValueError, match="probe"):
        SVCCACallback(torch.empty(0, 1, 8, 8))
    with pytest.raises(ValueError, match="every_n_epochs"):
        SVCCACallback(probe, every_n_epochs=1, every_n_train_steps=5)
    with pytest.raises(ValueError, match="freeze_training"):
        SVCCACallback(probe, freeze_training="sometimes")
    with pytest.raises(ValueError, match="nope"):
        trainer(tmp_path, callbacks=[SVCCACallback(probe, layers=["nope"])]).fit(DigitsModule(), loader)
    with pytest.raises(ValueError, match="LBFGS"):
        trainer(tmp_path, callbacks=[SVCCACallback(probe, freeze_training=True)]).fit(
            DigitsModule(optimizer="lbfgs"), loader)
    with pytest.raises(ValueError, match="max_epochs or max_steps"):
        trainer(tmp_path, max_epochs=-1, max_steps=-1,
                callbacks=[SVCCACallback(probe, freeze_training="schedule")]).fit(DigitsModule(), loader)


def test_probe_that_changes_order_is_caught(tmp_path):
    loader, probe = digits_loaders()
    shuffled = DataLoader(TensorDataset(probe, torch.zeros(len(probe))), batch_size=50, shuffle=True)
    cb = SVCCACallback(shuffled, progress=False)
    with pytest.raises(ValueError, match="shuffle=False"):
        trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(DigitsModule(), loader)


def test_few_probe_datapoints_warn(tmp_path):
    loader, probe = digits_loaders()
    cb = SVCCACallback(probe[:8], grid=1, final_analysis=False, progress=False)
    with pytest.warns(UserWarning, match="datapoints"):
        trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(DigitsModule(), loader)


def _run_script(tmp_path, devices: int) -> dict:
    out = tmp_path / f"ddp{devices}"
    script = Path(__file__).with_name("_ddp_callback_run.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent)]))
    proc = subprocess.run([sys.executable, str(script), "--devices", str(devices), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)}


def test_ddp_two_processes_match_one_process(tmp_path):
    one = _run_script(tmp_path, 1)[0]
    two = _run_script(tmp_path, 2)
    # every rank froze the same groups at the same steps, and agrees with the 1-process run
    assert two[0]["events"] == two[1]["events"] == one["events"]
    assert one["events"], "the reference run should freeze a group"
    assert two[0]["param_digest"] == two[1]["param_digest"]
    # frozen weights stay bit-identical under DDP too (find_unused_parameters leaves their grad None)
    assert one["frozen_unchanged"] and two[0]["frozen_unchanged"] and two[1]["frozen_unchanged"]
    assert two[0]["find_unused_parameters"] is True  # as the strategy asked for (the callback changes nothing)
    assert two[0]["captured_steps"] == one["captured_steps"]
    # rank 0 alone wrote the store; its matrices match the 1-process run's
    m1, m2 = _matrices(one["matrices"]), _matrices(two[0]["matrices"])
    assert m1.shape == m2.shape and torch.allclose(m1, m2, atol=1e-4, equal_nan=True)
    assert two[1]["matrices"] is None
    # each rank recorded half of the probe; the rows rank 0 gathered are the 1-process rows, in order
    assert two[0]["sharded"] and not one["sharded"]
    assert one["row_norms_step0"].keys() == two[0]["row_norms_step0"].keys()
    for layer, norms in one["row_norms_step0"].items():
        assert torch.allclose(torch.tensor(norms), torch.tensor(two[0]["row_norms_step0"][layer]), atol=1e-4)


def test_ddp_freeze_training_needs_find_unused_parameters(tmp_path):
    """The callback no longer changes the strategy's settings (a private member of Lightning's):
    at the start of training it checks the wrapped DistributedDataParallel and names the fix."""
    from pytorch_lightning.strategies import DDPStrategy

    loader, probe = digits_loaders()

    def fit(strategy, freeze=True):
        cb = SVCCACallback(probe, freeze_training=freeze, final_analysis=False, progress=False)
        trainer(tmp_path, max_steps=2, callbacks=[cb], strategy=strategy, devices=1).fit(DigitsModule(), loader)
        return cb

    with pytest.raises(ValueError, match="strategy='ddp_find_unused_parameters_true'"):
        fit(DDPStrategy())
    with pytest.raises(ValueError, match="static_graph"):
        fit(DDPStrategy(find_unused_parameters=True, static_graph=True))
    cb = fit("ddp_find_unused_parameters_true")
    assert cb.captured_steps[0] == 0 and cb.captured_steps[-1] == 2
    assert fit(DDPStrategy(), freeze=False).captured_steps[0] == 0  # without freeze training: any DDP


def test_explicit_freeze_groups(tmp_path):
    loader, probe = digits_loaders()
    groups = {"low": ["net.features.block1", "net.features.block2"],
              "high": ["net.features.block3", "net.features.block4"], "head": ["net.fc1", "net.fc"]}
    cb = SVCCACallback(probe, freeze_training="schedule", freeze_groups=groups, schedule_start=0.3,
                       schedule_end=0.3, max_frozen_fraction=0.34, final_analysis=False, progress=False)
    model = DigitsModule()
    trainer(tmp_path, max_epochs=2, callbacks=[cb]).fit(model, loader)
    assert [g.name for g in cb.groups] == ["low", "high", "head"] and cb.policy.frozen == ["low"]
    assert cb.policy.events == [{"step": 6, "group": "low"}]  # first step at or past 30% of 20
    assert not any(p.requires_grad for p in model.net.features.block2.parameters())
    assert all(p.requires_grad for p in model.net.features.block3.parameters())
    # the adaptive policy needs a recorded layer in every freezable group
    with pytest.raises(ValueError, match="no recorded layer"):
        trainer(tmp_path, callbacks=[SVCCACallback(probe, layers=["net.fc"], freeze_training=True,
                                                   freeze_groups=groups)]).fit(DigitsModule(), loader)


# ---------------------------------------------------------------------------- probe edge cases (issue 8, section 4)
def test_generator_probe_is_refused_at_construction():
    _, probe = digits_loaders()
    with pytest.raises(ValueError, match="single-use"):
        SVCCACallback((b for b in probe.split(50)))


def test_one_sample_probe_loader_fails_at_setup_with_a_probe_message(tmp_path):
    loader, probe = digits_loaders()
    cb = SVCCACallback(DataLoader(TensorDataset(probe[:1], torch.zeros(1)), batch_size=1), progress=False)
    t = trainer(tmp_path, max_epochs=1, callbacks=[cb])
    with pytest.raises(ValueError, match=r"`probe` holds 1 input"):
        cb.setup(t, DigitsModule(), "fit")


class _SecondBatchDrifts:
    """A re-iterable probe whose second batch changes between passes (first batch fixed)."""

    def __init__(self, x):
        self.x, self.passes = x, 0

    def __iter__(self):
        self.passes += 1
        yield self.x[:100]
        yield self.x[100:] * (1.0 + 0.1 * self.passes)


def test_probe_checksum_covers_every_batch(tmp_path):
    loader, probe = digits_loaders()
    cb = SVCCACallback(_SecondBatchDrifts(probe), every_n_epochs=1, progress=False)
    with pytest.raises(ValueError, match="probe` changed"):
        trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(DigitsModule(), loader)


def test_unknown_training_length_adaptive_freezes(tmp_path):
    """max_steps=-1 with an early stop: the adaptive signal needs no training length."""
    from pytorch_lightning.callbacks import EarlyStopping

    loader, probe = digits_loaders()
    cb = SVCCACallback(probe, freeze_training=True, freeze_threshold=0.9, freeze_patience=1, final_analysis=False,
                       progress=False)
    stop = EarlyStopping(monitor="train_loss", patience=0, min_delta=10.0, check_on_train_epoch_end=True)
    t = trainer(tmp_path, max_epochs=-1, max_steps=-1, callbacks=[cb, stop])
    t.fit(DigitsModule(), loader)
    assert t.global_step < 100 and cb.captured_steps[0] == 0 and cb.captured_steps[-1] == t.global_step


class _DivergeAtTheEnd(Callback):
    """Fills every parameter with NaN in on_train_end, before the SVCCA callback's (listed after it)."""

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            for p in pl_module.parameters():
                p.fill_(math.nan)


def test_failed_final_capture_is_reported_and_the_run_still_written(tmp_path):
    """A model that diverged by the end: the final capture's failures are recorded and warned
    about once, and the captures before it are analysed, logged and drawn as usual."""
    loader, probe = digits_loaders()
    cb = SVCCACallback(probe, every_n_train_steps=7, max_overhead=None, progress=False)
    logger = TensorBoardLogger(str(tmp_path), name="tb", default_hp_metric=False)
    model = DigitsModule()
    with pytest.warns(UserWarning, match=r"(?s)failures at the end of the run.*\n  - layer 'net\.[^']*' has .* "
                                         r"at step 20 \(final capture\): the model diverged"):
        trainer(tmp_path, logger=logger, max_epochs=2, callbacks=[_DivergeAtTheEnd(), cb]).fit(model, loader)
    run_dir = Path(logger.log_dir) / "svcca"
    summary = json.loads((run_dir / "svcca_summary.json").read_text())
    assert summary["steps"] == [0, 7, 14] and cb.captured_steps == [0, 7, 14]
    assert [(f["step"], f["layer"]) for f in summary["failures"]] == [(20, n) for n in model.layer_names]
    for name in ("learning_dynamics.png", "convergence.png"):  # drawn by the TensorBoard views
        assert (run_dir / name).stat().st_size > 0
    acc = _events(logger.log_dir)
    assert {"svcca/dynamics/grid", "svcca/dynamics/to_final_curves"} <= set(_plugin_tags(acc, "images"))


def test_a_fit_that_raises_releases_the_store_and_the_models_forwards(tmp_path):
    """After an exception in training the run folder can be written again in the same process
    (one writer per folder) and no forward of the model stays replaced by the cache."""
    loader, probe = digits_loaders()

    class Fails(DigitsModule):
        def training_step(self, batch, batch_idx):
            if self.global_step == 25:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model = Fails()
    cb = SVCCACallback(probe, run_dir=tmp_path / "run", freeze_training=True, freeze_threshold=1e-6,
                       freeze_patience=1, frozen_cache=True, final_analysis=False, progress=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, max_epochs=5, callbacks=[cb]).fit(model, loader)
    assert cb.policy.frozen, "a group should be frozen (the cache installed) before the exception"
    assert not any("forward" in m.__dict__ for m in model.modules())
    again = SVCCACallback(probe, run_dir=tmp_path / "run", final_analysis=False, progress=False)
    trainer(tmp_path, max_epochs=1, callbacks=[again]).fit(DigitsModule(), loader)
    assert again.tracker.captured_steps


# ----------------------------------------------------------------------------------- issue 22: the schedule
class _SettlesEarly(DigitsModule):
    """A plain conv net at a high learning rate for its first 12 steps, then at 0: its layers
    settle within the first 10% of a 192-step run and never change after."""

    def __init__(self) -> None:
        super().__init__(lr=0.3, batch_norm=False)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 12 else 0.0),
            "interval": "step"}}


def test_every_n_train_steps_is_honoured_whatever_the_budget(tmp_path):
    """Issue 22: every_n_train_steps=6 on a 192-step run took 2 captures (the 5% budget
    dropped the other 30 silently); an explicit schedule is taken in full and reported."""
    loader, probe = digits_loaders(batch_size=10)  # 64 steps per epoch
    cb = SVCCACallback(probe, every_n_train_steps=6, final_heatmaps=2, progress=False)  # max_overhead at 0.05
    trainer(tmp_path, max_epochs=3, callbacks=[cb]).fit(DigitsModule(), loader)
    assert cb.captured_steps == list(range(0, 193, 6))
    schedule = json.loads((Path(cb.run_dir) / "svcca_summary.json").read_text())["schedule"]
    assert schedule["mode"] == "explicit" and schedule["requested"] == list(range(6, 193, 6))
    assert not schedule["skipped"]
    assert schedule["message"].startswith("33 captures (step 0, 32 every 6 steps), every one taken")


def test_fast_settling_run_at_the_defaults_captures_its_first_tenth(tmp_path):
    """Issue 22: at the defaults a run whose layers settle within the first 10% of training
    gets at least 3 captures there (the front-loaded schedule; on a run this short the points
    at 1%, 3% and 8% even over the budget, and the cost is reported)."""
    pl.seed_everything(0)
    loader, probe = digits_loaders(batch_size=10)  # 64 steps per epoch, 192 in all
    cb = SVCCACallback(probe, final_heatmaps=3, progress=False)
    trainer(tmp_path, max_epochs=3, callbacks=[cb]).fit(_SettlesEarly(), loader)
    early = [s for s in cb.captured_steps if 0 < s <= 0.1 * 192]
    assert len(early) >= 3 and {2, 6, 16} <= set(early), cb.captured_steps
    # the layers did settle in the first 10%: no change between later captures
    late = [e for e in cb.to_previous if e["step"] > 19]
    assert all(v > 0.999 for e in late for k, v in e.items() if k != "step")
    summary = json.loads((Path(cb.run_dir) / "svcca_summary.json").read_text())
    schedule = summary["schedule"]
    assert set(early) <= set(schedule["front_loaded"]) and schedule["mode"] == "default"
    assert "own time" in schedule["message"] and "% of" in schedule["message"]
    for e in schedule["skipped"]:  # whatever the budget skipped is explained
        assert "did not fit" in e["reason"]


def test_freeze_is_visible_and_step_functions_are_logged_often(tmp_path):
    """Issue 22: the freeze steps are in the summary JSON (per group and per layer), the
    convergence order is stated with its statistic, judged on the layers before they froze;
    in TensorBoard the freeze count (a step function) is logged at every freeze window as well
    as every capture, the main run holds no per-layer tags, and the freeze signal (a few
    points per group: one-point charts) is in the events text, with the values that froze."""
    pl.seed_everything(0)
    loader, probe = digits_loaders()
    cb = SVCCACallback(probe, every_n_epochs=2, freeze_training=True, freeze_window=5, freeze_threshold=0.9,
                       progress=False)
    logger = TensorBoardLogger(str(tmp_path), name="tb", default_hp_metric=False)
    trainer(tmp_path, logger=logger, max_epochs=4, callbacks=[cb]).fit(DigitsModule(), loader)
    assert cb.captured_steps == [0, 20, 40] and cb.freeze_log
    summary = json.loads((Path(logger.log_dir) / "svcca" / "svcca_summary.json").read_text())
    freeze = summary["freeze"]
    assert freeze["freeze_steps"] == {g: e["step"] for e in cb.freeze_log for g in e["groups"]}
    assert freeze["layer_freeze_steps"] == {n: s for g, s in freeze["freeze_steps"].items()
                                            for n in cb.tracker.group_layers[g]}
    order = summary["convergence"]
    assert set(order) >= {"spearman", "n_layers", "p_value", "excluded", "statement"}
    assert order["lower_first"] in (True, False, None) and "convergence order" in order["statement"]
    for name, why in order["excluded"].items():  # left out only for having been frozen first
        assert name in freeze["layer_freeze_steps"] and "frozen at step" in why
    acc = _events(logger.log_dir)
    count = [e.step for e in acc.Tensors("svcca/freeze/frozen_groups")]
    assert set(range(0, 41, 5)) <= set(count)  # every freeze window, not only the 3 captures
    ours = sorted(t for t in _plugin_tags(acc, "scalars") if t.startswith("svcca/"))
    assert ours == ["svcca/freeze/backward_flops_saved", "svcca/freeze/frozen_groups"]
    assert not [p for p in (Path(logger.log_dir) / "svcca").iterdir() if p.is_dir() and p.name[:2].isdigit()]
    events = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("svcca/freeze/events/text_summary")]
    first = cb.freeze_log[0]
    assert events[0].startswith(f"step {first['step']}: froze {first['groups'][0]} (1 of 6 groups frozen")
    # why it froze: the policy's reason in the freeze-log entry (the tracker's), written as given
    reason = first.get("reason")
    assert events[0].endswith(f"; {reason})" if reason else "backward FLOPs saved)"), events[0]
