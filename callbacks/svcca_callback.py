"""SVCCACallback: watch how each layer of a network learns, from a Lightning ``Trainer``.

A thin layer over the plain-PyTorch engine of :mod:`svcca_torch`: it records chosen layers
on a fixed probe set (:class:`~svcca_torch.ActivationRecorder`), keeps their SVD-reduced
representations on disk (:class:`~svcca_torch.store.RepresentationStore`), logs each
layer's SVCCA similarity to its previous capture while training runs, and at the end the
paper's learning-dynamics matrices and figures (:mod:`svcca_torch.dynamics`,
:mod:`svcca_torch.plotting`). Optionally it freezes converged layer groups bottom-up
(:mod:`svcca_torch.freeze`).

Activations are ``(datapoints, neurons)`` (batch-first), or ``(N, C, H, W)`` for conv
layers (folded to common datapoints by the recorder).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch

import pytorch_lightning as pl
from pytorch_lightning.callbacks.callback import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from svcca_torch.dynamics import (
    LearningDynamics,
    learning_dynamics,
    paired_similarity,
    similarity_to_previous,
)
from svcca_torch.freeze import (
    FreezePolicy,
    LayerGroup,
    backward_flops,
    default_layer_groups,
    explicit_layer_groups,
    freeze_group,
    is_frozen,
    make_freeze_policy,
)
from svcca_torch.functional.svcca import ReducedBasis, svd_reduce
from svcca_torch.plotting import DEFAULT_FRACTIONS, plot_convergence, plot_learning_dynamics
from svcca_torch.recorder import ActivationRecorder, batch_inputs, to_model
from svcca_torch.store import RepresentationStore
from svcca_torch.utils.validation import (
    check_fraction,
    check_keep,
    check_positive_int,
)

__all__ = ["SVCCACallback"]

_FREEZE_CHOICES = ("adaptive", "schedule")
_FLOPS_EXAMPLES = 2


def _digest(batch: Any) -> str:
    """SHA-1 of a probe batch's inputs (see :func:`svcca_torch.recorder.batch_inputs`)."""
    t = batch_inputs(batch).detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha1(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


class _ChecksummedProbe:
    """Iterates a probe DataLoader/iterable once for the recorder, hashing its first batch
    on the way (no extra pass over the data)."""

    def __init__(self, probe: Any) -> None:
        self.probe = probe
        self.checksum: Optional[str] = None

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.probe):
            if i == 0:
                self.checksum = _digest(batch)
            yield batch


class SVCCACallback(Callback):
    r"""Record layers on a fixed probe set during training and log SVCCA learning dynamics.

    Captures the chosen layers on ``probe`` before training (0%), every ``every_n_epochs``
    epochs or ``every_n_train_steps`` optimizer steps, and at the end of training, into a
    :class:`~svcca_torch.store.RepresentationStore` in ``<run_dir>/store``. After each
    capture it logs each layer's SVCCA similarity to its previous capture as
    ``<name>/to_previous/<layer>``. At the end of training it compares every capture with
    the final state and logs, with a ``TensorBoardLogger``, one heatmap image per capture
    under ``<name>/learning_dynamics`` with the capture's global step as the image step (the
    step slider scrubs through training), ``<name>/to_final/<layer>`` scalars at each
    capture's step and a custom-scalars layout with every layer in one chart. With any
    logger, or none, it writes ``learning_dynamics.png``, ``convergence.png`` (and, with
    freeze training, ``to_previous.png``) and ``svcca_summary.json`` (all matrices and
    curves) in ``run_dir``.

    The probe must be the same data in the same order at every capture (SVCCA compares
    activations datapoint by datapoint): pass a tensor, or a DataLoader with
    ``shuffle=False`` and no random augmentation, e.g. from :func:`svcca_torch.data.probe_set`.
    A checksum of its first batch is checked at every capture and on resume.

    Freeze training (``freeze_training=True`` or ``"adaptive"``, or ``"schedule"``) freezes
    layer groups bottom-up (see :mod:`svcca_torch.freeze`): adaptive freezes the lowest
    still-trained group once its similarity to its previous capture stays at or above
    ``freeze_threshold`` for ``freeze_patience`` captures; schedule freezes group ``i`` at a
    fraction of training growing linearly with depth. Frozen parameters get
    ``requires_grad=False`` and ``grad=None`` and their BatchNorm layers stay in eval mode,
    so they stay bit-identical; the optimizer can keep them (it skips parameters without a
    gradient). Logged: ``freeze/frozen_groups``, ``freeze/frozen_parameters`` and
    ``freeze/backward_flops_saved`` (fraction of one backward pass's FLOPs no longer spent,
    measured with ``torch.utils.flop_counter`` on two probe inputs).

    Distributed (Lightning's DDP strategies): with a tensor probe every rank records a slice
    of it and rank 0 gathers the rows (``trainer.strategy.all_gather``); a DataLoader probe is
    recorded by rank 0 alone. Rank 0 writes the store and logs; every freeze decision is made on rank 0 and broadcast with
    ``trainer.strategy.broadcast``, so all ranks freeze the same groups at the same step.
    With freeze training under plain ``strategy="ddp"`` the callback sets
    ``find_unused_parameters=True`` before the model is wrapped (frozen parameters receive
    no gradient, which DDP otherwise rejects); FSDP and DeepSpeed are not supported.

    Resume: :meth:`state_dict` holds the capture history, the policy and the frozen groups;
    ``trainer.fit(ckpt_path=...)`` re-freezes the same groups, reopens the store and
    continues the schedule. ``name`` keys the state (``state_key``), the log tags and the
    default run folder, so two instances can coexist.

    Example::

        from svcca_torch.callbacks import SVCCACallback
        from svcca_torch.data import load_digits_dataset, probe_set

        train, _ = load_digits_dataset()
        svcca = SVCCACallback(probe=probe_set(train, 1024), freeze_training=True)
        trainer = pl.Trainer(max_epochs=20, callbacks=[svcca], logger=TensorBoardLogger("runs"))
        trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True))
        # tensorboard --logdir runs

    Args:
        probe: fixed probe inputs: a tensor ``(N, ...)`` or a DataLoader/iterable of batches
            (tensors or ``(inputs, targets)``), same order every time.
        layers: layers to record (names, glob patterns or module types; see
            :func:`svcca_torch.recorder.select_layers`); default the model's ``layer_names``
            or its convs, linears and residual blocks.
        every_n_epochs: capture at the end of every n-th training epoch (default 1 when
            ``every_n_train_steps`` is not given).
        every_n_train_steps: capture every n optimizer steps instead.
        run_dir: folder for the store, figures and JSON (default ``<log_dir>/<name>``, the
            log dir of the trainer's logger, or ``default_root_dir`` without a logger).
        name: prefix of the log tags and of the state key.
        keep: SVD truncation of the stored representations (see :func:`svcca_torch.svd_reduce`).
        max_directions: cap on the kept directions per layer (bounds disk and memory).
        grid, max_datapoints, batch_size: recorder settings (conv maps pooled to at most
            ``grid x grid``, rows capped at ``max_datapoints``).
        freeze_training: ``False``, ``True``/``"adaptive"`` or ``"schedule"``.
        freeze_groups: explicit layer groups (``{name: [module names]}`` or a list of module
            name lists, bottom-up); default one group per recorded layer with its BatchNorm
            (:func:`svcca_torch.freeze.default_layer_groups`).
        freeze_threshold, freeze_patience: the adaptive policy's settings.
        max_frozen_fraction: the most groups frozen, as a fraction of all groups.
        schedule_start, schedule_end: training fractions at which the schedule policy
            freezes the lowest and the highest freezable group.
        final_analysis: compute and log the learning-dynamics matrices and figures at the end.
        progress: show a progress bar during the end-of-training analysis.
    """

    def __init__(
        self,
        probe: Any,
        layers: Optional[Sequence[Any]] = None,
        *,
        every_n_epochs: Optional[int] = None,
        every_n_train_steps: Optional[int] = None,
        run_dir: Optional[Union[str, os.PathLike]] = None,
        name: str = "svcca",
        keep: Union[int, float] = 0.99,
        max_directions: Optional[int] = None,
        grid: int = 2,
        max_datapoints: Optional[int] = None,
        batch_size: int = 256,
        freeze_training: Union[bool, str] = False,
        freeze_groups: Optional[Union[Mapping[str, Sequence[str]], Sequence[Sequence[str]]]] = None,
        freeze_threshold: float = 0.98,
        freeze_patience: int = 2,
        max_frozen_fraction: float = 0.75,
        schedule_start: float = 0.25,
        schedule_end: float = 0.75,
        final_analysis: bool = True,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if every_n_epochs is not None and every_n_train_steps is not None:
            raise ValueError(
                "Pass only one of `every_n_epochs` and `every_n_train_steps` (captures follow one schedule)."
            )
        if every_n_train_steps is not None:
            self.every_n_train_steps: Optional[int] = check_positive_int(every_n_train_steps, "every_n_train_steps")
            self.every_n_epochs: Optional[int] = None
        else:
            self.every_n_epochs = check_positive_int(1 if every_n_epochs is None else every_n_epochs, "every_n_epochs")
            self.every_n_train_steps = None
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"`name` must be a non-empty string without '/', got {name!r}.")
        if freeze_training is True:
            freeze_training = "adaptive"
        if freeze_training is not False and freeze_training not in _FREEZE_CHOICES:
            raise ValueError(
                f"`freeze_training` must be False, True (= 'adaptive'), 'adaptive' or 'schedule'; got {freeze_training!r}."
            )
        self.probe = probe
        self._check_probe(probe)
        self.layers = layers
        self.run_dir: Optional[Path] = Path(run_dir) if run_dir is not None else None
        self.name = name
        self.keep = check_keep(keep)
        self.max_directions = max_directions
        self.recorder_kwargs = dict(grid=grid, max_datapoints=max_datapoints, batch_size=batch_size)
        self.freeze_training: Union[bool, str] = freeze_training
        self.freeze_groups = freeze_groups
        self.policy_kwargs: Dict[str, Any] = {"max_frozen_fraction": check_fraction(
            max_frozen_fraction, "max_frozen_fraction", high_inclusive=True)}
        if freeze_training == "adaptive":
            self.policy_kwargs.update(threshold=check_fraction(freeze_threshold, "freeze_threshold", high_inclusive=True),
                                      patience=check_positive_int(freeze_patience, "freeze_patience"))
        elif freeze_training == "schedule":
            self.policy_kwargs.update(
                start=check_fraction(schedule_start, "schedule_start", low_inclusive=True, high_inclusive=True),
                end=check_fraction(schedule_end, "schedule_end", low_inclusive=True, high_inclusive=True))
        self.final_analysis = bool(final_analysis)
        self.progress = bool(progress)

        # runtime state (rebuilt in setup / on_train_start)
        self.recorder: Optional[ActivationRecorder] = None
        self._shard_recorder: Optional[ActivationRecorder] = None
        self.store: Optional[RepresentationStore] = None
        self.groups: List[LayerGroup] = []
        self.policy: Optional[FreezePolicy] = None
        self._group_layers: Dict[str, List[str]] = {}
        self._prev: Optional[Dict[str, ReducedBasis]] = None
        self._example: Optional[torch.Tensor] = None
        # checkpointed state
        self.captured_steps: List[int] = []
        self.to_previous: List[Dict[str, Any]] = []
        self.probe_checksum: Optional[str] = None
        self.baseline_backward_flops: Optional[int] = None
        self.freeze_log: List[Dict[str, Any]] = []
        self._restored: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @staticmethod
    def _check_probe(probe: Any) -> None:
        if probe is None:
            raise ValueError("`probe` is None: pass a tensor of probe inputs or a DataLoader over them.")
        if isinstance(probe, torch.Tensor):
            if probe.ndim == 0 or probe.shape[0] < 2:
                raise ValueError(
                    f"`probe` must hold at least 2 inputs along dim 0 (datapoints first), got shape {tuple(probe.shape)}."
                )
            return
        if not hasattr(probe, "__iter__"):
            raise ValueError(f"`probe` must be a tensor or a DataLoader/iterable of batches, got {type(probe).__name__}.")
        try:
            n = len(probe.dataset) if hasattr(probe, "dataset") else len(probe)
        except TypeError:
            return
        if n == 0:
            raise ValueError("`probe` is empty: it must yield at least 2 inputs.")

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        # unknown layer names fail here, listing the names that exist
        self.recorder = ActivationRecorder(pl_module, self.layers, **self.recorder_kwargs)
        if trainer.world_size > 1 and isinstance(self.probe, torch.Tensor):
            # each rank records a slice of the probe; rank 0 gathers the rows, then subsamples
            self._shard_recorder = ActivationRecorder(
                pl_module, self.recorder.layers, **{**self.recorder_kwargs, "max_datapoints": None})
        if self.freeze_training:
            self._setup_freeze(trainer, pl_module)
        if not self.freeze_training:
            return
        strategy = trainer.strategy
        if "DeepSpeed" in type(strategy).__name__:  # a DDPStrategy subclass, but parameters are partitioned
            raise ValueError(
                f"freeze_training does not support the {type(strategy).__name__} strategy (parameters are "
                "partitioned, so layer groups cannot be frozen in place); use strategy='ddp' or "
                "freeze_training=False."
            )
        if isinstance(strategy, DDPStrategy):
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
        elif not isinstance(strategy, SingleDeviceStrategy):
            raise ValueError(
                f"freeze_training does not support the {type(strategy).__name__} strategy (parameters are "
                "sharded or flattened, so layer groups cannot be frozen in place); use a single device or "
                "strategy='ddp', or set freeze_training=False."
            )

    def _setup_freeze(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        assert self.recorder is not None
        recorded = self.recorder.layers
        if self.freeze_groups is None:
            self.groups = default_layer_groups(pl_module, recorded)
        else:
            self.groups = explicit_layer_groups(pl_module, self.freeze_groups)
        # which recorded layers speak for each group (their similarity drives the adaptive policy)
        self._group_layers = {}
        for g in self.groups:
            self._group_layers[g.name] = [
                n for n in recorded if n == g.name or any(n == m or n.startswith(m + ".") for m in g.module_names)]
        names = [g.name for g in self.groups]
        if len(names) < 2:
            raise ValueError(
                f"freeze_training needs at least 2 layer groups (the last, the output layer, is never frozen); "
                f"got {names}. Record more layers or pass `freeze_groups`."
            )
        if self.freeze_training == "adaptive":
            silent = [g for g in names[:-1] if not self._group_layers[g]]
            if silent:
                raise ValueError(
                    f"freeze groups {silent} contain no recorded layer, so the adaptive policy has no similarity "
                    "to judge them by; add a layer of each group to `layers` or change `freeze_groups`."
                )
        self.policy = make_freeze_policy(self.freeze_training, names, **self.policy_kwargs)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.recorder is None:  # setup was not called with stage="fit"
            self.setup(trainer, pl_module, "fit")
        if self.freeze_training:
            for opt in trainer.optimizers:
                if isinstance(opt, torch.optim.LBFGS):
                    raise ValueError(
                        "freeze_training does not support torch.optim.LBFGS (it updates parameters without a "
                        "gradient from its history); use SGD/Adam-style optimizers or freeze_training=False."
                    )
        if self.freeze_training == "schedule" and not math.isfinite(self._total_steps(trainer)):
            raise ValueError(
                "freeze_training='schedule' needs a known training length: set max_epochs or max_steps."
            )
        run_dir = self._resolve_run_dir(trainer)
        self.recorder.device = pl_module.device  # type: ignore[union-attr]
        if self._shard_recorder is not None:
            self._shard_recorder.device = pl_module.device
        if trainer.is_global_zero:
            self.store = RepresentationStore(run_dir / "store", keep=self.keep, max_directions=self.max_directions)
        self._restore(trainer, pl_module)
        store = self.store
        if store is not None and len(store) and not self.captured_steps:
            # a new run in the folder of an earlier one: its captures must not stand in for this run's
            steps = [c.step for c in store.checkpoints]
            archive = store.archive_after(-1)
            rank_zero_warn(
                f"{type(self).__name__}: {store.folder} held the captures of an earlier run (steps {steps}); "
                f"moved to {archive} so that this run's are not mixed with them. Resume with "
                "trainer.fit(ckpt_path=...) to continue a run, or pass a new run_dir."
            )
        if self.freeze_training and self.baseline_backward_flops is None and trainer.is_global_zero:
            self.baseline_backward_flops = self._backward_flops(pl_module, all_trainable=True)
        if trainer.is_global_zero:
            self._write_layout(trainer)
        if trainer.global_step not in self.captured_steps:
            self._capture(trainer, pl_module)

    def _resolve_run_dir(self, trainer: "pl.Trainer") -> Path:
        if self.run_dir is None:
            base = trainer.log_dir or trainer.default_root_dir  # log_dir is broadcast from rank 0
            self.run_dir = Path(base) / self.name
        return self.run_dir

    def _total_steps(self, trainer: "pl.Trainer") -> float:
        try:
            return float(trainer.estimated_stepping_batches)
        except Exception:  # no known length
            return math.inf

    def _fraction(self, trainer: "pl.Trainer") -> Optional[float]:
        total = self._total_steps(trainer)
        if not math.isfinite(total) or total <= 0:
            return None
        return min(1.0, trainer.global_step / total)

    # ------------------------------------------------------------------ capture schedule
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.freeze_training == "schedule":
            self._apply_schedule(trainer, pl_module)
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0 \
                and step not in self.captured_steps:
            self._capture(trainer, pl_module)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0 \
                and trainer.global_step not in self.captured_steps:
            self._capture(trainer, pl_module)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.global_step not in self.captured_steps:
            self._capture(trainer, pl_module)
        if trainer.is_global_zero:
            self._finish(trainer)
        trainer.strategy.barrier("svcca_final_analysis")

    # ------------------------------------------------------------------ capture
    def _record(self, pl_module: "pl.LightningModule") -> Dict[str, torch.Tensor]:
        assert self.recorder is not None
        if isinstance(self.probe, torch.Tensor):
            return self._check_checksum(self.recorder.record(self.probe))
        wrapped = _ChecksummedProbe(self.probe)
        acts = self.recorder.record(wrapped)
        return self._check_checksum(acts, wrapped.checksum)

    def _record_sharded(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Optional[Dict[str, torch.Tensor]]:
        """Every rank records a contiguous slice of a tensor probe; the rows are gathered with
        ``trainer.strategy.all_gather`` (all ranks) and assembled on rank 0 in probe order.
        Rows are image-major, so the concatenation equals a single-process recording; the
        ``max_datapoints`` subsample is then taken with the recorder's own row indices."""
        from svcca_torch.functional.conv import conv_datapoint_indices

        rec, probe = self._shard_recorder, self.probe
        assert rec is not None and isinstance(probe, torch.Tensor) and self.recorder is not None
        n, world, rank = probe.shape[0], trainer.world_size, trainer.global_rank
        chunk = -(-n // world)
        counts = [max(0, min(n, (r + 1) * chunk) - r * chunk) for r in range(world)]
        lo = rank * chunk
        # a rank with no slice still runs one input, so every rank joins the same collectives
        acts = rec.record(probe[lo: lo + counts[rank]] if counts[rank] else probe[:1])
        grid = rec.conv_grid or (1, 1)
        cells = grid[0] * grid[1]
        out: Dict[str, torch.Tensor] = {}
        for name, t in acts.items():
            padded = torch.zeros(chunk * cells, t.shape[1], dtype=t.dtype)
            mine = t[: counts[rank] * cells]
            padded[: mine.shape[0]] = mine
            parts = trainer.strategy.all_gather(padded.to(pl_module.device))
            if trainer.is_global_zero:
                out[name] = torch.cat([parts[r, : counts[r] * cells].cpu() for r in range(world)])
        if not trainer.is_global_zero:
            return None
        rows = conv_datapoint_indices(n, grid, max_datapoints=self.recorder.max_datapoints, seed=self.recorder.seed)
        return {k: v[rows] for k, v in out.items()} if rows is not None else out

    def _check_checksum(self, acts: Dict[str, torch.Tensor], checksum: Optional[str] = None) -> Dict[str, torch.Tensor]:
        if checksum is None:
            assert isinstance(self.probe, torch.Tensor) and self.recorder is not None
            checksum = _digest(self.probe[: self.recorder.batch_size])
        if self.probe_checksum is None:
            self.probe_checksum = checksum
        elif checksum != self.probe_checksum:
            raise ValueError(
                "`probe` changed between captures (its first batch differs): SVCCA compares the same "
                "datapoints in the same order, so use a fixed tensor or a DataLoader with shuffle=False and "
                "no random augmentation (e.g. svcca_torch.data.probe_set)."
            )
        return acts

    def _capture(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        step = trainer.global_step
        policy_state = None
        sharded = self._shard_recorder is not None
        gathered = self._record_sharded(trainer, pl_module) if sharded else None
        if trainer.is_global_zero:
            assert self.store is not None
            acts = self._check_checksum(gathered) if sharded else self._record(pl_module)
            settings = self.store.settings
            bases: Dict[str, ReducedBasis] = {}
            for name in list(acts):
                bases[name] = svd_reduce(acts.pop(name), settings["keep"], keep_rule=settings["keep_rule"],
                                         max_directions=settings["max_directions"])
            if step in [c.step for c in self.store.checkpoints]:
                rank_zero_warn(
                    f"{type(self).__name__}: step {step} is already in the store at {self.store.folder} (a run "
                    "resumed from an earlier checkpoint?); keeping the stored capture."
                )
            else:
                # no fraction stored: the store then uses step / final step, which stays right when
                # training stops early or a resumed run trains longer than first planned
                self.store.add(bases, step=step, epoch=trainer.current_epoch)
            sims = paired_similarity(self._prev, bases) if self._prev is not None else {}
            self._prev = bases
            if sims:
                self.to_previous.append({"step": step, **sims})
                self._log_metrics(trainer, {f"{self.name}/to_previous/{k}": v for k, v in sims.items()}, step)
            if self.freeze_training == "adaptive" and sims:
                assert self.policy is not None
                group_sims = {}
                for g, layers in self._group_layers.items():
                    vals = [sims[n] for n in layers if n in sims]
                    if vals:
                        group_sims[g] = min(vals)  # a group is settled when all its layers are
                self.policy.update(step, group_sims)
            if self.policy is not None:
                policy_state = self.policy.state_dict()
        self.captured_steps.append(step)
        if self.freeze_training == "adaptive":
            # one decision, made on rank 0, applied everywhere
            policy_state = trainer.strategy.broadcast(policy_state, src=0)
            assert self.policy is not None
            self.policy.load_state_dict(policy_state)
            self._apply_frozen(trainer, pl_module)

    def _apply_schedule(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        assert self.policy is not None
        fraction = self._fraction(trainer)
        # deterministic in global_step, so every rank takes the same decision without a collective
        if fraction is not None and self.policy.update(trainer.global_step, fraction=fraction):
            self._apply_frozen(trainer, pl_module)

    def _apply_frozen(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Freeze every group the policy lists that is not frozen yet, and log it."""
        assert self.policy is not None
        by_name = {g.name: g for g in self.groups}
        # a group without parameters has nothing to freeze (and would count as newly frozen every time)
        newly = [n for n in self.policy.frozen if by_name[n].parameters() and not is_frozen(by_name[n])]
        if not newly:
            return
        for n in newly:
            freeze_group(by_name[n])
        step = trainer.global_step
        frozen_params = sum(by_name[n].num_parameters() for n in self.policy.frozen)
        saved = None
        if trainer.is_global_zero and self.baseline_backward_flops:
            saved = 1.0 - self._backward_flops(pl_module) / self.baseline_backward_flops
        entry = {"step": step, "groups": newly, "frozen_groups": len(self.policy.frozen),
                 "frozen_parameters": frozen_params, "backward_flops_saved": saved}
        self.freeze_log.append(entry)
        rank_zero_info(
            f"{type(self).__name__}: froze {', '.join(newly)} at step {step} ({len(self.policy.frozen)} of "
            f"{len(self.groups)} groups, {frozen_params:,} parameters"
            + (f", ~{100 * saved:.0f}% of backward FLOPs saved)" if saved is not None else ")")
        )
        if trainer.is_global_zero:
            metrics = {"freeze/frozen_groups": float(len(self.policy.frozen)),
                       "freeze/frozen_parameters": float(frozen_params)}
            if saved is not None:
                metrics["freeze/backward_flops_saved"] = float(saved)
            self._log_metrics(trainer, metrics, step)
            for lg in trainer.loggers:
                if isinstance(lg, TensorBoardLogger):
                    lg.experiment.add_text(f"{self.name}/freeze", f"step {step}: froze {', '.join(newly)}", step)

    def _example_input(self) -> torch.Tensor:
        if self._example is None:
            p = self.probe
            first = p if isinstance(p, torch.Tensor) else batch_inputs(next(iter(p)))
            self._example = first[:_FLOPS_EXAMPLES].clone()
        return self._example

    def _backward_flops(self, pl_module: "pl.LightningModule", all_trainable: bool = False) -> int:
        x = to_model(self._example_input(), pl_module)
        if not all_trainable:
            return backward_flops(pl_module, x)
        frozen = [p for g in self.groups for p in g.parameters() if not p.requires_grad]
        for p in frozen:
            p.requires_grad_(True)
        try:
            return backward_flops(pl_module, x)
        finally:
            for p in frozen:
                p.requires_grad_(False)

    # ------------------------------------------------------------------ logging
    def _log_metrics(self, trainer: "pl.Trainer", metrics: Dict[str, float], step: int) -> None:
        # like LearningRateMonitor: straight to the loggers, so it works from any hook
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)

    def _tensorboards(self, trainer: "pl.Trainer") -> List[Any]:
        return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def _write_layout(self, trainer: "pl.Trainer") -> None:
        if self.recorder is None:
            return
        layout = {
            f"SVCCA ({self.name})": {
                "similarity to final state, per layer": ["Multiline", [rf"^{self.name}/to_final/"]],
                "similarity to previous capture, per layer": ["Multiline", [rf"^{self.name}/to_previous/"]],
            }
        }
        if self.freeze_training:
            layout[f"SVCCA ({self.name})"]["freeze training"] = [
                "Multiline", [r"^freeze/frozen_groups$", r"^freeze/backward_flops_saved$"]]
        for writer in self._tensorboards(trainer):
            writer.add_custom_scalars(layout)

    # ------------------------------------------------------------------ end of training
    def _finish(self, trainer: "pl.Trainer") -> None:
        assert self.store is not None and self.run_dir is not None
        run_dir = self.run_dir
        summary: Dict[str, Any] = {
            "layers": self.store.layers,
            "captured_steps": list(self.captured_steps),
            "probe_checksum": self.probe_checksum,
            "store": str(self.store.folder),
            "freeze": {"policy": self.freeze_training or None,
                       "groups": [{"name": g.name, "modules": g.module_names} for g in self.groups],
                       "events": self.freeze_log,
                       "policy_state": self.policy.state_dict() if self.policy is not None else None},
        }
        if self.final_analysis and len(self.store) >= 1:
            dyn = learning_dynamics(self.store, progress=self.progress)
            fin = dyn.curves()
            prev = similarity_to_previous(self.store)
            writers = self._tensorboards(trainer)
            for c, step in enumerate(dyn.steps):
                self._log_metrics(
                    trainer, {f"{self.name}/to_final/{n}": float(v) for n, v in zip(dyn.layers, dyn.to_final()[c])
                              if not math.isnan(float(v))}, step)
                if writers:
                    one = LearningDynamics(dyn.layers, [step], [dyn.fractions[c]], dyn.matrices[c: c + 1])
                    fig = plot_learning_dynamics(one, [dyn.fractions[c]])
                    for w in writers:
                        w.add_figure(f"{self.name}/learning_dynamics", fig, global_step=step, close=False)
            for w in writers:
                w.flush()
            run_dir.mkdir(parents=True, exist_ok=True)
            fractions = [f for f in DEFAULT_FRACTIONS]
            plot_learning_dynamics(dyn, fractions).savefig(run_dir / "learning_dynamics.png", dpi=110)
            plot_convergence(fin).savefig(run_dir / "convergence.png", dpi=110)
            if self.freeze_training and len(self.store) > 1:  # what the adaptive policy saw
                plot_convergence(prev, ylabel="SVCCA similarity to previous capture").savefig(
                    run_dir / "to_previous.png", dpi=110)
            summary.update(
                steps=dyn.steps,
                fractions=dyn.fractions,
                matrices=_nan_to_none(dyn.matrices.tolist()),
                to_final=_nan_to_none(fin.values.tolist()),
                to_previous=_nan_to_none(prev.values.tolist()),
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / ".svcca_summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, run_dir / "svcca_summary.json")
        rank_zero_info(f"{type(self).__name__}: figures and svcca_summary.json in {run_dir}")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {
            "captured_steps": list(self.captured_steps),
            "to_previous": [dict(e) for e in self.to_previous],
            "probe_checksum": self.probe_checksum,
            "run_dir": None if self.run_dir is None else str(self.run_dir),
            "policy": None if self.policy is None else self.policy.state_dict(),
            "freeze_log": [dict(e) for e in self.freeze_log],
            "baseline_backward_flops": self.baseline_backward_flops,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # applied in on_train_start, once the model, the store folder and the policy exist
        self._restored = dict(state_dict)
        self.captured_steps = list(state_dict.get("captured_steps", []))
        self.to_previous = [dict(e) for e in state_dict.get("to_previous", [])]
        self.probe_checksum = state_dict.get("probe_checksum")
        self.freeze_log = [dict(e) for e in state_dict.get("freeze_log", [])]
        self.baseline_backward_flops = state_dict.get("baseline_backward_flops")
        if self.run_dir is None and state_dict.get("run_dir"):
            self.run_dir = Path(state_dict["run_dir"])

    def _restore(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        state, self._restored = self._restored, None
        if state is None:
            return
        # captures after the checkpoint's step belong to a run that was not kept
        self.captured_steps = [s for s in self.captured_steps if s <= trainer.global_step]
        self.to_previous = [e for e in self.to_previous if e["step"] <= trainer.global_step]
        if state.get("policy") is not None:
            if self.policy is None:
                raise ValueError(
                    f"the checkpoint holds a {state['policy']['kind']!r} freeze-training state but this "
                    f"{type(self).__name__} has freeze_training=False; resume with the same settings."
                )
            self.policy.load_state_dict(state["policy"])
            self._apply_frozen_silently()
        if trainer.is_global_zero and self.store is not None and len(self.store):
            archive = self.store.archive_after(trainer.global_step)
            if archive is not None:
                rank_zero_info(
                    f"{type(self).__name__}: resumed at step {trainer.global_step}; the captures the earlier run "
                    f"made after it were moved to {archive} (kept, not deleted)."
                )
            done = [c for c in self.store.checkpoints if c.step <= trainer.global_step]
            if done:
                self._prev = self.store.load_checkpoint(done[-1])

    def _apply_frozen_silently(self) -> None:
        assert self.policy is not None
        by_name = {g.name: g for g in self.groups}
        for n in self.policy.frozen:
            freeze_group(by_name[n])
        if self.policy.frozen:
            rank_zero_info(f"{type(self).__name__}: resumed with frozen groups {', '.join(self.policy.frozen)}.")


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x
