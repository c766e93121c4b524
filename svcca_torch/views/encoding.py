"""Figures of the training views, encoded once as ``(height, width, 3)`` uint8 RGB arrays.

Every image the views send is drawn here, once, and the same pixels go to every sink
(TensorBoard, PNG files, W&B, ...). Drawn for TensorBoard's cards at its default settings:
``font_size`` 18 at ``dpi`` 100 (a 640 px wide figure shows 10 to 12 px high text in a Time
Series card), the grid's fonts ``GRID_FONT_SCALE`` larger (four panels share one card).

Plain PyTorch (never imports Lightning). The functions take plain data: similarity
matrices ``(layers, layers)``, :class:`~svcca_torch.dynamics.LayerCurves`, a
:class:`~svcca_torch.dynamics.LearningDynamics`.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave

from ..dynamics import LayerCurves, LearningDynamics
from .. import plotting  # the figures, looked up when drawn (one place to patch or extend)
from ..plotting import checkpoint_label, freeze_note, remember_layout
from ..utils.files import atomic_write

__all__ = ["figure_to_array", "render", "save_png", "titled", "live_matrix", "curves", "to_final_matrix", "grid",
           "cache_note", "GRID_FONT_SCALE", "checkpoint_label"]

#: The grid image's fonts, relative to ``font_size`` (its four panels share one card).
GRID_FONT_SCALE = 1.2


def figure_to_array(fig: Figure, dpi: int = 100) -> np.ndarray:
    """Render a matplotlib figure with Agg to an ``(height, width, 3)`` uint8 RGB array."""
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    remember_layout(fig)
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def render(draw: Callable[[], Optional[Figure]], *, dpi: int = 100, font_size: float = 18.0,
           scale: float = 1.0) -> Optional[np.ndarray]:
    """Draw a figure with ``scale * font_size`` point fonts and render it (:func:`figure_to_array`);
    None when ``draw`` has nothing to draw (returns None)."""
    with rc_context({"font.size": font_size * scale}):
        fig = draw()
        return None if fig is None else figure_to_array(fig, dpi)


def save_png(image: np.ndarray, path: Union[str, Path]) -> None:
    """Write an ``(H, W, 3)`` uint8 image as a PNG file (the pixels as logged); written to a new
    temporary sibling and renamed, so a link at ``path`` is replaced, never written through."""
    atomic_write(Path(path), lambda f: imsave(f, image, format="png"))


def titled(head: str, frozen_at: Mapping[str, int], layers: Sequence[str], short_names: Sequence[str],
           step: Optional[int]) -> str:
    """``head`` and, on a second line, the layers frozen by ``step`` with their freeze steps,
    wrapped to a heatmap's width (720 px at the title's 30 px font: about 42 characters)."""
    note = freeze_note(dict(frozen_at), list(layers), list(short_names), step=step, limit=6)
    return head + ("\n" + textwrap.fill(note, 42, break_on_hyphens=False) if note else "")


def live_matrix(matrix: torch.Tensor, layers: Sequence[str], *, title: str, step: int, previous_step: Optional[int],
                frozen_layers: Sequence[str]) -> Figure:
    """The layers x layers heatmap of the previous capture vs this one:
    ``matrix[i, j]`` = layer ``i`` at the previous capture vs layer ``j`` now."""
    return plotting.plot_similarity_matrix(matrix, list(layers), title=title,
                                  xlabel=f"layer at step {previous_step} (previous capture)",
                                  ylabel=f"layer at step {step}", frozen_layers=list(frozen_layers))


def curves(values: LayerCurves, *, title: str, freeze_steps: Mapping[str, int], x: str = "fraction",
           ylabel: str = "SVCCA similarity") -> Figure:
    """One chart, a line per layer coloured by depth, each freeze marked."""
    return plotting.plot_convergence(values, x=x, ylabel=ylabel, title=title, freeze_steps=dict(freeze_steps))


def to_final_matrix(dynamics: LearningDynamics, c: int, *, title: str, frozen_layers: Sequence[str]) -> Figure:
    """Checkpoint ``c``'s layers x layers heatmap against the end of training."""
    return plotting.plot_similarity_matrix(dynamics.matrices[c], dynamics.layers, title=title,
                                  xlabel=f"layer at end (step {int(dynamics.steps[-1])})",
                                  ylabel=f"layer at step {int(dynamics.steps[c])}", frozen_layers=list(frozen_layers))


def grid(dynamics: LearningDynamics, checkpoints: Sequence[int], freeze_steps: Mapping[str, int]) -> Figure:
    """The 2x2 grid of heatmaps (the paper's figure), sized for one TensorBoard card."""
    return plotting.plot_learning_dynamics(dynamics, checkpoints=list(checkpoints), ncols=2, panel_size=2.6,
                                  freeze_steps=dict(freeze_steps))


def cache_note(stats: Mapping[str, Any]) -> str:
    """One line on what the frozen-output cache skipped (``tracker.frozen_cache_stats``)."""
    return (f"frozen-output cache: the frozen forward was skipped for {stats['served']:,} of "
            f"{stats['lookups']:,} samples after the first freeze"
            + (f"; turned off: {stats['off']}." if stats["off"] else f" ({stats['bytes'] / 2 ** 20:.1f} MiB kept)."))
