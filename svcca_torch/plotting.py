"""Matplotlib figures of learning dynamics and network comparisons.

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot`` (no
global state, no GUI backend needed: it renders with Agg), so it can be saved with
``fig.savefig("dynamics.png")`` or logged to TensorBoard (``writer.add_figure``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from .dynamics import (
    AlignedDirections,
    LayerCurves,
    LearningDynamics,
    learning_dynamics,
    similarity_to_final,
)
from .store import RepresentationStore
from .utils.validation import as_tensor, check_choice, check_fraction

#: The paper's snapshots: start, 35%, 75% and end of training.
DEFAULT_FRACTIONS = (0.0, 0.35, 0.75, 1.0)
#: Above this many layers the axes show indices instead of names.
MAX_NAMED_LAYERS = 16


def _layer_ticks(ax, names: Sequence[str], axis: str) -> None:
    idx = np.arange(len(names))
    if len(names) <= MAX_NAMED_LAYERS:
        if axis == "x":
            ax.set_xticks(idx, names, rotation=90, fontsize=7)
        else:
            ax.set_yticks(idx, names, fontsize=7)
    else:
        step = max(1, len(names) // 8)
        (ax.set_xticks if axis == "x" else ax.set_yticks)(idx[::step])


def plot_learning_dynamics(
    dynamics: Union[LearningDynamics, RepresentationStore],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    *,
    cmap: str = "viridis",
    panel_size: float = 3.0,
) -> Figure:
    """The paper's learning-dynamics grid: one heatmap per chosen moment of training.

    Panel ``c`` shows the SVCCA similarity between layer ``i`` at the end of training
    (x axis) and layer ``j`` at that moment (y axis), origin bottom-left (lowest layers at
    the bottom-left corner), all panels on one colour scale 0..1 with a shared colour bar.

    Args:
        dynamics: a :class:`LearningDynamics` or a :class:`RepresentationStore` (computed
            for the needed checkpoints only).
        fractions: fractions of training to show; each panel uses the stored checkpoint
            nearest to it (its actual fraction and step are in the title).
        cmap: a matplotlib colormap name.
        panel_size: inches per panel.
    """
    if not fractions:
        raise ValueError("`fractions` must name at least one moment of training, e.g. (0, 0.35, 0.75, 1).")
    fractions = [check_fraction(f, "fractions[i]", low_inclusive=True, high_inclusive=True) for f in fractions]
    if isinstance(dynamics, RepresentationStore):
        cks = [dynamics.nearest(f) for f in fractions]
        unique = sorted({c.step for c in cks})
        dynamics = learning_dynamics(dynamics, unique)
    if not isinstance(dynamics, LearningDynamics):
        raise ValueError(f"`dynamics` must be a LearningDynamics or a RepresentationStore, got {type(dynamics).__name__}.")
    picks = [dynamics.nearest(f) for f in fractions]
    fig = Figure(figsize=(panel_size * len(picks) + 1.0, panel_size + 0.8), layout="constrained")
    axes = fig.subplots(1, len(picks), squeeze=False)[0]
    image = None
    for ax, c in zip(axes, picks):
        # matrices[c, i, j]: i = layer at the end (x), j = layer at checkpoint c (y)
        data = dynamics.matrices[c].T.numpy()
        image = ax.imshow(np.ma.masked_invalid(data), origin="lower", vmin=0.0, vmax=1.0, cmap=cmap,
                          interpolation="nearest", aspect="equal")
        ax.set_title(f"{100 * dynamics.fractions[c]:.0f}% of training (step {dynamics.steps[c]})", fontsize=9)
        ax.set_xlabel("layer at end of training")
        _layer_ticks(ax, dynamics.layers, "x")
        _layer_ticks(ax, dynamics.layers, "y")
    axes[0].set_ylabel("layer at this checkpoint")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="SVCCA similarity")
    return fig


def plot_convergence(
    curves: Union[LayerCurves, RepresentationStore],
    *,
    x: str = "fraction",
    cmap: str = "viridis",
    ylabel: str = "SVCCA similarity to final state",
    title: Optional[str] = None,
) -> Figure:
    """Per-layer curves over training, one line per layer, coloured by depth.

    Args:
        curves: a :class:`LayerCurves` (e.g. :func:`similarity_to_final` or
            :func:`similarity_to_previous`) or a store (similarity to the final state).
        x: ``"fraction"`` (of training, default) or ``"step"``.
        cmap: colormap running from the lowest layer to the highest.
        ylabel, title: axis label and title.
    """
    check_choice(x, "x", ("fraction", "step"))
    if isinstance(curves, RepresentationStore):
        curves = similarity_to_final(curves)
    if not isinstance(curves, LayerCurves):
        raise ValueError(f"`curves` must be a LayerCurves or a RepresentationStore, got {type(curves).__name__}.")
    xs = np.asarray(curves.fractions if x == "fraction" else curves.steps, dtype=float)
    n = len(curves.layers)
    colours = colormaps[cmap]
    norm = Normalize(0, max(n - 1, 1))
    fig = Figure(figsize=(6.5, 4.0), layout="constrained")
    ax = fig.subplots()
    for j, name in enumerate(curves.layers):
        ax.plot(xs, curves.values[:, j].numpy(), color=colours(norm(j)), label=name, marker=".", lw=1.5)
    ax.set_xlabel("fraction of training" if x == "fraction" else "training step")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if n <= 12:
        ax.legend(fontsize=7, loc="lower right", title="layer (bottom-up)", title_fontsize=7)
    bar = fig.colorbar(ScalarMappable(norm, colours), ax=ax, label="depth (layer index)")
    bar.set_ticks(np.arange(n) if n <= 12 else np.linspace(0, n - 1, 6).round())
    return fig


def _standardise(v: torch.Tensor) -> np.ndarray:
    v = v.double()
    return ((v - v.mean()) / v.std().clamp_min(1e-30)).numpy()


def plot_aligned_directions(
    aligned: AlignedDirections,
    labels: torch.Tensor,
    *,
    names: Tuple[str, str] = ("network A", "network B"),
) -> Figure:
    """Top neurons versus top SVCCA directions of one layer in two networks (paper's figure).

    Top row: each network's highest-norm neurons (neuron 1 of A with neuron 1 of B, then
    neuron 2 with neuron 2); bottom row: the top two pairs of aligned SVCCA directions.
    Each panel overlays the two networks, each line standardised to zero mean and unit
    variance, over the probe datapoints sorted by class; dashed lines mark the class
    boundaries. The neurons of two networks rarely match; the aligned directions do.

    Args:
        aligned: from :func:`svcca_torch.dynamics.aligned_directions` (``n >= 2``).
        labels: ``(datapoints,)`` the class of every row (for folded conv layers map image
            labels to rows with ``labels[recorder.datapoint_index]``).
        names: the two networks' names for the legend.
    """
    lab = as_tensor(labels, "labels").cpu()
    n = aligned.x_neurons.shape[0]
    if lab.ndim != 1 or lab.shape[0] != n:
        raise ValueError(
            f"`labels` must be (datapoints,) = ({n},), one class per row of the aligned directions; got "
            f"shape {tuple(lab.shape)}. For folded conv layers use labels[recorder.datapoint_index]."
        )
    if aligned.x_neurons.shape[1] < 2 or aligned.x_directions.shape[1] < 2:
        raise ValueError("`aligned` must hold at least 2 neurons and 2 directions (aligned_directions(..., n=2)).")
    order = torch.argsort(lab, stable=True)
    sorted_lab = lab[order]
    boundaries = (torch.nonzero(sorted_lab.diff() != 0).flatten() + 0.5).numpy()
    xs = np.arange(n)
    fig = Figure(figsize=(10.0, 5.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    rows = [
        ("neuron", aligned.x_neurons, aligned.y_neurons, aligned.neuron_correlations,
         [f"{names[0]} #{int(a)}, {names[1]} #{int(b)}" for a, b in zip(aligned.x_neuron_ids, aligned.y_neuron_ids)]),
        ("SVCCA direction", aligned.x_directions, aligned.y_directions, aligned.coefficients,
         ["" for _ in range(2)]),
    ]
    for r, (kind, xa, ya, corr, extra) in enumerate(rows):
        for i in range(2):
            ax = axes[r, i]
            ax.plot(xs, _standardise(xa[order, i]), lw=0.7, alpha=0.8, label=names[0])
            ax.plot(xs, _standardise(ya[order, i]), lw=0.7, alpha=0.8, label=names[1])
            for b in boundaries:
                ax.axvline(b, color="0.3", lw=0.6, ls="--")
            sep = f" ({extra[i]})" if extra[i] else ""
            ax.set_title(f"top {kind} {i + 1}{sep}: corr {float(corr[i]):.2f}", fontsize=9)
            if i == 0:
                ax.set_ylabel("standardised activation")
    for ax in axes[1]:
        ax.set_xlabel("probe datapoints, sorted by class")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    return fig
