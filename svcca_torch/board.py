"""TensorBoard views of SVCCA learning dynamics (0.2's API, kept): :class:`BoardLogger`.

Since 0.3 the views live in :mod:`svcca_torch.views` (selection, encoding, sinks, the
:class:`~svcca_torch.views.TrainingViews` facade), for any sink. :class:`BoardLogger` is that
facade over one :class:`~svcca_torch.views.TensorBoardSink`, with 0.2's constructor and
methods (``log_capture``, ``log_freeze``, ``log_signal``, ``log_freeze_note``,
``log_final(dynamics, save_dir=)``, ``state_dict``, ``images_written``, ...); the selection
functions are re-exported from :mod:`svcca_torch.views.selection`. Tags and what
TensorBoard shows: see :mod:`svcca_torch.views.training`.

Plain PyTorch (never imports Lightning).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from .dynamics import LearningDynamics
from .views.encoding import GRID_FONT_SCALE, figure_to_array
from .views.selection import (
    GRID_PANELS,
    LIVE_FRACTIONS,
    TENSORBOARD_IMAGES_PER_TAG,
    full_checkpoints,
    grid_checkpoints,
    select_checkpoints,
)
from .views.sinks import PNGSink, TensorBoardSink
from .views.training import TrainingViews

__all__ = ["BoardLogger", "LIVE_FRACTIONS", "select_checkpoints", "full_checkpoints", "grid_checkpoints",
           "figure_to_array", "GRID_PANELS", "GRID_FONT_SCALE", "TENSORBOARD_IMAGES_PER_TAG"]


class BoardLogger(TrainingViews):
    """Writes SVCCA learning dynamics to TensorBoard under ``<name>/``, with bounded image tags:
    :class:`~svcca_torch.views.TrainingViews` over one
    :class:`~svcca_torch.views.TensorBoardSink` (see there for every argument).

    Call :meth:`log_capture` after every capture (step 0 included), :meth:`log_freeze` at
    every capture and freeze window when freeze training is on (:meth:`log_signal` for the
    adaptive signal), :meth:`log_final` once training ends and :meth:`close` last.

    Args:
        writer: a ``SummaryWriter`` (or anything with ``add_image``, ``add_scalar``,
            ``add_text`` and ``add_custom_scalars``, e.g. Lightning's ``TensorBoardLogger.experiment``).
        layer_runs: with ``layer_scalars``, one run per layer (default when ``writer`` is a
            ``SummaryWriter``); ``False``: one tag per layer in ``writer``'s run.
        name, layers, options: as :class:`~svcca_torch.views.TrainingViews` (``total_steps``,
            ``max_images``, ``live_fractions``, ``fractions``, ``min_change``, ``dpi``,
            ``font_size``, ``keep``, ``layer_scalars``).
    """

    def __init__(self, writer: Any, name: str = "svcca", layers: Sequence[str] = (), *,
                 layer_runs: Optional[bool] = None, **options: Any) -> None:
        #: the TensorBoard sink every view goes to
        self.sink = TensorBoardSink(writer, layer_runs=layer_runs)
        super().__init__([self.sink], name, layers, **options)

    @property
    def writer(self) -> Any:
        return self.sink.writer

    @property
    def layer_runs(self) -> bool:
        return self.sink.layer_runs

    def layout(self, layer_runs: Optional[bool] = None) -> Dict[str, Dict[str, List[Any]]]:
        """Custom-scalars layout (see :meth:`TrainingViews.layout`), for this writer's runs."""
        return super().layout(self.layer_runs if layer_runs is None else layer_runs)

    def log_final(self, dynamics: LearningDynamics, save_dir: Optional[Union[str, Path]] = None, *,  # type: ignore[override]
                  freeze_steps: Optional[Mapping[str, int]] = None) -> Dict[str, List[int]]:
        """The end-of-training views (:meth:`TrainingViews.log_dynamics`); ``save_dir``: also
        write the grid and the curves, as logged, to ``learning_dynamics.png`` and
        ``convergence.png`` in that folder (drawn once for both)."""
        if not isinstance(dynamics, LearningDynamics) or not dynamics.steps:
            raise ValueError("`dynamics` must be a LearningDynamics with at least one checkpoint "
                             "(svcca_torch.dynamics.learning_dynamics(store)).")
        extra = [] if save_dir is None else [PNGSink(save_dir, to_previous=False)]
        self.sinks.extend(extra)
        try:
            return self.log_dynamics(dynamics, freeze_steps=freeze_steps)
        finally:
            for s in extra:
                self.sinks.remove(s)
