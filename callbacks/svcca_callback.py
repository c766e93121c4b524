"""SVCCACallback: watch how each layer of a network learns, from a Lightning ``Trainer``.

A thin adapter: :class:`svcca_torch.tracker.DynamicsTracker` owns the run (captures, store,
freeze policy, final analysis), :class:`svcca_torch.views.TrainingViews` the logging (one
sink per logger, :mod:`svcca_torch.callbacks.logger_sinks`). This module adds what is
Lightning's: the hooks, logger discovery, rank zero and ``trainer.strategy`` collectives
(decisions on rank 0, broadcast; a tensor probe recorded in slices across ranks and
gathered) and the strategy checks freeze training needs.

Activations are ``(datapoints, neurons)`` (batch-first), ``(N, C, H, W)`` for conv layers
and ``(N, L, D)`` for token sequences (folded to datapoints by the recorder).
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from lightning_utilities.core.rank_zero import rank_zero_info  # the one both packages re-export

from svcca_torch.freeze import FreezePolicy, LayerGroup
from svcca_torch.recorder import ActivationRecorder, select_layers
from svcca_torch.recorder.inputs import _input_set
from svcca_torch.settings import TrackerSettings
from svcca_torch.tracker import DynamicsTracker, TrackerEvents, check_probe, probe_size
from svcca_torch.utils.validation import check_positive_int
from svcca_torch.views import PNGSink, TrainingViews
from svcca_torch.views.encoding import cache_note

from .logger_sinks import sinks_for
from .sharding import record_sharded

__all__ = ["SVCCACallback", "LIGHTNING_PACKAGES"]

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

#: The Lightning packages the callback works with: the standalone ``pytorch_lightning`` and the
#: unified ``lightning`` (imported as ``lightning.pytorch``). Each is a full copy of the same
#: code with classes of its own, so a ``Trainer`` of one accepts only callbacks, strategies and
#: loggers of its own package.
LIGHTNING_PACKAGES = ("pytorch_lightning", "lightning.pytorch")


def _importable() -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name in LIGHTNING_PACKAGES:
        try:
            out[name] = importlib.import_module(name)
        except ImportError:
            pass
    if not out:
        raise ImportError("svcca_torch.callbacks needs Lightning: pip install pytorch-lightning (or lightning).")
    return out


_PACKAGES = _importable()


def _classes(path: str) -> Tuple[type, ...]:
    """``path`` (e.g. ``"strategies.DDPStrategy"``) in every installed Lightning package."""
    out = []
    for pkg in _PACKAGES.values():
        obj: Any = pkg
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, type):
            out.append(obj)
    return tuple(out)


# a Callback of every installed package: Lightning checks ``isinstance(callback, Callback)``
# against its own package's class, which an instance of this class passes for both
_CALLBACK_BASES = _classes("callbacks.Callback")
_TENSORBOARD = _classes("loggers.TensorBoardLogger")
_DDP = _classes("strategies.DDPStrategy")
_SINGLE_DEVICE = _classes("strategies.SingleDeviceStrategy")
_DEFAULT_RUN_DIR = TrackerSettings().run_dir


class SVCCACallback(*_CALLBACK_BASES):  # type: ignore[misc]
    r"""Record layers on a fixed probe during training and log SVCCA learning dynamics.

    Captures the chosen layers on ``probe`` at the start, during training (by default the
    tracker's front-loaded schedule within ``max_overhead`` of the training time; every one
    with ``every_n_epochs`` / ``every_n_train_steps``) and at the end, into
    ``<run_dir>/store``; at the end compares every capture with the final state and writes
    ``learning_dynamics.png``, ``convergence.png`` (with freeze training ``to_previous.png``)
    and ``svcca_summary.json`` in ``run_dir`` (default ``<log_dir>/<name>``). See
    :class:`~svcca_torch.tracker.DynamicsTracker`.

    Every logger of the Trainer gets the views (:class:`~svcca_torch.views.TrainingViews`,
    tags under ``<name>/``): ``TensorBoardLogger`` the live images, the freeze step functions
    and events text, the end heatmaps, grid and curves, drawn for TensorBoard's default
    settings (docs/tensorboard.md); any other logger the scalars with full layer names
    (``<name>/to_previous/<layer>``, ``<name>/to_final/<layer>``, ``<name>/freeze/...``,
    ``<name>/freeze_signal/<group>``) and, where it has an image method (W&B, MLflow, Comet
    or any ``log_image(key, images, step)``), the same images.

    The probe must be the same data in the same order at every capture (a tensor, a
    DataLoader with ``shuffle=False``, a list of batches; a single-use generator is refused).

    Freeze training (``freeze_training=True``/``"adaptive"`` or ``"schedule"``) freezes layer
    groups bottom-up (:mod:`svcca_torch.freeze`); the adaptive window defaults to one epoch.
    Under DDP the model must be wrapped with ``find_unused_parameters=True`` and without
    ``static_graph``: use ``strategy="ddp_find_unused_parameters_true"`` (checked at the start
    of training; the callback no longer changes the strategy's settings). With a tensor probe
    every rank records a slice, rank 0 gathers the rows, writes and logs; decisions are made
    on rank 0 and broadcast. FSDP and DeepSpeed are not supported with freeze training.

    Resume: :meth:`state_dict` holds the tracker's state and the views' (``"board"``: images
    per tag, so none passes its 10); ``trainer.fit(ckpt_path=...)`` continues.

    Both Lightning packages (``pytorch_lightning``, ``lightning.pytorch``) work alike.

    Args:
        probe: fixed probe inputs: a tensor ``(N, ...)``, a tuple/dict of tensors (a forward
            of several inputs), or a DataLoader / list of batches of either.
        layers: layers to record (:func:`svcca_torch.recorder.select_layers`).
        settings: a :class:`~svcca_torch.settings.TrackerSettings` (keywords below override it).
        every_n_epochs: a capture at the end of every n-th epoch (every one taken).
        every_n_train_steps: a capture every n optimizer steps (the setting ``every_n_steps``).
        name: prefix of the log tags, the state key and the default run folder.
        freeze_training: the setting ``freeze`` (``False``, ``True``/``"adaptive"``, ``"schedule"``).
        **settings_kwargs: any other :class:`~svcca_torch.settings.TrackerSettings` field
            (``max_overhead``, ``run_dir``, ``keep``, ``freeze_window``, ``freeze_threshold``,
            ``frozen_cache``, ``final_heatmaps``, ``grid_fractions``, ...); an unknown name is a
            ``TypeError`` listing them.

    Example::

        svcca = SVCCACallback(probe=probe_set(train, 1024), freeze_training=True)
        trainer = pl.Trainer(max_epochs=20, callbacks=[svcca], logger=TensorBoardLogger("runs"))
    """

    def __init__(
        self,
        probe: Any,
        layers: Optional[Sequence[Any]] = None,
        *,
        settings: Optional[TrackerSettings] = None,
        every_n_epochs: Optional[int] = None,
        every_n_train_steps: Optional[int] = None,
        name: str = "svcca",
        freeze_training: Optional[Union[bool, str]] = None,
        **settings_kwargs: Any,
    ) -> None:
        super().__init__()
        if every_n_epochs is not None and every_n_train_steps is not None:
            raise ValueError(
                "Pass only one of `every_n_epochs` and `every_n_train_steps` (captures follow one schedule).")
        self.every_n_epochs = None if every_n_epochs is None else check_positive_int(every_n_epochs, "every_n_epochs")
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"`name` must be a non-empty string without '/', got {name!r}.")
        kw = dict(settings_kwargs)
        if layers is not None:
            kw["layers"] = layers
        if every_n_train_steps is not None:
            kw["every_n_steps"] = every_n_train_steps
        if freeze_training is not None:
            kw["freeze"] = freeze_training
        #: the run's settings (validated once; completed from the Trainer at the start of training)
        self.settings = TrackerSettings.build(settings, **kw)
        self.probe = check_probe(probe)
        self.name = name
        explicit = "run_dir" in kw or (settings is not None and settings.run_dir != _DEFAULT_RUN_DIR)
        self.run_dir: Optional[Path] = Path(self.settings.run_dir) if explicit else None
        self.tracker: Optional[DynamicsTracker] = None
        self.views: Optional[TrainingViews] = None
        self._restored: Optional[Dict[str, Any]] = None
        self._board_state: Optional[Dict[str, Any]] = None
        self._sharded = False
        self._checked: Any = None  # the module setup() checked
        self._last_step = -1

    # ------------------------------------------------------------------ read-only views of the run
    @property
    def freeze_training(self) -> Union[bool, str]:
        return self.settings.freeze

    @property
    def every_n_train_steps(self) -> Optional[int]:
        return self.settings.every_n_steps

    @property
    def layers(self) -> Optional[Sequence[Any]]:
        return self.settings.layers

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @property
    def captured_steps(self) -> List[int]:
        return self.tracker.captured_steps if self.tracker else []

    @property
    def to_previous(self) -> List[Dict[str, Any]]:
        return self.tracker.to_previous if self.tracker else []

    @property
    def freeze_log(self) -> List[Dict[str, Any]]:
        return self.tracker.freeze_log if self.tracker else []

    @property
    def groups(self) -> List[LayerGroup]:
        return self.tracker.groups if self.tracker else []

    @property
    def policy(self) -> Optional[FreezePolicy]:
        return self.tracker.policy if self.tracker else None

    @property
    def probe_checksum(self) -> Optional[str]:
        return self.tracker.probe_checksum if self.tracker else None

    @property
    def recorder(self) -> Optional[ActivationRecorder]:
        return self.tracker.recorder if self.tracker else None

    @property
    def sharded(self) -> bool:
        """Whether ranks record slices of the probe (DDP with a tensor probe, or a tuple/dict of input tensors)."""
        return self._sharded

    # ------------------------------------------------------------------ setup: fail before training
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        select_layers(pl_module, self.settings.layers)  # unknown layer names, listing those that exist
        n = probe_size(self.probe, pl_module)
        if n < 2:
            raise ValueError(
                f"`probe` holds {n} input(s): SVCCA compares layers across probe datapoints, so it needs at least "
                "2 inputs (a few hundred to a few thousand in practice, e.g. svcca_torch.data.probe_set(dataset, 1024)).")
        # a tensor probe, or one set of several inputs (a tuple/dict of tensors), is cut into slices
        self._sharded = trainer.world_size > 1 and (isinstance(self.probe, torch.Tensor)
                                                    or _input_set(self.probe, pl_module) is not None)
        if self.freeze_training:
            strategy = trainer.strategy
            if "DeepSpeed" in type(strategy).__name__ or not isinstance(strategy, _DDP + _SINGLE_DEVICE):
                raise ValueError(
                    f"freeze_training does not support the {type(strategy).__name__} strategy (parameters are "
                    "sharded, partitioned or flattened, so layer groups cannot be frozen in place); use a single "
                    "device or strategy='ddp_find_unused_parameters_true', or set freeze_training=False.")
        self._checked = pl_module

    def _check_ddp(self, trainer: "pl.Trainer") -> None:
        """Freeze training under DDP: the wrapped model must accept parameters without gradients."""
        model = getattr(trainer.strategy, "model", None)
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return
        if getattr(model, "static_graph", False):
            raise ValueError("freeze_training changes which parameters get gradients, so DDP's `static_graph=True` "
                             "cannot be used; drop static_graph and use strategy='ddp_find_unused_parameters_true'.")
        if not model.find_unused_parameters:
            raise ValueError("freeze_training needs DDP to accept parameters without gradients (frozen layers get "
                             "none), but the model was wrapped with find_unused_parameters=False; use "
                             "strategy='ddp_find_unused_parameters_true' (or DDPStrategy(find_unused_parameters=True)).")

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._checked is not pl_module:  # setup was not called with stage="fit"
            self.setup(trainer, pl_module, "fit")
        if self.freeze_training:
            self._check_ddp(trainer)
            if any(isinstance(opt, torch.optim.LBFGS) for opt in trainer.optimizers):
                raise ValueError(
                    "freeze_training does not support torch.optim.LBFGS (it updates parameters without a gradient "
                    "from its history); use SGD/Adam-style optimizers or freeze_training=False.")
        total = self._total_steps(trainer)
        if self.freeze_training == "schedule" and not math.isfinite(total) and self.settings.total_steps is None:
            raise ValueError("freeze_training='schedule' needs a known training length: set max_epochs or max_steps.")
        st = self.settings
        window = st.freeze_window or (self._steps_per_epoch(trainer) if st.freeze == "adaptive" else None)
        explicit = (f"every {self.every_n_epochs} epoch{'s' if self.every_n_epochs > 1 else ''}"
                    if self.every_n_epochs is not None else st.explicit_schedule)
        self.tracker = tracker = DynamicsTracker(
            pl_module, self.probe, is_writer=trainer.is_global_zero,
            settings=st.replace(total_steps=int(total) if math.isfinite(total) and total > 0 else st.total_steps,
                                freeze_window=window, run_dir=self._resolve_run_dir(trainer), figures=False,
                                explicit_schedule=explicit),
            broadcast=(lambda obj: trainer.strategy.broadcast(obj, src=0)) if trainer.world_size > 1 else None,
            sharded_record=(lambda rec, x: record_sharded(trainer, rec, x)) if self._sharded else None)
        if self._restored is not None:
            tracker.load_state_dict(self._restored)
            self._restored = None
        tracker.setup()
        if trainer.is_global_zero:  # the views (and the run folder's PNGs) are rank 0's
            sinks = sinks_for(list(trainer.loggers), _TENSORBOARD, type(self).__name__)
            sinks.append(PNGSink(tracker.run_dir, to_previous=bool(st.freeze)))
            self.views = TrainingViews.for_tracker(tracker, sinks, self.name)
            if self._board_state is not None:
                self.views.load_state_dict(self._board_state, resume_step=trainer.global_step)
                self._board_state = None
        events = tracker.start(trainer.global_step, trainer.current_epoch)
        self._last_step = trainer.global_step
        if tracker.archived is not None:
            rank_zero_info(f"{type(self).__name__}: resumed at step {trainer.global_step}; the captures the earlier "
                           f"run made after it were moved to {tracker.archived} (kept, not deleted).")
        if tracker.policy is not None and tracker.policy.frozen:
            rank_zero_info(f"{type(self).__name__}: resumed with frozen groups {', '.join(tracker.policy.frozen)}.")
        self._log(trainer, events)

    def _resolve_run_dir(self, trainer: "pl.Trainer") -> Path:
        if self.run_dir is None:
            base = trainer.log_dir or trainer.default_root_dir  # log_dir is broadcast from rank 0
            self.run_dir = Path(base) / self.name
        return self.run_dir

    @staticmethod
    def _total_steps(trainer: "pl.Trainer") -> float:
        try:
            return float(trainer.estimated_stepping_batches)
        except Exception:  # no known length
            return math.inf

    def _steps_per_epoch(self, trainer: "pl.Trainer") -> int:
        batches = trainer.num_training_batches
        if not math.isfinite(batches) or batches <= 0:
            raise ValueError(
                "freeze_training='adaptive' takes its window from the epoch length, which this training loader "
                "does not have; pass `freeze_window` (optimizer steps).")
        return max(1, int(batches) // max(1, trainer.accumulate_grad_batches))

    # ------------------------------------------------------------------ hooks
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: no optimizer step yet
            return
        self._last_step = step
        assert self.tracker is not None
        total = self.tracker.settings.total_steps
        events = self.tracker.maybe_capture(step, min(1.0, step / total) if total else None,
                                            epoch=trainer.current_epoch,
                                            request=False if self.every_n_epochs is not None else None)
        self._log(trainer, events)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            assert self.tracker is not None
            capture = self.tracker.capture_requested(trainer.global_step, trainer.current_epoch)
            self._log(trainer, TrackerEvents(trainer.global_step, capture=capture))

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        """Training stopped with an exception: release the store and restore the model's forwards
        (what was captured stays in ``run_dir``; no collective runs here, so DDP cannot hang)."""
        if self.tracker is not None:
            self.tracker.close()
        if self.views is not None:
            self.views.flush()

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        tracker = self.tracker
        assert tracker is not None
        analysis = tracker.finish(trainer.global_step, trainer.current_epoch)
        if trainer.is_global_zero and self.views is not None:
            self.views.log_final(analysis)
            me = type(self).__name__
            if tracker.frozen_cache_stats is not None:
                rank_zero_info(f"{me}: {cache_note(tracker.frozen_cache_stats)}")
            rank_zero_info(f"{me}: {tracker.schedule_report()}")
            if tracker.signal_report():  # the adaptive policy: what its signal cost, what the budget skipped
                rank_zero_info(f"{me}: {tracker.signal_report()}")
            statement = (analysis.summary.get("convergence") or {}).get("statement") if analysis is not None else None
            if statement:
                rank_zero_info(f"{me}: {statement}")
            self.views.close()
            rank_zero_info(f"{me}: figures and svcca_summary.json in {tracker.run_dir}")
        trainer.strategy.barrier("svcca_final_analysis")

    def _log(self, trainer: "pl.Trainer", events: TrackerEvents) -> None:
        """One step's events to the views (rank 0), and a line per freeze."""
        entry = events.freeze
        if entry is not None and self.tracker is not None:
            saved = entry["backward_flops_saved"]
            rank_zero_info(
                f"{type(self).__name__}: froze {', '.join(entry['groups'])} at step {entry['step']} "
                f"({entry['frozen_groups']} of {len(self.tracker.groups)} groups, {entry['frozen_parameters']:,} "
                "parameters" + (f", ~{100 * saved:.0f}% of backward FLOPs saved)" if saved is not None else ")"))
        if trainer.is_global_zero and self.views is not None:
            self.views.log(events)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        if self.tracker is None:
            return dict(self._restored or {}, **({"board": self._board_state} if self._board_state else {}))
        state = self.tracker.state_dict()
        state["run_dir"] = None if self.run_dir is None else str(self.run_dir)
        if self.views is not None:
            state["board"] = self.views.state_dict()  # the key 0.2 used (BoardLogger's state)
        elif self._board_state is not None:
            state["board"] = self._board_state
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # applied in on_train_start, once the model, the run folder and the policy exist
        self._restored = {k: v for k, v in state_dict.items() if k != "board"}
        self._board_state = state_dict.get("board")
        if self.run_dir is None and state_dict.get("run_dir"):
            self.run_dir = Path(state_dict["run_dir"])
