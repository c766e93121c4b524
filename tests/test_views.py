"""svcca_torch.views: one views object for a plain PyTorch loop, sinks that get the same
pixels, and Lightning loggers as sinks (fake W&B- and MLflow-style loggers: neither is a
dependency)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
from matplotlib.image import imread

import svcca_torch as sv
from svcca_torch.views import PNGSink, Sink, TensorBoardSink, TrainingViews, write_figures


class ListSink(Sink):
    """Keeps everything it gets."""

    def __init__(self) -> None:
        self.scalars: Dict[str, List[int]] = {}
        self.images: Dict[str, List[np.ndarray]] = {}
        self.steps: Dict[str, List[int]] = {}
        self.texts: List[str] = []

    def add_scalars(self, scalars, step):
        for k in scalars:
            self.scalars.setdefault(k, []).append(step)

    def add_image(self, tag, image, step):
        self.images.setdefault(tag, []).append(image)
        self.steps.setdefault(tag, []).append(step)

    def add_text(self, tag, text, step):
        self.texts.append(text)


def _plain_loop(run_dir: Path, sinks, freeze: bool = True, steps: int = 24):
    """The docs/tensorboard.md example: a tracker and one views object in a plain loop."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.ReLU(), torch.nn.Linear(24, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4))
    g = torch.Generator().manual_seed(0)
    probe, x = torch.randn(240, 8, generator=g), torch.randn(64, 8, generator=g)
    y = x[:, :4].argmax(1)
    tracker = sv.DynamicsTracker(model, probe, run_dir=run_dir, total_steps=steps, every_n_steps=3,
                                 max_overhead=None, freeze="adaptive" if freeze else False, freeze_window=3,
                                 freeze_threshold=0.05, figures=False, progress=False)
    views = TrainingViews.for_tracker(tracker, sinks)
    views.log(tracker.start())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(1, steps + 1):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        views.log(tracker.maybe_capture(step))
    views.log_final(tracker.finish(steps))
    views.close()
    return tracker, views


def test_a_plain_loop_gets_every_view_in_every_sink_drawn_once(tmp_path):
    keep, png = ListSink(), PNGSink(tmp_path / "run", to_previous=True)
    tb = TensorBoardSink(str(tmp_path / "tb"))
    tracker, views = _plain_loop(tmp_path / "run", [keep, tb, png])
    assert tracker.freeze_log, "the example should freeze a group"
    # every image tag within TensorBoard's 10, in step order, and the list sink got exactly those
    for tag, steps in views.images_written.items():
        assert len(steps) <= 10 and steps == sorted(set(steps)) and keep.steps[tag] == steps
    assert {"svcca/live/to_previous_curves", "svcca/dynamics/grid", "svcca/dynamics/to_final_curves"} <= set(
        views.images_written)
    # the run folder's files are the very pixels the other sinks got
    for tag, name in (("svcca/dynamics/grid", "learning_dynamics.png"),
                      ("svcca/dynamics/to_final_curves", "convergence.png"),
                      ("svcca/live/to_previous_curves", "to_previous.png")):
        on_disk = (imread(tmp_path / "run" / name)[..., :3] * 255).round().astype(np.uint8)
        assert np.array_equal(on_disk, keep.images[tag][-1]), name
    # the freeze step function from step 0 at every capture and window; scalars by full layer name
    assert keep.scalars["svcca/freeze/frozen_groups"][0] == 0
    assert set(range(0, 25, 3)) <= set(keep.scalars["svcca/freeze/frozen_groups"])
    assert keep.scalars["svcca/to_previous/0"] == [s for s in tracker.captured_steps if s > 0]
    assert any(t.startswith("step ") and "froze" in t for t in keep.texts)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_views_resume_from_their_state(tmp_path):
    tracker, views = _plain_loop(tmp_path / "run", [ListSink()], freeze=False, steps=12)
    state = views.state_dict()
    again = TrainingViews([ListSink()], "svcca", views.layers, total_steps=12)
    again.load_state_dict(state, resume_step=6)
    live = [k for k in state["images_written"] if "/live/" in k]
    assert live and all(again.images_written[k] == state["images_written"][k] for k in live)
    assert not [k for k in again.images_written if "/dynamics/" in k]  # the end views start afresh


def test_write_figures_is_the_trackers_figures(tmp_path):
    tracker, _ = _plain_loop(tmp_path / "a", [ListSink()], steps=12)
    analysis = tracker.finish(12)
    sink = write_figures(analysis, tmp_path / "b", to_previous=True)
    assert sorted(sink.files_written) == ["convergence.png", "learning_dynamics.png", "to_previous.png"]
    # the tracker's own figures (figures=True) go through the same function
    t2 = sv.DynamicsTracker(tracker.model, tracker.probe, run_dir=tmp_path / "c", every_n_steps=3,
                            max_overhead=None, progress=False)
    t2.start()
    t2.finish(3)
    assert (tmp_path / "c" / "learning_dynamics.png").stat().st_size > 1000
    assert not (tmp_path / "c" / "to_previous.png").exists()  # not freeze training


def test_bad_sinks_and_unbound_views_name_the_fix():
    with pytest.raises(ValueError, match="TensorBoardSink"):
        TrainingViews([object()], "svcca", ["a"])
    with pytest.raises(ValueError, match="for_tracker"):
        TrainingViews([ListSink()], "svcca", ["a"]).log(sv.tracker.TrackerEvents(0))


# ----------------------------------------------------------------------------- Lightning loggers as sinks
pl = pytest.importorskip("pytorch_lightning")
from pytorch_lightning.loggers import Logger  # noqa: E402

from _lightning_helpers import DigitsModule, digits_loaders, trainer  # noqa: E402
from svcca_torch.callbacks import SVCCACallback  # noqa: E402


class _Fake(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: Dict[str, List[int]] = {}

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None):
        for k in metrics:
            self.metrics.setdefault(k, []).append(step)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class WandbLike(_Fake):
    """``log_image(key, images, step)`` and ``log_text(key, columns, data, step)`` as WandbLogger."""

    def __init__(self) -> None:
        super().__init__()
        self.images: Dict[str, List[int]] = {}
        self.texts: List[Any] = []

    def log_image(self, key, images, step=None, **kwargs):
        assert len(images) == 1 and images[0].dtype == np.uint8 and images[0].shape[2] == 3
        self.images.setdefault(key, []).append(step)

    def log_text(self, key, columns=None, data=None, step=None, **kwargs):
        self.texts.append((key, data))


class _MlflowClient:
    def __init__(self) -> None:
        self.artifacts: List[str] = []

    def log_image(self, run_id, image, artifact_file):
        assert run_id == "run-1" and image.ndim == 3
        self.artifacts.append(artifact_file)

    def log_text(self, run_id, text, artifact_file):
        self.artifacts.append(artifact_file)


class MLFlowLike(_Fake):
    """``experiment.log_image(run_id, image, artifact_file)`` as MLFlowLogger."""

    run_id = "run-1"

    def __init__(self) -> None:
        super().__init__()
        self._client = _MlflowClient()

    @property
    def experiment(self):
        return self._client


class ScalarsOnly(_Fake):
    pass


def test_every_logger_gets_the_views_it_can_show(tmp_path):
    loader, probe = digits_loaders()
    loggers = [WandbLike(), MLFlowLike(), ScalarsOnly()]
    cb = SVCCACallback(probe, every_n_epochs=1, max_overhead=None, freeze_training=True, freeze_threshold=0.5,
                       progress=False)
    trainer(tmp_path, logger=loggers, max_epochs=3, callbacks=[cb]).fit(DigitsModule(), loader)
    wandb, mlflow, plain = loggers
    # the same chosen images as TensorBoard would get, within 10 per tag
    assert wandb.images == cb.views.images_written and "svcca/dynamics/grid" in wandb.images
    assert sorted(a.split("/step_")[0] for a in mlflow.experiment.artifacts if a.endswith(".png")) == sorted(
        t for t, steps in cb.views.images_written.items() for _ in steps)
    assert any("froze" in str(d) for _, d in wandb.texts)
    # every logger gets the scalars with full layer names; one without images is told once
    for lg in loggers:
        assert "svcca/to_previous/net.features.block1" in lg.metrics and "svcca/freeze/frozen_groups" in lg.metrics
    from svcca_torch.callbacks.logger_sinks import LoggerSink

    how = {type(s.logger).__name__: s.image_method for s in cb.views.sinks if isinstance(s, LoggerSink)}
    assert how == {"WandbLike": "log_image", "MLFlowLike": "experiment.log_image (MLflow)", "ScalarsOnly": None}
    assert (cb.run_dir / "to_previous.png").stat().st_size > 0


def test_settings_are_tracker_settings_and_0_2_keywords_still_work(tmp_path):
    _, probe = digits_loaders()
    with pytest.raises(TypeError, match="unknown setting"):
        SVCCACallback(probe, freez_training=True)
    from svcca_torch.settings import TrackerSettings

    settings = TrackerSettings(freeze="schedule", keep=0.9)
    cb = SVCCACallback(probe, settings=settings, every_n_train_steps=5, freeze_window=3)
    assert (cb.settings.freeze, cb.settings.keep, cb.settings.every_n_steps, cb.settings.freeze_window) == (
        "schedule", 0.9, 5, 3)
    old = SVCCACallback(probe, freeze_training=True, every_n_train_steps=4, max_overhead=None, run_dir=tmp_path)
    assert (old.freeze_training, old.every_n_train_steps, old.run_dir) == ("adaptive", 4, tmp_path)
    with pytest.raises(ValueError, match="freeze_threshold"):
        SVCCACallback(probe, freeze_threshold=2.0)
