"""Matplotlib figures of learning dynamics and network comparisons.

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot`` (no
global state, no GUI backend needed: it renders with Agg), so it can be saved with
``fig.savefig("dynamics.png")`` or logged to TensorBoard (``writer.add_figure``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from matplotlib import colormaps, rcParams
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure

from .dynamics import (
    AlignedDirections,
    LayerCurves,
    LearningDynamics,
    learning_dynamics,
    similarity_to_final,
)
from .store import RepresentationStore
from .utils.validation import as_tensor, check_choice, check_fraction, check_positive_int

#: The paper's snapshots: start, 35%, 75% and end of training.
DEFAULT_FRACTIONS = (0.0, 0.35, 0.75, 1.0)
#: Above this many layers the axes show indices instead of names.
MAX_NAMED_LAYERS = 16
#: Above this many layers the curves get a depth colour bar instead of a legend.
MAX_LEGEND_LAYERS = 12

# Constrained layout is over half the time to draw a heatmap (~0.15 s of ~0.25 s on one CPU
# thread); a run draws many heatmaps of the same layers, size and labels (live images, the
# end-of-run ones). The first one drawn computes the layout, :func:`remember_layout` keeps
# its axes positions and later figures of the same kind are placed at them, unlaid-out.
_LAYOUTS: "OrderedDict[Tuple[Any, ...], List[Any]]" = OrderedDict()
_MAX_LAYOUTS = 32


def _reuse_layout(fig: Figure, key: Tuple[Any, ...]) -> None:
    """Place ``fig``'s axes where the first drawn figure of kind ``key`` had them, or mark
    ``fig`` so that :func:`remember_layout` keeps its positions once it is drawn."""
    key = key + (float(rcParams["font.size"]), tuple(fig.get_size_inches()))
    if key in _LAYOUTS:
        _LAYOUTS.move_to_end(key)
        fig.set_layout_engine("none")
        for ax, pos in zip(fig.axes, _LAYOUTS[key]):
            ax.set_position(pos)
    else:
        fig._svcca_layout_key = key  # type: ignore[attr-defined]


def remember_layout(fig: Figure) -> None:
    """After ``fig`` was drawn with its constrained layout, keep its axes positions for the
    next figure of its kind (see :func:`plot_similarity_matrix`)."""
    key = getattr(fig, "_svcca_layout_key", None)
    if key is not None and key not in _LAYOUTS:
        _LAYOUTS[key] = [ax.get_position(original=False).frozen() for ax in fig.axes]
        while len(_LAYOUTS) > _MAX_LAYOUTS:
            _LAYOUTS.popitem(last=False)


def short_layer_names(names: Sequence[str]) -> List[str]:
    """Shortest distinct display names: leading dotted components that add nothing are dropped.

    Each name keeps its shortest dotted suffix that no other name ends with, extended while
    it would start with a bare index (``layer1.0``, never ``0``), e.g.
    ``["net.features.block1", "net.fc1", "net.fc"]`` -> ``["block1", "fc1", "fc"]`` and
    ``["net.layer1.0.conv1", "net.layer2.0.conv1"]`` -> ``["layer1.0.conv1", "layer2.0.conv1"]``.
    Names that are not unique to begin with are returned unchanged.
    """
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        return list(names)
    parts = [n.split(".") for n in names]
    out = []
    for i, p in enumerate(parts):
        for k in range(1, len(p) + 1):
            suffix = p[-k:]
            if suffix[0].isdigit() and k < len(p):
                continue
            if not any(len(q) >= k and q[-k:] == suffix for j, q in enumerate(parts) if j != i):
                out.append(".".join(suffix))
                break
        else:
            out.append(names[i])
    return out


def _dropped_prefixes(names: Sequence[str], short: Sequence[str]) -> List[str]:
    return sorted({n[: len(n) - len(s)] for n, s in zip(names, short) if n != s})


def _prefix_note(names: Sequence[str], short: Sequence[str]) -> str:
    dropped = _dropped_prefixes(names, short)
    if not dropped:
        return ""
    return " (names without the prefix " + ", ".join(repr(d) for d in dropped[:4]) + (
        ", ...)" if len(dropped) > 4 else ")")


def _shortening_note(fig: Figure, names: Sequence[str], short: Sequence[str]) -> None:
    note = _prefix_note(names, short)
    if note:
        fig.supxlabel(note.strip(" ()").replace("names", "layer names", 1), fontsize="small", color="0.35")


def _layer_ticks(ax, names: Sequence[str], axis: str) -> None:
    idx = np.arange(len(names))
    if len(names) <= MAX_NAMED_LAYERS:
        if axis == "x":
            ax.set_xticks(idx, names, rotation=45, ha="right", rotation_mode="anchor", fontsize="medium")
        else:
            ax.set_yticks(idx, names, fontsize="medium")
    else:
        step = max(1, len(names) // 8)
        (ax.set_xticks if axis == "x" else ax.set_yticks)(idx[::step])


def plot_learning_dynamics(
    dynamics: Union[LearningDynamics, RepresentationStore],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    *,
    cmap: str = "viridis",
    panel_size: float = 3.0,
    ncols: Optional[int] = None,
    short_names: bool = True,
) -> Figure:
    """The paper's learning-dynamics grid: one heatmap per chosen moment of training.

    Panel ``c`` shows the SVCCA similarity between layer ``i`` at the end of training
    (x axis) and layer ``j`` at that moment (y axis), origin bottom-left (lowest layers at
    the bottom-left corner), all panels on one colour scale 0..1 with a shared colour bar.

    Args:
        dynamics: a :class:`LearningDynamics` or a :class:`RepresentationStore` (computed
            for the needed checkpoints only).
        fractions: fractions of training to show; each panel uses the stored checkpoint
            nearest to it (its actual fraction and step are in the title); a checkpoint
            nearest to several of them is shown once (a run with captures at its start and
            end only gets two panels, not the same two twice).
        cmap: a matplotlib colormap name.
        panel_size: inches per panel.
        ncols: panels per row (default: all in one row, as in the paper; 2 gives the 2x2
            grid that suits a TensorBoard card).
        short_names: label the axes with :func:`short_layer_names` (the dropped prefixes
            are named under the panels).
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
    if ncols is not None:
        ncols = check_positive_int(ncols, "ncols")
    picks = list(dict.fromkeys(dynamics.nearest(f) for f in fractions))
    ncols = len(picks) if ncols is None else min(ncols, len(picks))
    nrows = -(-len(picks) // ncols)
    names = short_layer_names(dynamics.layers) if short_names else list(dynamics.layers)
    fig = Figure(figsize=(panel_size * ncols + 1.2, (panel_size + 0.9) * nrows + 0.3), layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(picks):]:
        ax.set_axis_off()
    image = None
    for k, (ax, c) in enumerate(zip(axes, picks)):
        # matrices[c, i, j]: i = layer at the end (x), j = layer at checkpoint c (y)
        data = dynamics.matrices[c].T.numpy()
        image = ax.imshow(np.ma.masked_invalid(data), origin="lower", vmin=0.0, vmax=1.0, cmap=cmap,
                          interpolation="nearest", aspect="equal")
        ax.set_title(f"{100 * dynamics.fractions[c]:.0f}% (step {dynamics.steps[c]})", fontsize="large")
        if k // ncols == nrows - 1 or k + ncols >= len(picks):
            ax.set_xlabel("layer at end of training", fontsize="medium")
        _layer_ticks(ax, names, "x")
        _layer_ticks(ax, names, "y")
        if k % ncols == 0:
            ax.set_ylabel("layer at this checkpoint", fontsize="medium")
    fig.colorbar(image, ax=axes[: len(picks)], shrink=0.8, label="SVCCA similarity")
    if short_names:
        _shortening_note(fig, dynamics.layers, names)
    return fig


def plot_similarity_matrix(
    matrix: torch.Tensor,
    x_layers: Sequence[str],
    y_layers: Optional[Sequence[str]] = None,
    *,
    title: str = "",
    xlabel: str = "layer",
    ylabel: str = "layer",
    cmap: str = "viridis",
    size: Tuple[float, float] = (7.2, 5.4),
    short_names: bool = True,
    annotate: Optional[bool] = None,
) -> Figure:
    """One layers x layers similarity heatmap (e.g. each layer now against each layer at the
    previous capture), origin bottom-left, colour scale 0..1.

    Args:
        matrix: ``(len(x_layers), len(y_layers))``; ``matrix[i, j]`` is drawn at ``x = i``,
            ``y = j`` (NaN cells are left blank).
        x_layers, y_layers: layer names along each axis, bottom-up (``y_layers`` defaults to
            ``x_layers``).
        title, xlabel, ylabel: text of the figure.
        size: inches (at 100 dpi, 720 x 540 px: landscape, as TensorBoard's cards are).
        short_names: label the axes with :func:`short_layer_names`.
        annotate: write each value in its cell (default: when at most 10 layers per axis).
    """
    m = as_tensor(matrix, "matrix").detach().cpu().double()
    y_layers = list(x_layers) if y_layers is None else list(y_layers)
    if m.ndim != 2 or tuple(m.shape) != (len(x_layers), len(y_layers)):
        raise ValueError(f"`matrix` must be (len(x_layers), len(y_layers)) = ({len(x_layers)}, {len(y_layers)}), "
                         f"got shape {tuple(m.shape)}.")
    xs = short_layer_names(x_layers) if short_names else list(x_layers)
    ys = short_layer_names(y_layers) if short_names else list(y_layers)
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    data = m.T.numpy()
    image = ax.imshow(np.ma.masked_invalid(data), origin="lower", vmin=0.0, vmax=1.0, cmap=cmap,
                      interpolation="nearest", aspect="auto")
    if annotate is None:
        annotate = max(len(xs), len(ys)) <= 10
    if annotate:
        for (j, i), v in np.ndenumerate(data):
            if np.isfinite(v):
                ax.text(i, j, f"{v:.2f}", ha="center", va="center", fontsize="small",
                        color="black" if v > 0.6 else "white")
    _layer_ticks(ax, xs, "x")
    _layer_ticks(ax, ys, "y")
    ax.set_xlabel(xlabel, fontsize="medium")
    ax.set_ylabel(ylabel, fontsize="medium")
    if title:
        ax.set_title(title, fontsize="large")
    fig.colorbar(image, ax=ax, shrink=0.9, label="SVCCA similarity")
    if short_names:
        _shortening_note(fig, list(x_layers) + [n for n in y_layers if n not in x_layers], xs + [
            s for n, s in zip(y_layers, ys) if n not in x_layers])
    # titles and axis labels differ by step numbers only: same heights, same layout
    _reuse_layout(fig, ("similarity_matrix", tuple(x_layers), tuple(y_layers), short_names, bool(title),
                        bool(xlabel), bool(ylabel), annotate))
    return fig


def plot_convergence(
    curves: Union[LayerCurves, RepresentationStore],
    *,
    x: str = "fraction",
    cmap: str = "viridis",
    ylabel: str = "SVCCA similarity to final state",
    title: Optional[str] = None,
    size: Tuple[float, float] = (8.0, 5.4),
) -> Figure:
    """Per-layer curves over training, one line per layer, coloured by depth.

    Up to :data:`MAX_LEGEND_LAYERS` layers a legend below the axes (lowest layer first,
    :func:`short_layer_names`, the dropped prefixes named under it) tells the layers apart; with more layers a depth colour
    bar replaces it. Font sizes are relative to ``rcParams["font.size"]`` (raise it in a
    ``matplotlib.rc_context`` for small displays, as :mod:`svcca_torch.board` does).

    Args:
        curves: a :class:`LayerCurves` (e.g. :func:`similarity_to_final` or
            :func:`similarity_to_previous`) or a store (similarity to the final state).
        x: ``"fraction"`` (of training, default) or ``"step"``.
        cmap: colormap running from the lowest layer to the highest.
        ylabel, title: axis label and title.
        size: inches (at 100 dpi, 8 in = 800 px).
    """
    check_choice(x, "x", ("fraction", "step"))
    if isinstance(curves, RepresentationStore):
        curves = similarity_to_final(curves)
    if not isinstance(curves, LayerCurves):
        raise ValueError(f"`curves` must be a LayerCurves or a RepresentationStore, got {type(curves).__name__}.")
    xs = np.asarray(curves.fractions if x == "fraction" else curves.steps, dtype=float)
    n = len(curves.layers)
    colours = colormaps[cmap]
    # the top 15% of viridis is pale yellow, hard to see on white: the deepest layer stops below it
    norm = Normalize(0, max(n - 1, 1) / 0.85)
    short = short_layer_names(curves.layers)
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    for j, name in enumerate(curves.layers):
        ax.plot(xs, curves.values[:, j].numpy(), color=colours(norm(j)), label=short[j], marker=".", lw=1.8)
    ax.set_xlabel("fraction of training" if x == "fraction" else "training step", fontsize="medium")
    ax.set_ylabel(ylabel, fontsize="medium")
    ax.set_ylim(0.0, 1.02)
    ax.tick_params(labelsize="medium")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize="large")
    if n <= MAX_LEGEND_LAYERS:
        # below the axes, where it covers no curve; depth order, row by row
        handles, labels = ax.get_legend_handles_labels()
        ncols = min(3, n)
        rows = -(-n // ncols)
        order = [r * ncols + c for c in range(ncols) for r in range(rows) if r * ncols + c < n]
        fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside lower center",
                   ncols=ncols, fontsize="small", title="layer, lowest first" + _prefix_note(curves.layers, short),
                   title_fontsize="small", frameon=False)
    else:
        shown = ListedColormap(colours(np.linspace(0.0, 0.85, 256)))
        bar = fig.colorbar(ScalarMappable(Normalize(0, n - 1), shown), ax=ax,
                           label="depth (layer index, 0 = lowest)")
        bar.set_ticks(np.linspace(0, n - 1, 6).round())
        _shortening_note(fig, curves.layers, short)
    return fig


def _standardise(v: torch.Tensor) -> np.ndarray:
    v = v.double()
    return ((v - v.mean()) / v.std().clamp_min(1e-30)).numpy()


def plot_aligned_directions(
    aligned: AlignedDirections,
    labels: torch.Tensor,
    *,
    names: Tuple[str, str] = ("network A", "network B"),
    layer: Optional[str] = None,
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
        layer: the compared layer's name, shown in the figure's title.
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
    axes[0, 0].legend(fontsize=8, loc="upper right")
    what = f"layer {layer}" if layer else "one layer"
    fig.suptitle(f"{what} in two networks: top neurons (top row) vs top SVCCA directions (bottom row)", fontsize=11)
    return fig
