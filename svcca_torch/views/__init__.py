"""Training views: what SVCCA shows while a run trains and at its end, in any sink.

Layered as ``torch.utils.tensorboard`` is: :mod:`~svcca_torch.views.selection` (what to
show and when, plain rules), :mod:`~svcca_torch.views.encoding` (figures drawn once as RGB
arrays), :mod:`~svcca_torch.views.sinks` (where they go: :class:`TensorBoardSink`,
:class:`PNGSink`, any :class:`Sink`), :mod:`~svcca_torch.views.training` (the facade,
:class:`TrainingViews`). Plain PyTorch (never imports Lightning); the Lightning callback
adds a sink per logger.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

from .encoding import figure_to_array
from .selection import (
    LIVE_FRACTIONS,
    TENSORBOARD_IMAGES_PER_TAG,
    final_live_images,
    freeze_state_due,
    full_checkpoints,
    grid_checkpoints,
    select_checkpoints,
)
from .sinks import RUN_FIGURES, PNGSink, Sink, TensorBoardSink
from .training import TrainingViews

__all__ = ["TrainingViews", "Sink", "TensorBoardSink", "PNGSink", "write_figures", "RUN_FIGURES", "LIVE_FRACTIONS",
           "TENSORBOARD_IMAGES_PER_TAG", "select_checkpoints", "full_checkpoints", "grid_checkpoints",
           "freeze_state_due", "final_live_images", "figure_to_array"]


def write_figures(analysis: Any, folder: Union[str, os.PathLike], *, grid_fractions: Optional[Sequence[float]] = None,
                  freeze_steps: Optional[Mapping[str, int]] = None, to_previous: bool = False,
                  name: str = "svcca") -> PNGSink:
    """The run folder's figures, through a :class:`PNGSink`: ``learning_dynamics.png`` (the
    grid), ``convergence.png`` (the to-final curves) and, with ``to_previous``,
    ``to_previous.png`` (the whole run's similarity to the previous capture, when more than
    one capture had a previous one), the same pixels as the TensorBoard images.

    Args:
        analysis: a :class:`~svcca_torch.tracker.FinalAnalysis` (``tracker.finish``) or a
            :class:`~svcca_torch.dynamics.LearningDynamics` (then no to-previous figure).
        folder: where the files go.
        grid_fractions: the grid's panels as fractions of training (None: where the curves change).
        freeze_steps: ``{layer: step it was frozen}``, marked in the figures.
    Returns:
        the sink (``files_written``: file -> step).
    """
    dyn = getattr(analysis, "dynamics", analysis)
    sink = PNGSink(folder, to_previous=to_previous)
    views = TrainingViews([sink], name, dyn.layers, fractions=grid_fractions)
    previous = getattr(analysis, "to_previous", None)
    if to_previous and previous is not None:
        views.schedule.seed(previous)
    views.log_final(dyn, freeze_steps=freeze_steps)
    return sink
