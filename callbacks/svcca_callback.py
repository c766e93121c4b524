"""SVCCACallback: watch how each layer of a network learns, from a Lightning ``Trainer``.

A thin adapter over :class:`svcca_torch.tracker.DynamicsTracker`, which owns the capture
schedule, the store, the freeze policy and the final analysis. This module adds what is
Lightning's: the hooks, the loggers (all writing in the ``_log_*`` methods), rank zero and
``trainer.strategy`` collectives (decisions on rank 0, broadcast; a tensor probe recorded
in slices across ranks and gathered), and the DDP settings freeze training needs.

Activations are ``(datapoints, neurons)`` (batch-first), or ``(N, C, H, W)`` for conv
layers (folded to common datapoints by the recorder).
"""
from __future__ import annotations

import importlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from lightning_utilities.core.rank_zero import rank_zero_info  # the one both packages re-export

from svcca_torch.board import BoardLogger
from svcca_torch.freeze import DEFAULT_THRESHOLD, FreezePolicy, LayerGroup
from svcca_torch.recorder import ActivationRecorder, Inputs, _input_set
from svcca_torch.freeze import policy_names
from svcca_torch.tracker import DynamicsTracker, FinalAnalysis, TrackerEvents, check_probe
from svcca_torch.utils.validation import check_keep, check_positive_int

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
    """``path`` (e.g. ``"strategies.DDPStrategy"``) in every installed Lightning package: the
    tuple ``isinstance`` takes, so a check holds for a ``Trainer`` of either package."""
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


class SVCCACallback(*_CALLBACK_BASES):  # type: ignore[misc]
    r"""Record layers on a fixed probe set during training and log SVCCA learning dynamics.

    Captures the chosen layers on ``probe`` before training (0%), during training, and at
    the end, into a :class:`~svcca_torch.store.RepresentationStore` in ``<run_dir>/store``.
    With ``every_n_epochs`` / ``every_n_train_steps`` every one of those captures is taken
    (an explicit schedule is honoured; the end-of-run message says what it cost). By default
    the callback schedules them itself within ``max_overhead`` (5%) of the training time:
    front-loaded points at 1% to 90% of training, log-spaced (half of them in the first 10%,
    where representations change most; see
    :meth:`DynamicsTracker.maybe_capture <svcca_torch.tracker.DynamicsTracker.maybe_capture>`),
    each taken when the run's projected budget affords it, and captures spaced by the budget
    of the training time so far in between. The end-of-run message and ``svcca_summary.json``
    (``"schedule"``) say how many captures the budget skipped or spaced, and why. At the end
    of training it compares every
    capture with the final state (on ``analysis_device``, default the model's device; full
    layers x layers matrices only for the captures shown, see
    :meth:`DynamicsTracker._analyse <svcca_torch.tracker.DynamicsTracker._analyse>`).

    With a ``TensorBoardLogger`` everything goes through :class:`svcca_torch.board.BoardLogger`,
    every tag under ``<name>/``, drawn to read right at TensorBoard's default settings: during
    training the live images ``<name>/live/...`` (the per-layer curves are images: as scalars
    TensorBoard's default smoothing and outlier cut would misdraw them); with freeze training
    ``<name>/freeze/...`` from step 0 at every capture, freeze window and 0.5% of training,
    and the freeze events (with the signal that froze each group) as text; at the end at most
    10 chosen heatmaps ``<name>/dynamics/to_final_matrix``, a 2x2 grid of them and the
    convergence curves (see the README, "What you see in TensorBoard"). Other loggers (e.g. ``CSVLogger``) get the same
    scalars with full layer names (``<name>/to_previous/<layer>``, ``<name>/to_final/<layer>``,
    ``<name>/freeze/...``). With any logger, or none, it writes ``learning_dynamics.png``,
    ``convergence.png`` (and, with freeze training, ``to_previous.png``) and
    ``svcca_summary.json`` in ``run_dir``.

    The probe must be the same data in the same order at every capture: a tensor, a
    DataLoader with ``shuffle=False`` and no random augmentation (e.g. from
    :func:`svcca_torch.data.probe_set`) or a list of batches; a single-use generator is
    refused. Every batch is hashed as it is recorded and checked at every capture and on
    resume.

    Freeze training (``freeze_training=True`` or ``"adaptive"``, or ``"schedule"``) freezes
    layer groups bottom-up (see :mod:`svcca_torch.freeze`). Adaptive: every
    ``freeze_window`` optimizer steps (default one epoch) the lowest two still-trained
    groups are recorded (only their layers, on enough probe images for 10 datapoints per
    neuron) and compared with the same recording one window earlier; the lowest group
    freezes once that similarity has been ``>= freeze_threshold`` at ``freeze_patience``
    consecutive windows (the two groups above are recorded too when it is one window from
    freezing, so that they are judged right after). The signal is a property of training (steps), independent of how
    often heatmaps are captured. Each layer is judged against its chance level (its signal
    against an independently initialised copy of the model, measured once at the start): on
    ``(s - chance) / (1 - chance)``, and a layer whose signal reads ~1 whatever its weights (a
    first conv layer) goes with the group above it (see
    :class:`~svcca_torch.freeze.AdaptiveFreezePolicy`). The signal's recordings count against
    ``max_overhead`` (half of it at most; windows that do not fit are recorded with fewer groups
    or skipped, and the end-of-run message and ``svcca_summary.json`` say which). Schedule: group ``i`` freezes at a fraction of training
    growing linearly with depth. Frozen parameters get ``requires_grad=False`` and
    ``grad=None`` and their BatchNorm layers stay in eval mode, so they stay bit-identical.
    With ``frozen_cache=True`` the frozen prefix's output is kept per training input, so an
    epoch over data seen before skips the frozen forward as well as its backward. Logged:
    ``<name>/freeze/frozen_groups`` and ``<name>/freeze/backward_flops_saved`` (and, for
    loggers other than TensorBoard, ``<name>/freeze/frozen_parameters`` and
    ``<name>/freeze_signal/<group>``).

    Both Lightning packages: ``import pytorch_lightning as pl`` and ``import lightning.pytorch
    as L`` work alike. The callback is a ``Callback`` of each installed package (it subclasses
    both), and its checks of the strategy (single device, DDP) and of the loggers
    (``TensorBoardLogger`` or any other) accept either package's classes
    (:data:`LIGHTNING_PACKAGES`).

    Distributed (Lightning's DDP strategies): with a tensor probe (or a tuple/dict of input
    tensors, sliced alike) every rank records a slice of it and rank 0 gathers the rows (``trainer.strategy.all_gather``); a DataLoader probe is
    recorded by rank 0 alone. Rank 0 writes the store and logs; every capture and freeze
    decision is made on rank 0 and broadcast with ``trainer.strategy.broadcast``. With
    freeze training under plain ``strategy="ddp"`` the callback sets
    ``find_unused_parameters=True`` before the model is wrapped; FSDP and DeepSpeed are not
    supported.

    Resume: :meth:`state_dict` holds the capture history, probe digests, the policy, the
    frozen groups and the TensorBoard images written (so no tag passes its 10);
    ``trainer.fit(ckpt_path=...)`` re-freezes the same groups, reopens the store (archiving
    captures a lost run made after the checkpoint) and continues.
    ``name`` keys the state (``state_key``), the log tags and the default run folder.

    Example::

        from svcca_torch.callbacks import SVCCACallback
        from svcca_torch.data import load_digits_dataset, probe_set

        train, _ = load_digits_dataset()
        svcca = SVCCACallback(probe=probe_set(train, 1024), freeze_training=True)
        trainer = pl.Trainer(max_epochs=20, callbacks=[svcca], logger=TensorBoardLogger("runs"))
        trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True))

    Args:
        probe: fixed probe inputs: a tensor ``(N, ...)``; for a model whose forward takes
            several inputs (``forward(ids, mask)``), a tuple of tensors (positional) or a dict
            of tensors (keywords) with the same first dimension; or a DataLoader or a list of
            batches of either.
        layers: layers to record (see :func:`svcca_torch.recorder.select_layers`).
        every_n_epochs: a capture at the end of every n-th epoch (every one taken).
        every_n_train_steps: a capture every n optimizer steps instead (every one taken).
        max_overhead: the default schedule's time budget as a fraction of training time
            (0.05); ``None``: every front-loaded point is taken. An explicit schedule above
            is not thinned by it.
        run_dir: folder for the store, figures and JSON (default ``<log_dir>/<name>``).
        name: prefix of the log tags and of the state key.
        keep, max_directions: SVD truncation of the stored representations.
        grid, max_datapoints, batch_size: recorder settings.
        freeze_training: ``False``, ``True``/``"adaptive"`` or ``"schedule"``.
        freeze_groups: explicit layer groups, bottom-up.
        freeze_window: the adaptive signal's window in optimizer steps (default one epoch).
        freeze_threshold, freeze_patience: the adaptive policy's settings.
        max_frozen_fraction: the most groups frozen, as a fraction of all groups.
        schedule_start, schedule_end: the schedule policy's first and last freezing points.
        frozen_cache: opt in to keeping the frozen prefix's output per training input, so that
            batches seen before skip the frozen forward (exact or off, see the contract in docs/freeze_training.md;
            off by itself when inputs never repeat, as under random augmentation): ``True`` (up
            to 1 GiB host memory), bytes, or ``False`` (the default).
        final_analysis: compute and log the learning-dynamics matrices and figures at the end.
        final_heatmaps: captures with a full layers x layers heatmap at the end (step 0, the
            end, the others where the to-final curves change most). Each costs about one
            naive per-capture analysis; every capture gets its to-final curves.
        grid_fractions: the grid image's panels: ``None`` (default) 4 of those heatmaps where
            the curves change; the paper's ``(0, 0.35, 0.75, 1)``: the capture nearest each.
        progress: show a progress bar during the end-of-training analysis.
        analysis_device: where the end-of-training analysis runs (default: the model's device).
    """

    def __init__(
        self,
        probe: Any,
        layers: Optional[Sequence[Any]] = None,
        *,
        every_n_epochs: Optional[int] = None,
        every_n_train_steps: Optional[int] = None,
        max_overhead: Optional[float] = 0.05,
        run_dir: Optional[Union[str, os.PathLike]] = None,
        name: str = "svcca",
        keep: Union[int, float] = 0.99,
        max_directions: Optional[int] = None,
        grid: int = 2,
        max_datapoints: Optional[int] = None,
        batch_size: int = 256,
        freeze_training: Union[bool, str] = False,
        freeze_groups: Optional[Union[Mapping[str, Sequence[str]], Sequence[Sequence[str]]]] = None,
        freeze_window: Optional[int] = None,
        freeze_threshold: float = DEFAULT_THRESHOLD,
        freeze_patience: int = 1,
        max_frozen_fraction: float = 0.75,
        schedule_start: float = 0.25,
        schedule_end: float = 0.75,
        frozen_cache: Union[bool, int] = False,
        final_analysis: bool = True,
        final_heatmaps: int = 6,
        grid_fractions: Optional[Sequence[float]] = None,
        progress: bool = True,
        analysis_device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        super().__init__()
        if every_n_epochs is not None and every_n_train_steps is not None:
            raise ValueError(
                "Pass only one of `every_n_epochs` and `every_n_train_steps` (captures follow one schedule)."
            )
        self.every_n_epochs = None if every_n_epochs is None else check_positive_int(every_n_epochs, "every_n_epochs")
        self.every_n_train_steps = (None if every_n_train_steps is None
                                    else check_positive_int(every_n_train_steps, "every_n_train_steps"))
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"`name` must be a non-empty string without '/', got {name!r}.")
        if freeze_training is True:
            freeze_training = "adaptive"
        if freeze_training is not False and freeze_training not in policy_names():
            raise ValueError(
                f"`freeze_training` must be False, True (= 'adaptive'), 'adaptive' or 'schedule'; got {freeze_training!r}."
            )
        self.probe = check_probe(probe)
        self.layers = layers
        self.run_dir: Optional[Path] = Path(run_dir) if run_dir is not None else None
        self.name = name
        self.freeze_training: Union[bool, str] = freeze_training
        self.freeze_window = None if freeze_window is None else check_positive_int(freeze_window, "freeze_window")
        # everything else is validated by the tracker's constructor, here already (fail before fit)
        self._tracker_kwargs: Dict[str, Any] = dict(
            layers=layers, keep=check_keep(keep), max_directions=max_directions, grid=grid,
            max_datapoints=max_datapoints, batch_size=batch_size, max_overhead=max_overhead,
            freeze=freeze_training, freeze_groups=freeze_groups, freeze_threshold=freeze_threshold,
            freeze_patience=freeze_patience, max_frozen_fraction=max_frozen_fraction,
            schedule_start=schedule_start, schedule_end=schedule_end, frozen_cache=frozen_cache,
            final_analysis=final_analysis,
            final_heatmaps=final_heatmaps, grid_fractions=grid_fractions, progress=progress,
            analysis_device=analysis_device)
        DynamicsTracker(torch.nn.Identity(), self.probe, **{**self._tracker_kwargs, "layers": None})
        self.tracker: Optional[DynamicsTracker] = None
        self._restored: Optional[Dict[str, Any]] = None
        self._board_state: Optional[Dict[str, Any]] = None
        self._boards: List[BoardLogger] = []
        self._last_step = -1

    # ------------------------------------------------------------------ the tracker's state, for users and tests
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
        return bool(self.tracker and self.tracker._sharded_record is not None)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        # a tensor probe, or one set of several inputs (a tuple/dict of tensors), is cut into slices
        sharded = trainer.world_size > 1 and (isinstance(self.probe, torch.Tensor)
                                              or _input_set(self.probe, pl_module) is not None)
        self.tracker = DynamicsTracker(
            pl_module, self.probe, run_dir=self.run_dir or "svcca_run", is_writer=trainer.is_global_zero,
            broadcast=(lambda obj: trainer.strategy.broadcast(obj, src=0)) if trainer.world_size > 1 else None,
            sharded_record=(lambda rec, x: self._record_sharded(trainer, rec, x)) if sharded else None,
            **self._tracker_kwargs)
        # unknown layer names and a too small probe fail here, before training
        self.tracker.setup()
        if self.freeze_training:
            self._check_strategy(trainer)

    def _check_strategy(self, trainer: "pl.Trainer") -> None:
        strategy = trainer.strategy
        if "DeepSpeed" in type(strategy).__name__:  # a DDPStrategy subclass, but parameters are partitioned
            raise ValueError(
                f"freeze_training does not support the {type(strategy).__name__} strategy (parameters are "
                "partitioned, so layer groups cannot be frozen in place); use strategy='ddp' or "
                "freeze_training=False."
            )
        if isinstance(strategy, _DDP):
            kwargs = getattr(strategy, "_ddp_kwargs", None)
            if kwargs is None:
                raise ValueError(
                    f"freeze_training under {type(strategy).__name__}: cannot arrange find_unused_parameters; "
                    "use strategy='ddp_find_unused_parameters_true'."
                )
            if kwargs.get("static_graph"):
                raise ValueError(
                    "freeze_training changes which parameters get gradients, so DDP's `static_graph=True` "
                    "cannot be used; drop static_graph from DDPStrategy."
                )
            if kwargs.get("find_unused_parameters") is False and "find_unused_parameters" in kwargs:
                raise ValueError(
                    "freeze_training needs DDP to accept parameters without gradients, but the strategy sets "
                    "find_unused_parameters=False; use strategy='ddp' (the callback then enables it) or "
                    "strategy='ddp_find_unused_parameters_true'."
                )
            if not kwargs.get("find_unused_parameters"):
                # must happen before strategy.setup wraps the model (setup hooks run first)
                kwargs["find_unused_parameters"] = True
                rank_zero_info(
                    f"{type(self).__name__}: freeze training enabled DDP find_unused_parameters=True "
                    "(frozen layers receive no gradient)."
                )
        elif not isinstance(strategy, _SINGLE_DEVICE):
            raise ValueError(
                f"freeze_training does not support the {type(strategy).__name__} strategy (parameters are "
                "sharded or flattened, so layer groups cannot be frozen in place); use a single device or "
                "strategy='ddp', or set freeze_training=False."
            )

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.tracker is None:  # setup was not called with stage="fit"
            self.setup(trainer, pl_module, "fit")
        tracker = self.tracker
        assert tracker is not None
        if self.freeze_training:
            for opt in trainer.optimizers:
                if isinstance(opt, torch.optim.LBFGS):
                    raise ValueError(
                        "freeze_training does not support torch.optim.LBFGS (it updates parameters without a "
                        "gradient from its history); use SGD/Adam-style optimizers or freeze_training=False."
                    )
        total = self._total_steps(trainer)
        if self.freeze_training == "schedule" and not math.isfinite(total):
            raise ValueError("freeze_training='schedule' needs a known training length: set max_epochs or max_steps.")
        tracker.total_steps = int(total) if math.isfinite(total) and total > 0 else None
        if self.freeze_training == "adaptive":
            tracker.freeze_window = self.freeze_window or self._steps_per_epoch(trainer)
        tracker.run_dir = self._resolve_run_dir(trainer)
        if self.every_n_epochs is not None:
            tracker.explicit_schedule = f"every {self.every_n_epochs} epoch{'s' if self.every_n_epochs > 1 else ''}"
        elif self.every_n_train_steps is not None:
            tracker.explicit_schedule = f"every {self.every_n_train_steps} steps"
        if self._restored is not None:
            tracker.load_state_dict(self._restored)
            self._restored = None
        previous = tracker.last_capture
        events = tracker.start(trainer.global_step, trainer.current_epoch)
        self._last_step = trainer.global_step
        if tracker.archived is not None:
            rank_zero_info(
                f"{type(self).__name__}: resumed at step {trainer.global_step}; the captures the earlier run made "
                f"after it were moved to {tracker.archived} (kept, not deleted).")
        if tracker.policy is not None and tracker.policy.frozen:
            rank_zero_info(f"{type(self).__name__}: resumed with frozen groups {', '.join(tracker.policy.frozen)}.")
        if trainer.is_global_zero:
            self._start_board(trainer)
        # with TensorBoard the first board writes the run folder's PNGs from the images it logs
        tracker.figures = not self._boards
        self._log_events(trainer, events, previous)

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
                "does not have; pass `freeze_window` (optimizer steps)."
            )
        return max(1, int(batches) // max(1, trainer.accumulate_grad_batches))

    # ------------------------------------------------------------------ hooks
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: no optimizer step yet
            return
        self._last_step = step
        assert self.tracker is not None
        if self.every_n_train_steps is not None:
            request: Optional[bool] = step % self.every_n_train_steps == 0
        else:
            request = False if self.every_n_epochs is not None else None
        total = self.tracker.total_steps
        previous = self.tracker.last_capture  # the last capture's bases, for the live heatmap
        events = self.tracker.maybe_capture(step, min(1.0, step / total) if total else None,
                                            epoch=trainer.current_epoch, request=request)
        self._log_events(trainer, events, previous)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            assert self.tracker is not None
            previous = self.tracker.last_capture
            capture = self.tracker.capture_requested(trainer.global_step, trainer.current_epoch)
            self._log_events(trainer, TrackerEvents(trainer.global_step, capture=capture), previous)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        """Training stopped with an exception: release the store and restore the model's forwards
        (what was captured stays in ``run_dir``; no collective runs here, so DDP cannot hang)."""
        if self.tracker is not None:
            self.tracker.close()

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        tracker = self.tracker
        assert tracker is not None
        step = trainer.global_step
        before = list(tracker.captured_steps)
        previous = tracker.last_capture
        analysis = tracker.finish(step, trainer.current_epoch)
        if trainer.is_global_zero:
            last = tracker.to_previous[-1] if tracker.to_previous else None
            sims = {k: v for k, v in last.items() if k != "step"} if last and last["step"] == step else {}
            if tracker.captured_steps != before:  # the end-of-training capture
                self._log_events(trainer, TrackerEvents(step, capture={"step": step, "to_previous": sims}), previous,
                                 final=True)
            elif self._boards and sims and self._final_live_images() and tracker.store is not None:
                # the last capture was logged already: only its final live images are new
                done = [c for c in tracker.store.checkpoints if c.step < step]
                earlier = tracker.store.load_checkpoint(done[-1]) if done else None
                for board in self._boards:
                    board.log_capture(step, sims, previous=earlier, current=tracker.last_capture, final=True)
            self._log_final(trainer, analysis)
            cache = tracker.frozen_cache_stats
            if cache is not None:
                note = (f"frozen-output cache: the frozen forward was skipped for {cache['served']:,} of "
                        f"{cache['lookups']:,} samples after the first freeze"
                        + (f"; turned off: {cache['off']}." if cache["off"] else
                           f" ({cache['bytes'] / 2 ** 20:.1f} MiB kept)."))
                rank_zero_info(f"{type(self).__name__}: {note}")
                with tracker.accounted():
                    for board in self._boards:
                        board.log_freeze_note(step, note)
            rank_zero_info(f"{type(self).__name__}: {tracker.schedule_report()}")
            if tracker.signal_report():  # the adaptive policy: what its signal cost, what the budget skipped
                rank_zero_info(f"{type(self).__name__}: {tracker.signal_report()}")
            analysed = (analysis.summary.get("convergence") or {}).get("statement") if analysis is not None else None
            if analysed:
                rank_zero_info(f"{type(self).__name__}: {analysed}")
            for board in self._boards:
                board.close()
            rank_zero_info(f"{type(self).__name__}: figures and svcca_summary.json in {self.tracker.run_dir}")
        trainer.strategy.barrier("svcca_final_analysis")

    # ------------------------------------------------------------------ DDP recording
    def _record_sharded(self, trainer: "pl.Trainer", rec: ActivationRecorder,
                        probe: Union[torch.Tensor, Inputs]) -> Optional[Dict[str, torch.Tensor]]:
        """Every rank records a contiguous slice of the probe inputs (every input of a model of
        several sliced alike, ``probe`` an :class:`~svcca_torch.recorder.Inputs`); the rows are
        gathered with ``trainer.strategy.all_gather`` (all ranks) and assembled on rank 0 in
        probe order. Rows are input-major, so the concatenation equals a single-process
        recording without ``max_datapoints`` (each rank's row count is gathered first: token
        layers keep as many rows per input as it has real tokens); ``rec.max_datapoints`` is
        then applied as the recorder applies it (a fixed-seed subsample of all the rows)."""
        from svcca_torch.functional.conv import conv_datapoint_indices

        shard = ActivationRecorder(rec.model, rec.layers, grid=rec.grid, resize=rec.resize, max_datapoints=None,
                                   batch_size=rec.batch_size, device=rec.device, max_tokens=rec.max_tokens,
                                   layouts=dict(rec.layouts), padding_mask=rec.padding_mask)
        inputs = probe if isinstance(probe, Inputs) else Inputs((probe,))
        n, world, rank = inputs.rows, trainer.world_size, trainer.global_rank
        chunk = -(-n // world)
        counts = [max(0, min(n, (r + 1) * chunk) - r * chunk) for r in range(world)]
        lo = rank * chunk
        # a rank with no slice still runs one input, so every rank joins the same collectives
        part = inputs.slice(lo, lo + counts[rank]) if counts[rank] else inputs.slice(0, 1)
        acts = shard.record(part if isinstance(probe, Inputs) else part.args[0])
        device = next((t.device for t in rec.model.parameters()), torch.device("cpu"))
        mine = next(iter(acts.values())).shape[0] if counts[rank] else 0  # common rows: alike in every layer
        rows = trainer.strategy.all_gather(torch.tensor([mine], device=device)).reshape(-1).tolist()
        most = max(1, max(int(r) for r in rows))
        out: Dict[str, torch.Tensor] = {}
        for name, t in acts.items():
            padded = torch.zeros(most, t.shape[1], dtype=t.dtype)
            padded[:mine] = t[:mine]
            parts = trainer.strategy.all_gather(padded.to(device))
            if trainer.is_global_zero:
                out[name] = torch.cat([parts[r, : int(rows[r])].cpu() for r in range(world)])
        if not trainer.is_global_zero:
            return None
        total = int(sum(rows))
        kept = conv_datapoint_indices(total, (1, 1), max_datapoints=rec.max_datapoints, seed=rec.seed)
        return {k: v[kept] for k, v in out.items()} if kept is not None else out

    # ------------------------------------------------------------------ logging (rank 0 writes)
    def _start_board(self, trainer: "pl.Trainer") -> None:
        """One BoardLogger per TensorBoardLogger (rank 0), restored from the saved state on resume."""
        assert self.tracker is not None and self.tracker.recorder is not None
        self._boards = [BoardLogger(w, self.name, self.tracker.recorder.layers, total_steps=self.tracker.total_steps,
                                    fractions=self.tracker.grid_fractions)
                        for w in self._tensorboards(trainer)]
        if self._board_state is not None:
            for board in self._boards:
                board.load_state_dict(self._board_state, resume_step=trainer.global_step)
            self._board_state = None

    def _log_events(self, trainer: "pl.Trainer", events: TrackerEvents, previous: Any = None,
                    final: bool = False) -> None:
        if not trainer.is_global_zero:
            return
        assert self.tracker is not None
        with self.tracker.accounted():  # logging is the callback's cost: inside max_overhead
            self._log_event_parts(trainer, events, previous, final)

    def _log_event_parts(self, trainer: "pl.Trainer", events: TrackerEvents, previous: Any, final: bool) -> None:
        # the signal and a freeze of this step first: the capture recorded the network frozen
        # (so its images name the freeze)
        if events.signal is not None:
            self._log_signal(trainer, events.signal)
        if events.freeze is not None:
            self._log_freeze(trainer, events.freeze)
        if events.capture is not None:
            self._log_capture(trainer, events.capture, previous, final=final)
        if events.freeze is None and self.freeze_training and (
                events.capture is not None or events.signal is not None or self._freeze_window_ends(events.step)):
            # a step function logged at every capture and freeze window, not only where it
            # changes: TensorBoard's default smoothing (0.6) then follows it closely
            self._log_freeze_state(trainer, events.step)

    def _freeze_window_ends(self, step: int) -> bool:
        """Whether the freeze state is logged at ``step`` besides captures and freezes: at the
        end of every freeze window (adaptive) and every 0.5% of training (every 50 steps when
        its length is unknown), so that a step function has points enough for TensorBoard's
        smoothing (an average over points) to follow it within about 1.5% of training."""
        assert self.tracker is not None
        total = self.tracker.total_steps
        every = [max(1, total // 200) if total else 50]
        if self.freeze_training == "adaptive" and self.tracker.freeze_window:
            every.append(self.tracker.freeze_window)
        return step > 0 and any(step % k == 0 for k in every)

    def _log_metrics(self, trainer: "pl.Trainer", metrics: Dict[str, float], step: int) -> None:
        # straight to the loggers other than TensorBoard (like LearningRateMonitor, so it works
        # from any hook); TensorBoard gets the BoardLogger's depth-sorted tags instead
        if not metrics:
            return
        for lg in trainer.loggers:
            if not isinstance(lg, _TENSORBOARD):
                lg.log_metrics(metrics, step=step)

    def _tensorboards(self, trainer: "pl.Trainer") -> List[Any]:
        return [lg.experiment for lg in trainer.loggers if isinstance(lg, _TENSORBOARD)]

    def _log_capture(self, trainer: "pl.Trainer", capture: Dict[str, Any], previous: Any = None,
                     final: bool = False) -> None:
        """One capture: each layer's similarity to the previous capture; in TensorBoard also
        the live images when due (from ``previous`` and the tracker's current bases)."""
        assert self.tracker is not None
        step, sims = capture["step"], capture["to_previous"]
        self._log_metrics(trainer, {f"{self.name}/to_previous/{k}": float(v) for k, v in sims.items()}, step)
        images = not final or self._final_live_images()
        for board in self._boards:
            # the current bases are the tracker's last capture (references, nothing copied)
            board.log_capture(step, sims, previous=previous, current=self.tracker.last_capture, final=final,
                              images=images)

    def _final_live_images(self) -> bool:
        """Whether the end-of-training capture gets live images: not when it is the only
        capture compared with a previous one (captured at the start and the end only) and the
        final analysis runs, whose first to-final heatmap and curve points show that comparison."""
        assert self.tracker is not None
        return len(self.tracker.to_previous) > 1 or not self.tracker.final_analysis

    def _log_signal(self, trainer: "pl.Trainer", signal: Dict[str, Any]) -> None:
        """The adaptive freeze signal: each judged group's similarity to one window earlier
        (scalars for the loggers other than TensorBoard, where each group is judged at a few
        windows only: one-point charts; TensorBoard gets it in the freeze-events text)."""
        sims = signal["similarity"]
        self._log_metrics(trainer, {f"{self.name}/freeze_signal/{g}": float(v) for g, v in sims.items()},
                          signal["step"])

    def _freeze_metrics(self, entry: Dict[str, Any]) -> Dict[str, float]:
        metrics = {f"{self.name}/freeze/frozen_groups": float(entry["frozen_groups"]),
                   f"{self.name}/freeze/frozen_parameters": float(entry["frozen_parameters"])}
        if entry["backward_flops_saved"] is not None:
            metrics[f"{self.name}/freeze/backward_flops_saved"] = float(entry["backward_flops_saved"])
        return metrics

    def _log_freeze_state(self, trainer: "pl.Trainer", step: int, newly: Sequence[str] = (), note: str = "") -> None:
        """The freeze state at ``step`` (every capture from step 0, and every freeze)."""
        assert self.tracker is not None
        last = self.tracker.freeze_log[-1] if self.tracker.freeze_log else None
        state = {"frozen_groups": last["frozen_groups"] if last else 0,
                 "frozen_parameters": last["frozen_parameters"] if last else 0,
                 "backward_flops_saved": (last["backward_flops_saved"] if last else 0.0)}
        self._log_metrics(trainer, self._freeze_metrics(state), step)
        layers = [n for g in newly for n in self.tracker.group_layers.get(g, [])]
        for board in self._boards:
            board.log_freeze(step, state["frozen_groups"], backward_flops_saved=state["backward_flops_saved"],
                             frozen_parameters=state["frozen_parameters"], newly_frozen=list(newly),
                             n_groups=len(self.tracker.groups), frozen_layers=layers, note=note)

    def _log_freeze(self, trainer: "pl.Trainer", entry: Dict[str, Any]) -> None:
        """Groups frozen at one step."""
        assert self.tracker is not None
        step, saved = entry["step"], entry["backward_flops_saved"]
        rank_zero_info(
            f"{type(self).__name__}: froze {', '.join(entry['groups'])} at step {step} ({entry['frozen_groups']} of "
            f"{len(self.tracker.groups)} groups, {entry['frozen_parameters']:,} parameters"
            + (f", ~{100 * saved:.0f}% of backward FLOPs saved)" if saved is not None else ")"))
        self._log_freeze_state(trainer, step, entry["groups"], note=self._freeze_reason(entry))

    def _freeze_reason(self, entry: Dict[str, Any]) -> str:
        """Why the adaptive policy froze ``entry``'s groups: their signal at that step."""
        assert self.tracker is not None
        policy, log = self.tracker.policy, self.tracker.signal_log
        sig = log[-1] if log and log[-1]["step"] == entry["step"] else {}
        vals = [f"{g} {float(sig[g]):.3f}" for g in entry["groups"] if g in sig]
        if not vals or policy is None or not hasattr(policy, "threshold"):
            return ""
        return f"similarity to one window earlier {', '.join(vals)} >= {policy.threshold:g}"

    def _log_final(self, trainer: "pl.Trainer", analysis: Optional[FinalAnalysis]) -> None:
        """The end-of-training views: to-final scalars; in TensorBoard the chosen heatmaps,
        the paper's grid and the convergence curves (``BoardLogger.log_final``)."""
        if analysis is None:
            return
        assert self.tracker is not None
        with self.tracker.accounted():
            self._log_final_views(trainer, analysis)

    def _log_final_views(self, trainer: "pl.Trainer", analysis: FinalAnalysis) -> None:
        dyn = analysis.dynamics
        to_final = dyn.to_final()
        for c, step in enumerate(dyn.steps):
            self._log_metrics(trainer, {f"{self.name}/to_final/{n}": float(v) for n, v in zip(dyn.layers, to_final[c])
                                        if not math.isnan(float(v))}, step)
        assert self.tracker is not None
        for i, board in enumerate(self._boards):
            # the first board also writes the run folder's PNGs (the tracker left them to it)
            board.log_final(dyn, save_dir=self.tracker.run_dir if i == 0 and not self.tracker.figures else None)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        if self.tracker is None:
            return dict(self._restored or {})
        state = self.tracker.state_dict()
        state["run_dir"] = None if self.run_dir is None else str(self.run_dir)
        if self._boards:
            state["board"] = self._boards[0].state_dict()
        elif self._board_state is not None:
            state["board"] = self._board_state
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # applied in on_train_start, once the model, the run folder and the policy exist
        self._restored = {k: v for k, v in state_dict.items() if k != "board"}
        self._board_state = state_dict.get("board")
        if self.run_dir is None and state_dict.get("run_dir"):
            self.run_dir = Path(state_dict["run_dir"])
