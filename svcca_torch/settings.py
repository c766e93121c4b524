"""TrackerSettings: every setting of a tracked run, declared, documented, defaulted and
validated once.

:class:`~svcca_torch.tracker.DynamicsTracker` and
:class:`~svcca_torch.callbacks.SVCCACallback` take the same settings, as keyword arguments or
as one object::

    settings = TrackerSettings(freeze="adaptive", freeze_window=len(loader), max_overhead=0.05)
    tracker = DynamicsTracker(model, probe, settings=settings)
    callback = SVCCACallback(probe, settings=settings)      # the same settings, from a Trainer

The object is immutable: a changed copy is :meth:`TrackerSettings.replace` (validated
again), so no setting changes behind a tracker's back. Validation happens in the constructor
(the one place): a bad value is a ``ValueError`` naming the setting, what it must be and
what it got; an unknown name is a ``TypeError`` listing the settings.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from .utils.validation import (
    check_bool,
    check_device,
    check_flag_or_bytes,
    check_fraction,
    check_keep,
    check_optional_positive_int,
    check_positive_int,
)

__all__ = ["TrackerSettings", "DEFAULT_THRESHOLD", "CACHE_BYTES"]

#: The adaptive policy's default threshold on the calibrated signal (see
#: :func:`svcca_torch.freeze.calibrated_similarity`): a group settles when it moved less in
#: one window than half the distance to an independently initialised network.
DEFAULT_THRESHOLD = 0.5
#: The frozen-output cache's default memory cap (``frozen_cache=True``): 1 GiB of host memory.
CACHE_BYTES = 1 << 30

Groups = Union[Mapping[str, Sequence[str]], Sequence[Sequence[str]]]


def _doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass(frozen=True)
class TrackerSettings:
    """The settings of a tracked run (see the module docstring); each field says what it does.

    Activations are ``(datapoints, neurons)``, ``(N, C, H, W)`` for conv layers and
    ``(N, L, D)`` for token sequences (each token a datapoint).
    """

    # -- what is recorded
    layers: Optional[Sequence[Any]] = _doc(
        "Layers to record: names or modules (default: the model's blocks, "
        ":func:`svcca_torch.recorder.default_layers`).", None)
    run_dir: Union[str, os.PathLike] = _doc(
        "Folder for the store (``<run_dir>/store``), the figures and ``svcca_summary.json``.", "svcca_run")
    keep: Union[int, float] = _doc(
        "SVD truncation of the stored representations: a fraction of the variance (0.99) or a number of "
        "directions.", 0.99)
    max_directions: Optional[int] = _doc("At most this many stored directions per layer (None: no cap).", None)
    grid: int = _doc("Conv maps are average-pooled to ``grid x grid`` positions, each a datapoint.", 2)
    max_datapoints: Optional[int] = _doc("At most this many datapoints per layer (a fixed-seed subsample).", None)
    batch_size: int = _doc("Probe inputs per forward when recording.", 256)
    # -- when captures are taken
    every_n_steps: Optional[int] = _doc(
        "Capture every n optimizer steps, every one of them (an explicit schedule is not thinned by "
        "``max_overhead``). None: the tracker's own front-loaded schedule within ``max_overhead``.", None)
    max_overhead: Optional[float] = _doc(
        "The tracker's time budget as a fraction of training time: the default capture schedule's and, for "
        ":data:`svcca_torch.freeze.signal.SIGNAL_SHARE` of it, the adaptive freeze signal's. None: no budget.",
        0.05)
    explicit_schedule: Optional[str] = _doc(
        "A caller's explicit schedule in words (e.g. ``'every 2 epochs'``), for the end-of-run report.", None)
    total_steps: Optional[int] = _doc(
        "Training length in optimizer steps, when known (front-loaded captures and the schedule policy need "
        "it; the callback sets it from the Trainer).", None)
    # -- freeze training
    freeze: Union[bool, str] = _doc(
        "Freeze training: False, True (= ``'adaptive'``) or a registered policy name "
        "(:func:`svcca_torch.freeze.policy_names`: ``'adaptive'``, ``'schedule'``, ...).", False)
    freeze_groups: Optional[Groups] = _doc(
        "Layer groups frozen together, bottom-up (default: one per recorded layer, "
        ":func:`svcca_torch.freeze.default_layer_groups`).", None)
    freeze_window: Optional[int] = _doc(
        "The adaptive signal's window in optimizer steps (e.g. one epoch; the callback's default).", None)
    freeze_threshold: float = _doc(
        "Adaptive: a group is settled when its calibrated similarity to one window earlier is at least this.",
        DEFAULT_THRESHOLD)
    freeze_patience: int = _doc("Adaptive: consecutive settled windows needed to freeze a group.", 1)
    signal_datapoints_per_neuron: int = _doc("Adaptive: datapoints per neuron each signal recording keeps.", 10)
    max_frozen_fraction: float = _doc("At most this fraction of the groups is ever frozen (the last never).", 0.75)
    schedule_start: float = _doc("Schedule: the training fraction at which the lowest group freezes.", 0.25)
    schedule_end: float = _doc("Schedule: the training fraction at which the highest freezable group freezes.",
                               0.75)
    freeze_options: Mapping[str, Any] = _doc(
        "Options of a registered policy beyond these settings, passed to its ``from_settings``.", factory=dict)
    frozen_cache: Union[bool, int] = _doc(
        "Keep the frozen prefix's output per training input and skip the frozen forward for batches seen "
        "before (exact or off): True (up to 1 GiB), a number of bytes, or False (default).", False)
    # -- the end of the run
    final_analysis: bool = _doc("Compute the learning-dynamics matrices and figures at the end.", True)
    final_heatmaps: int = _doc("How many captures get a full layers x layers heatmap at the end (>= 2).", 6)
    grid_fractions: Optional[Sequence[float]] = _doc(
        "The grid figure's panels as fractions of training (the paper's ``(0, 0.35, 0.75, 1)``); None: 4 "
        "heatmaps where the curves change.", None)
    figures: bool = _doc("Write the run folder's PNG figures at the end.", True)
    progress: bool = _doc("A progress bar during the final analysis.", True)
    analysis_device: Optional[Union[str, torch.device]] = _doc(
        "Where the end-of-run analysis runs (default: the model's device).", None)

    def __post_init__(self) -> None:
        from .freeze import policy_names  # the registry (freeze imports the recorder, not this module)

        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        put("run_dir", Path(self.run_dir))
        put("keep", check_keep(self.keep))
        put("max_directions", check_optional_positive_int(self.max_directions, "max_directions"))
        put("grid", check_positive_int(self.grid, "grid"))
        put("max_datapoints", check_optional_positive_int(self.max_datapoints, "max_datapoints"))
        put("batch_size", check_positive_int(self.batch_size, "batch_size"))
        put("every_n_steps", check_optional_positive_int(self.every_n_steps, "every_n_steps"))
        if self.max_overhead is not None:
            put("max_overhead", check_fraction(self.max_overhead, "max_overhead"))
        if self.explicit_schedule is not None and not isinstance(self.explicit_schedule, str):
            raise ValueError(f"`explicit_schedule` must be None or a string, got {self.explicit_schedule!r}.")
        put("total_steps", check_optional_positive_int(self.total_steps, "total_steps"))
        freeze = "adaptive" if self.freeze is True else self.freeze
        if freeze is not False and freeze not in policy_names():
            raise ValueError(
                f"`freeze` (the callback's `freeze_training`) must be False, True (= 'adaptive') or a registered "
                f"policy name {policy_names()}; got {self.freeze!r}.")
        put("freeze", freeze)
        put("freeze_window", check_optional_positive_int(self.freeze_window, "freeze_window"))
        put("freeze_threshold", check_fraction(self.freeze_threshold, "freeze_threshold", high_inclusive=True))
        put("freeze_patience", check_positive_int(self.freeze_patience, "freeze_patience"))
        put("signal_datapoints_per_neuron",
            check_positive_int(self.signal_datapoints_per_neuron, "signal_datapoints_per_neuron"))
        put("max_frozen_fraction", check_fraction(self.max_frozen_fraction, "max_frozen_fraction",
                                                  high_inclusive=True))
        for name in ("schedule_start", "schedule_end"):
            put(name, check_fraction(getattr(self, name), name, low_inclusive=True, high_inclusive=True))
        if self.schedule_end < self.schedule_start:
            raise ValueError(f"`schedule_end` ({self.schedule_end}) must be >= `schedule_start` "
                             f"({self.schedule_start}).")
        if not isinstance(self.freeze_options, Mapping):
            raise ValueError(f"`freeze_options` must be a mapping of option names to values, got "
                             f"{type(self.freeze_options).__name__}.")
        put("freeze_options", dict(self.freeze_options))
        cache = check_flag_or_bytes(self.frozen_cache, "frozen_cache", CACHE_BYTES)
        put("frozen_cache", False if cache is None else cache)
        put("final_analysis", check_bool(self.final_analysis, "final_analysis"))
        put("final_heatmaps", check_positive_int(self.final_heatmaps, "final_heatmaps", minimum=2))
        if self.grid_fractions is not None:
            put("grid_fractions", tuple(check_fraction(f, "grid_fractions[i]", low_inclusive=True,
                                                       high_inclusive=True) for f in self.grid_fractions))
        put("figures", check_bool(self.figures, "figures"))
        put("progress", check_bool(self.progress, "progress"))
        put("analysis_device", check_device(self.analysis_device, "analysis_device"))

    def replace(self, **changes: Any) -> "TrackerSettings":
        """A copy with ``changes`` applied, validated as a new object."""
        return dataclasses.replace(self, **check_names(changes))

    @property
    def cache_bytes(self) -> Optional[int]:
        """The frozen-output cache's memory cap in bytes, or None when it is off."""
        return None if self.frozen_cache is False else int(self.frozen_cache)

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        """Every setting's name, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def help(cls) -> Dict[str, str]:
        """``{setting: what it does}``."""
        return {f.name: f.metadata["doc"] for f in dataclasses.fields(cls)}

    @classmethod
    def build(cls, settings: Optional["TrackerSettings"] = None, /, **kwargs: Any) -> "TrackerSettings":
        """``settings`` with ``kwargs`` applied (or new settings from ``kwargs``): what the
        tracker's and the callback's constructors do with what they are given."""
        if settings is None:
            return cls(**check_names(kwargs))
        if not isinstance(settings, TrackerSettings):
            raise ValueError(f"`settings` must be a TrackerSettings, got {type(settings).__name__}.")
        return settings.replace(**kwargs) if kwargs else settings


def check_names(kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """``kwargs`` when every key is a setting, else a ``TypeError`` naming the unknown ones
    and listing the settings."""
    unknown = [k for k in kwargs if k not in TrackerSettings.names()]
    if unknown:
        raise TypeError(f"unknown setting{'s' if len(unknown) > 1 else ''} {unknown}; the settings are "
                        f"{list(TrackerSettings.names())} (svcca_torch.settings.TrackerSettings).")
    return dict(kwargs)
