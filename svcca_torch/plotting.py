"""Matplotlib figures of learning dynamics and network comparisons.

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot`` (no
global state, no GUI backend needed: it renders with Agg), so it can be saved with
``fig.savefig("dynamics.png")`` or logged to TensorBoard (``writer.add_figure``).
"""
from __future__ import annotations

import math
import textwrap
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from matplotlib import colormaps, rcParams
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

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
#: The curves get a symlog x axis (``xscale="auto"``) when at least this share of their change
#: (summed over layers, point to point) happens in the first :data:`EARLY` of the x range.
EARLY_SHARE = 0.5
EARLY = 0.1
#: What marks a frozen layer in titles, tick labels and legends.
FROZEN_MARK = "\u2744"


def format_fraction(fraction: float) -> str:
    """A fraction of training as a percentage with enough digits to tell early
    checkpoints apart: ``0%``, ``0.12%``, ``2.4%``, ``35%``, ``100%``."""
    p = 100.0 * float(fraction)
    if not math.isfinite(p):
        return "?%"
    if p == 0 or p >= 10:
        return f"{p:.0f}%"
    if p >= 1:
        return f"{p:.1f}%"
    return f"{p:.2g}%"


def checkpoint_label(step: int, fraction: Optional[float]) -> str:
    """``step 48 (5.6%)``: a checkpoint named by its step and its fraction of training."""
    if fraction is None or not math.isfinite(float(fraction)):
        return f"step {int(step)}"
    return f"step {int(step)} ({format_fraction(fraction)})"


def freeze_note(freeze_steps: Optional[Mapping[str, int]], names: Sequence[str], short: Sequence[str],
                step: Optional[int] = None, limit: int = 4) -> str:
    """``❄ frozen: block1 at 16, block2 at 32``: the layers frozen (by ``step`` when given,
    else all), in depth order, with their freeze steps; empty when none."""
    if not freeze_steps:
        return ""
    shown = [(s, int(freeze_steps[n])) for n, s in zip(names, short) if n in freeze_steps
             and (step is None or int(freeze_steps[n]) <= int(step))]
    if not shown:
        return ""
    parts = [f"{s} at {at}" for s, at in shown[:limit]]
    if len(shown) > limit:
        parts.append(f"+{len(shown) - limit} more")
    return f"{FROZEN_MARK} frozen: " + ", ".join(parts)


def early_change(xs: Sequence[float], values: torch.Tensor, early: float = EARLY) -> Optional[float]:
    """The share of the curves' change (``|v[c] - v[c-1]|`` summed over layers) that
    happens at x within the first ``early`` of the x range; None without change."""
    x = np.asarray(xs, dtype=float)
    v = torch.as_tensor(values).double().numpy()
    if x.size < 3 or v.shape[0] != x.size:
        return None
    d = np.abs(np.diff(v, axis=0))
    d = np.where(np.isfinite(d), d, 0.0).sum(axis=1)
    total = float(d.sum())
    if total <= 0:
        return None
    cut = x[0] + early * (x[-1] - x[0])
    return float(d[x[1:] <= cut].sum()) / total


def _set_xscale(ax, xs: np.ndarray, values: torch.Tensor, xscale: str, percent: bool) -> str:
    """Apply ``xscale`` (``"auto"``: symlog when most change is early) and the tick format;
    the scale used."""
    positive = xs[xs > 0]
    if xscale == "auto":
        share = early_change(xs, values)
        xscale = "symlog" if share is not None and share >= EARLY_SHARE and positive.size >= 3 else "linear"
    if xscale == "symlog" and positive.size:
        # step 0 at 0, the first capture one (compressed) linear unit on, then decades
        low, high = float(positive.min()), float(xs.max())
        ax.set_xscale("symlog", linthresh=low, linscale=0.3)
        decades = [10.0 ** k for k in range(math.ceil(math.log10(low)), math.floor(math.log10(high)) + 1)]
        ax.xaxis.set_major_locator(FixedLocator([0.0] + decades))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(left=0.0, right=high * 1.08)
    else:
        xscale = "linear"
    if percent:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:.3g}%" if v >= 0 else ""))
    return xscale

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


def _layer_ticks(ax, names: Sequence[str], axis: str, max_named: int = MAX_NAMED_LAYERS) -> None:
    idx = np.arange(len(names))
    if len(names) <= max_named:
        if axis == "x":
            ax.set_xticks(idx, names, rotation=45, ha="right", rotation_mode="anchor", fontsize="medium")
        else:
            ax.set_yticks(idx, names, fontsize="medium")
    else:
        step = max(1, -(-len(names) // max(2, min(8, max_named))))
        (ax.set_xticks if axis == "x" else ax.set_yticks)(idx[::step])


def _names_that_fit(inches: float) -> int:
    """How many layer names fit along ``inches`` at the current font size (1.2 lines each)."""
    return max(2, min(MAX_NAMED_LAYERS, int(inches * 72 / (1.2 * float(rcParams["font.size"])))))


def plot_learning_dynamics(
    dynamics: Union[LearningDynamics, RepresentationStore],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    *,
    cmap: str = "viridis",
    panel_size: float = 3.0,
    ncols: Optional[int] = None,
    short_names: bool = True,
    checkpoints: Optional[Sequence[int]] = None,
    freeze_steps: Optional[Mapping[str, int]] = None,
) -> Figure:
    """The paper's learning-dynamics grid: one heatmap per chosen moment of training.

    Panel ``c`` shows the SVCCA similarity between layer ``i`` at the end of training
    (x axis) and layer ``j`` at that moment (y axis), origin bottom-left (lowest layers at
    the bottom-left corner), all panels on one colour scale 0..1 with a shared colour bar.
    Panels are titled with their step and fraction of training (:func:`checkpoint_label`);
    tick labels sit on the outer panels only.

    Args:
        dynamics: a :class:`LearningDynamics` or a :class:`RepresentationStore` (computed
            for the needed checkpoints only).
        fractions: fractions of training to show; each panel uses the stored checkpoint
            nearest to it; a checkpoint nearest to several of them is shown once (a run with
            captures at its start and end only gets two panels, not the same two twice).
        cmap: a matplotlib colormap name.
        panel_size: inches per panel.
        ncols: panels per row (default: all in one row, as in the paper; 2 gives the 2x2
            grid that suits a TensorBoard card).
        short_names: label the axes with :func:`short_layer_names` (the dropped prefixes
            are named under the panels).
        checkpoints: indices of the checkpoints to show instead of ``fractions`` (e.g. where
            the curves change: :func:`svcca_torch.board.grid_checkpoints`).
        freeze_steps: ``{layer: step it was frozen}``: a layer frozen by a panel's checkpoint
            gets :data:`FROZEN_MARK` on that panel's y tick, and the freeze steps are listed
            under the grid.
    """
    if checkpoints is None:
        if not fractions:
            raise ValueError("`fractions` must name at least one moment of training, e.g. (0, 0.35, 0.75, 1).")
        fractions = [check_fraction(f, "fractions[i]", low_inclusive=True, high_inclusive=True) for f in fractions]
    if isinstance(dynamics, RepresentationStore):
        if checkpoints is not None:
            raise ValueError("`checkpoints` (indices) needs a LearningDynamics; pass `fractions` with a store.")
        cks = [dynamics.nearest(f) for f in fractions]
        unique = sorted({c.step for c in cks})
        dynamics = learning_dynamics(dynamics, unique)
    if not isinstance(dynamics, LearningDynamics):
        raise ValueError(f"`dynamics` must be a LearningDynamics or a RepresentationStore, got {type(dynamics).__name__}.")
    if ncols is not None:
        ncols = check_positive_int(ncols, "ncols")
    if checkpoints is not None:
        n = len(dynamics.steps)
        bad = [c for c in checkpoints if not isinstance(c, int) or not 0 <= c < n]
        if not checkpoints or bad:
            raise ValueError(f"`checkpoints` must be indices of the {n} checkpoints; got {list(checkpoints)}.")
        picks = sorted(set(checkpoints))
    else:
        picks = list(dict.fromkeys(dynamics.nearest(f) for f in fractions))
    ncols = len(picks) if ncols is None else min(ncols, len(picks))
    nrows = -(-len(picks) // ncols)
    names = short_layer_names(dynamics.layers) if short_names else list(dynamics.layers)
    fig = Figure(figsize=(panel_size * ncols + 0.4 * (ncols - 1) + 2.2, (panel_size + 0.5) * nrows + 1.6),
                 layout="constrained")
    fig.get_layout_engine().set(wspace=0.15)  # panel titles apart
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
        ax.set_title(checkpoint_label(dynamics.steps[c], dynamics.fractions[c])
                     + _frozen_title(freeze_steps, dynamics.layers, names, dynamics.steps[c]), fontsize="medium")
        bottom = k // ncols == nrows - 1 or k + ncols >= len(picks)
        fit = _names_that_fit(panel_size)
        _layer_ticks(ax, names, "x", fit)
        _layer_ticks(ax, _frozen_labels(names, dynamics.layers, freeze_steps, dynamics.steps[c]), "y", fit)
        if len(names) <= fit:  # upright names take the least height under a panel
            ax.tick_params(axis="x", labelrotation=90)
        ax.tick_params(labelbottom=bottom, labelleft=k % ncols == 0)
    # one label per axis for all panels: the panels keep the room
    fig.supxlabel("layer at end of training", fontsize="medium")
    fig.supylabel("layer at this checkpoint", fontsize="medium")
    fig.colorbar(image, ax=axes[: len(picks)], shrink=0.8, label="SVCCA similarity")
    notes = [freeze_note(freeze_steps, dynamics.layers, names)]
    if short_names:
        notes.append(_prefix_note(dynamics.layers, names).strip(" ()").replace("names", "layer names", 1))
    notes = [textwrap.fill(n, int(fig.get_figwidth() * 72 / (0.55 * float(rcParams["font.size"]) * 0.83)),
                           break_on_hyphens=False) for n in notes if n]
    if notes:
        fig.suptitle("\n".join(notes), fontsize="small", color="0.3")
    return fig


def _frozen_title(freeze_steps: Optional[Mapping[str, int]], layers: Sequence[str], names: Sequence[str],
                  step: int) -> str:
    """``\n❄ block1`` or ``\n❄ block1-block4`` when layers are frozen by ``step`` (bottom-up:
    the lowest and the highest of them)."""
    frozen = [s for n, s in zip(layers, names) if freeze_steps and n in freeze_steps
              and int(freeze_steps[n]) <= int(step)]
    if not frozen:
        return ""
    return f"\n{FROZEN_MARK} {frozen[0]}" if len(frozen) == 1 else f"\n{FROZEN_MARK} {frozen[0]}-{frozen[-1]}"


def _frozen_labels(names: Sequence[str], layers: Sequence[str], freeze_steps: Optional[Mapping[str, int]],
                   step: int) -> List[str]:
    """Tick labels with :data:`FROZEN_MARK` on the layers frozen by ``step``."""
    if not freeze_steps:
        return list(names)
    return [f"{FROZEN_MARK}{s}" if n in freeze_steps and int(freeze_steps[n]) <= int(step) else s
            for s, n in zip(names, layers)]


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
    frozen_layers: Sequence[str] = (),
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
        frozen_layers: ``y_layers`` frozen at the y axis's checkpoint: :data:`FROZEN_MARK`
            on their tick labels.
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
    _layer_ticks(ax, [f"{FROZEN_MARK}{s}" if n in frozen_layers else s for s, n in zip(ys, y_layers)], "y")
    ax.set_xlabel(xlabel, fontsize="medium")
    ax.set_ylabel(ylabel, fontsize="medium")
    if title:
        ax.set_title(title, fontsize="large")
    fig.colorbar(image, ax=ax, shrink=0.9, label="SVCCA similarity")
    if short_names:
        _shortening_note(fig, list(x_layers) + [n for n in y_layers if n not in x_layers], xs + [
            s for n, s in zip(y_layers, ys) if n not in x_layers])
    # titles and axis labels differ by step numbers only: same heights, same layout
    _reuse_layout(fig, ("similarity_matrix", tuple(x_layers), tuple(y_layers), short_names, bool(title), title.count("\n"),
                        bool(xlabel), bool(ylabel), annotate, tuple(frozen_layers)))
    return fig


def plot_convergence(
    curves: Union[LayerCurves, RepresentationStore],
    *,
    x: str = "fraction",
    cmap: str = "viridis",
    ylabel: str = "SVCCA similarity to final state",
    title: Optional[str] = None,
    size: Tuple[float, float] = (8.0, 5.4),
    xscale: str = "auto",
    freeze_steps: Optional[Mapping[str, int]] = None,
) -> Figure:
    """Per-layer curves over training, one line per layer, coloured by depth.

    Up to :data:`MAX_LEGEND_LAYERS` layers a legend below the axes (lowest layer first,
    :func:`short_layer_names`, the dropped prefixes named under it) tells the layers apart; with more layers a depth colour
    bar replaces it. Font sizes are relative to ``rcParams["font.size"]`` (raise it in a
    ``matplotlib.rc_context`` for small displays, as :mod:`svcca_torch.board` does).

    Args:
        curves: a :class:`LayerCurves` (e.g. :func:`similarity_to_final` or
            :func:`similarity_to_previous`) or a store (similarity to the final state).
        x: ``"fraction"`` (of training, default, ticks in percent) or ``"step"``.
        cmap: colormap running from the lowest layer to the highest.
        ylabel, title: axis label and title.
        size: inches (at 100 dpi, 8 in = 800 px).
        xscale: ``"auto"`` (default): a symlog x axis (0, then decades) when at least
            :data:`EARLY_SHARE` of the curves' change happens in the first :data:`EARLY` of
            the x range, as when layers settle early, else linear; or ``"linear"``,
            ``"symlog"``.
        freeze_steps: ``{layer: step it was frozen}``: a dotted vertical line in the
            layer's colour at that step, a :data:`FROZEN_MARK` on its curve there, and the
            step in its legend entry (after its freeze a layer's curve is flat by
            construction).
    """
    check_choice(x, "x", ("fraction", "step"))
    check_choice(xscale, "xscale", ("auto", "linear", "symlog"))
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
    frozen = {name: int(st) for name, st in (freeze_steps or {}).items() if name in curves.layers}
    for j, name in enumerate(curves.layers):
        label = short[j] if name not in frozen else f"{short[j]} ({FROZEN_MARK} at step {frozen[name]})"
        ax.plot(xs, curves.values[:, j].numpy(), color=colours(norm(j)), label=label, marker=".", lw=1.8)
    used = _set_xscale(ax, xs, curves.values, xscale, percent=x == "fraction")
    for j, name in enumerate(curves.layers):
        if name in frozen:
            at = _step_to_x(frozen[name], curves.steps, curves.fractions) if x == "fraction" else float(frozen[name])
            ax.axvline(at, color=colours(norm(j)), ls=":", lw=1.4, zorder=1)
            ax.plot([at], [1.0], marker="$" + FROZEN_MARK + "$", ms=14, color=colours(norm(j)), ls="none",
                    clip_on=False, zorder=4)
    xlabel = "fraction of training" if x == "fraction" else "training step"
    ax.set_xlabel(xlabel + (" (symlog: 0, then decades)" if used == "symlog" else ""), fontsize="medium")
    ax.set_ylabel(ylabel, fontsize="medium")
    ax.set_ylim(0.0, 1.04)
    ax.tick_params(labelsize="medium")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize="large")
    if n <= MAX_LEGEND_LAYERS:
        # below the axes, where it covers no curve; depth order, row by row
        handles, labels = ax.get_legend_handles_labels()
        handles, labels = handles[:n], labels[:n]
        ncols = min(2 if frozen else 3, n)
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
        notes = [freeze_note(frozen, curves.layers, short), _prefix_note(curves.layers, short).strip(" ()").replace(
            "names", "layer names", 1)]
        notes = [t for t in notes if t]
        if notes:
            fig.supxlabel("\n".join(notes), fontsize="small", color="0.35")
    return fig


def _step_to_x(step: int, steps: Sequence[int], fractions: Sequence[float]) -> float:
    """A training step as a fraction of training, from the checkpoints' (step, fraction) pairs."""
    pairs = [(float(s), float(f)) for s, f in zip(steps, fractions) if math.isfinite(float(f))]
    if not pairs:
        return float("nan")
    return float(np.interp(float(step), [p[0] for p in pairs], [p[1] for p in pairs],
                           right=pairs[-1][1] * float(step) / max(pairs[-1][0], 1.0)))


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
