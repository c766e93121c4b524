"""TensorBoard views of SVCCA learning dynamics, while training runs and at its end.

Plain PyTorch (never imports Lightning): :class:`BoardLogger` takes plain data (steps,
fractions of training, ``{layer: similarity}`` dicts, layer bases, a
:class:`~svcca_torch.dynamics.LearningDynamics`) and writes through any object with
``add_image``, ``add_scalar``, ``add_text`` and ``add_custom_scalars``, e.g.
``torch.utils.tensorboard.SummaryWriter`` or Lightning's ``TensorBoardLogger.experiment``.

TensorBoard keeps at most 10 images per tag by default and picks them by reservoir
sampling once more arrive, so the images shown would be a random draw. Every image tag
written here therefore receives at most ``max_images`` (10) images, in increasing step
order, chosen in advance: what TensorBoard shows is exactly what was chosen.

Tags, all under ``<name>/``::

    <name>/live/to_previous_matrix    image: layers x layers SVCCA, previous capture vs this one
    <name>/live/to_previous_curves    image: every layer's similarity to its previous capture so far
    <name>/dynamics/grid              image: 2x2 heatmaps where the curves change (end of training)
    <name>/dynamics/to_final_matrix   images: layers x layers vs the final network, chosen captures
    <name>/dynamics/to_final_curves   image: similarity to the final state, coloured by depth
    <name>/freeze/frozen_groups       scalar (count) at every capture and freeze window from step 0
    <name>/freeze/backward_flops_saved  scalar (fraction of one backward pass), as often
    <name>/freeze/events, <name>/layers  text: what was frozen when, and why; names -> layers
    <name>/to_previous                with ``layer_scalars=True``: scalar per layer per capture
    <name>/freeze_signal              :meth:`BoardLogger.log_signal` (optional): per judged group

Everything is meant to read right at TensorBoard's default settings (smoothing 0.6,
outliers ignored). The per-layer curves are images (one chart, a line per layer coloured by
depth, every point, a symlog x axis when most change is early, each freeze marked), not
scalar charts: TensorBoard smooths a scalar over points, so on front-loaded captures the
smoothing stretches the last change across the sparse late captures, and its outlier cut
leaves the lowest 5% of a chart's points (the first comparisons) below the frame. The step
functions (the freeze count and fraction) are scalars logged at every capture and freeze
window, not only where they change, so the smoothing follows them closely. Images are
titled with the step and a fraction of training precise enough to tell early captures
apart; frozen layers carry their freeze step (\u2744). Custom Scalars gets a category only
once it has data. ``layer_scalars=True`` adds the per-layer similarity as scalars: every
layer writes ``<name>/to_previous`` to its own run, ``<log_dir>/<name>/NN_short`` (``NN``
the depth, zero-padded, so runs sort bottom-up), which TensorBoard colours apart (it colours
by run, never by tag): one chart, a line per layer (a writer that is not a
``torch.utils.tensorboard.SummaryWriter`` gets one tag per layer, ``<name>/to_previous/NN_short``).
"""
from __future__ import annotations

import math
import os
import textwrap
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave

from .dynamics import LayerCurves, LearningDynamics
from .functional.matrix import similarity_matrix
from .functional.svcca import ReducedBasis, svd_reduce
from .plotting import (
    DEFAULT_FRACTIONS,
    checkpoint_label,
    freeze_note,
    plot_convergence,
    plot_learning_dynamics,
    plot_similarity_matrix,
    remember_layout,
    short_layer_names,
)
from .utils.validation import check_bool, check_fraction, check_keep, check_positive_int

__all__ = ["BoardLogger", "LIVE_FRACTIONS", "select_checkpoints", "full_checkpoints", "grid_checkpoints",
           "figure_to_array"]

#: Fractions of training after which the live images are refreshed (besides the second
#: capture, the first with a previous one, and the last capture), front-loaded as the
#: default capture schedule is; a point passed while no layer moved since the last image is
#: skipped (its slot stays for a later change).
LIVE_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75)
#: Panels of the end-of-run grid image (2x2: legible in a TensorBoard Time Series card).
GRID_PANELS = 4
#: The grid image's fonts, relative to ``font_size`` (its four panels share one card).
GRID_FONT_SCALE = 1.2
#: TensorBoard's default number of images kept per tag (``--samples_per_plugin images=10``).
TENSORBOARD_IMAGES_PER_TAG = 10

Bases = Mapping[str, Union[torch.Tensor, ReducedBasis]]

# TensorBoard shows one custom-scalars layout per run (the last written): every BoardLogger on
# one writer adds its categories to that writer's layout, so two loggers (names) both show.
_LAYOUTS: "weakref.WeakKeyDictionary[Any, Dict[str, Any]]" = weakref.WeakKeyDictionary()


def figure_to_array(fig: Figure, dpi: int = 100) -> np.ndarray:
    """Render a matplotlib figure with Agg to an ``(height, width, 3)`` uint8 RGB array."""
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    remember_layout(fig)
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest cell difference of two similarity matrices (a cell finite in one, NaN in the other counts 1)."""
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if bool((fa != fb).any()):
        return 1.0
    both = fa & fb
    return float((a[both] - b[both]).abs().max()) if bool(both.any()) else 0.0


def select_checkpoints(
    matrices: torch.Tensor,
    fractions: Sequence[float],
    *,
    max_images: int = TENSORBOARD_IMAGES_PER_TAG,
    anchors: Sequence[float] = (),
    min_change: float = 0.01,
) -> List[int]:
    """The checkpoints worth an image each: at most ``max_images``, sorted, no two alike.

    Always the first (step 0) and the last checkpoint; then the one nearest each of
    ``anchors`` (e.g. the paper's 0/35/75/100%; none by default) unless its values are
    within ``min_change`` of one already chosen; then, while room is left, the checkpoint
    farthest from every chosen one (largest difference of any value), i.e. where the values
    change most, until every remaining one is within ``min_change`` of a chosen one.

    Args:
        matrices: ``(checkpoints, layers, layers)`` (e.g. :attr:`LearningDynamics.matrices`)
            or the cheap ``(checkpoints, layers)`` to-final curves
            (:meth:`LearningDynamics.to_final` of ``learning_dynamics(store, full=[])``):
            one row of values per checkpoint, compared cell by cell.
        fractions: the fraction of training of each checkpoint.
        max_images: the most checkpoints returned (at least 2).
        anchors: fractions of training to include first (e.g. ``DEFAULT_FRACTIONS``).
        min_change: two checkpoints whose values all differ by at most this count as alike
            (0.01 is below what a 0..1 colour scale shows).
    """
    m = torch.as_tensor(matrices).detach().cpu().double()
    n = m.shape[0] if m.ndim else 0
    if m.ndim not in (2, 3) or len(fractions) != n:
        raise ValueError(f"`matrices` must be (checkpoints, layers, layers) or (checkpoints, layers) with one "
                         f"fraction per checkpoint; got shape {tuple(m.shape)} and {len(fractions)} fractions.")
    max_images = check_positive_int(max_images, "max_images", minimum=2)  # the first and the last
    min_change = check_fraction(min_change, "min_change", low_inclusive=True, high_inclusive=True)
    if n == 0:
        return []
    chosen: List[int] = [0] if n == 1 else [0, n - 1]
    for f in anchors:
        c = min(range(n), key=lambda i: abs(fractions[i] - f))
        if len(chosen) < max_images and all(_distance(m[c], m[s]) > min_change for s in chosen):
            chosen.append(c)
    while len(chosen) < max_images:
        rest = [c for c in range(n) if c not in chosen]
        if not rest:
            break
        gaps = [min(_distance(m[c], m[s]) for s in chosen) for c in rest]
        best = int(np.argmax(gaps))
        if gaps[best] <= min_change:
            break
        chosen.append(rest[best])
    return sorted(chosen)


def full_checkpoints(
    to_final: Union[LayerCurves, torch.Tensor],
    fractions: Optional[Sequence[float]] = None,
    *,
    max_images: int = TENSORBOARD_IMAGES_PER_TAG,
    grid: Sequence[float] = (),
    min_change: float = 0.01,
) -> List[int]:
    """The checkpoints that need a full layers x layers matrix, chosen from cheap data.

    The heatmaps :meth:`BoardLogger.log_final` shows (:func:`select_checkpoints` on the
    to-final curves: step 0, the end, then where the curves change most; at most
    ``max_images``), sorted; the grid image's panels are chosen among them. With ``grid``
    fractions (the paper's ``DEFAULT_FRACTIONS``) those are chosen first and the checkpoint
    nearest each is added (the paper's grid figure). Pass the result's steps as ``full=`` to
    :func:`~svcca_torch.dynamics.learning_dynamics`, so that only these (about 10 of any
    number of captures) cost a full matrix.

    Args:
        to_final: the ``(checkpoints, layers)`` similarity of each layer to its own final
            state, e.g. ``learning_dynamics(store, full=[]).curves()``.
        fractions: fraction of training per checkpoint (taken from ``to_final`` when it is a
            :class:`LayerCurves`).
    """
    if isinstance(to_final, LayerCurves):
        values, fractions = to_final.values, to_final.fractions if fractions is None else fractions
    else:
        values = torch.as_tensor(to_final)
    if fractions is None:
        raise ValueError("`fractions` is needed when `to_final` is a tensor (one fraction of training per row).")
    if values.ndim != 2:
        raise ValueError(f"`to_final` must be (checkpoints, layers), got shape {tuple(values.shape)}.")
    grid = [check_fraction(f, "grid[i]", low_inclusive=True, high_inclusive=True) for f in grid]
    chosen = set(select_checkpoints(values, fractions, max_images=max_images, anchors=grid, min_change=min_change))
    if len(fractions):
        chosen |= {min(range(len(fractions)), key=lambda i: abs(fractions[i] - f)) for f in grid}
    return sorted(chosen)


def grid_checkpoints(
    dynamics: LearningDynamics,
    *,
    fractions: Optional[Sequence[float]] = None,
    panels: int = GRID_PANELS,
    candidates: Optional[Sequence[int]] = None,
    min_change: float = 0.01,
) -> List[int]:
    """The checkpoints of the grid image (indices into ``dynamics.steps``).

    By default where the curves change: :func:`select_checkpoints` on the full matrices of
    ``candidates`` (default: the checkpoints with a full matrix), at most ``panels`` (step
    0, the end, then the checkpoints farthest from those chosen). With ``fractions`` (e.g.
    the paper's ``DEFAULT_FRACTIONS``, 0/35/75/100%) the full checkpoint nearest each,
    each once.
    """
    panels = check_positive_int(panels, "panels", minimum=2)
    if fractions is not None:
        return sorted(dict.fromkeys(dynamics.nearest(check_fraction(f, "fractions[i]", low_inclusive=True,
                                                                      high_inclusive=True)) for f in fractions))
    cands = sorted(candidates if candidates is not None else (
        range(len(dynamics.steps)) if dynamics.full is None else dynamics.full))
    if not cands:
        raise ValueError("no checkpoint has a full matrix: pass `full` to learning_dynamics.")
    picked = select_checkpoints(dynamics.matrices[cands], [dynamics.fractions[c] for c in cands],
                                max_images=panels, min_change=min_change)
    return [cands[i] for i in picked]


def _tag_safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name) or "layer"


class BoardLogger:
    """Writes SVCCA learning dynamics to TensorBoard under ``<name>/``, with bounded image tags.

    Call :meth:`log_capture` after every capture (step 0 included), :meth:`log_freeze` at
    every capture and freeze window when freeze training is on (:meth:`log_signal` for the
    adaptive signal), :meth:`log_final` once training ends and :meth:`close` last.
    Each image tag gets at most ``max_images`` images, in increasing step order, so
    TensorBoard's reservoir (10 per tag by default) keeps every one of them.

    Live images (``<name>/live/...``) are drawn at the second capture (the first that has a
    previous one), at the first capture past each of ``live_fractions`` (or, when the
    fraction of training is unknown, at the 2nd, 4th, 8th, ... capture) at which some layer
    moved since the last image (a similarity to the previous capture below ``1 -
    min_change``), and at the capture marked ``final=True``; one slot is kept for that last
    one. Heatmap titles name the step, the fraction of training and the layers frozen by
    then with their freeze steps (from :meth:`log_freeze`); curves mark each freeze.

    Args:
        writer: a ``SummaryWriter`` (or anything with ``add_image``, ``add_scalar``,
            ``add_text`` and ``add_custom_scalars``).
        name: the first component of every tag (two loggers with different names coexist).
        layers: the recorded layer names, bottom-up (the store's order).
        total_steps: the planned number of training steps, used for the fraction of
            training when :meth:`log_capture` is given none.
        max_images: images per image tag (TensorBoard keeps 10 by default; raise it only
            together with ``--samples_per_plugin images=N``).
        live_fractions: fractions of training at which the live images are refreshed.
        fractions: ``None`` (default): the grid image and the heatmaps are chosen where the
            curves change (:func:`grid_checkpoints`); the paper's ``DEFAULT_FRACTIONS``
            (0/35/75/100%) or other fractions: the grid shows the checkpoint nearest each,
            and the heatmaps include them.
        min_change: matrices within this largest cell difference count as alike (see
            :func:`select_checkpoints`).
        dpi: pixels per inch of the images (figures are at least 6.4 in wide: >= 640 px at 100).
        font_size: base font size in points of the images; TensorBoard shrinks an image to
            its card (Time Series: about 215 px high, 0.4 of a 540 px image; Images tab: about
            0.5), so the default 18 (25 px) shows 10 to 12 px high.
        keep: SVD truncation used when :meth:`log_capture` gets raw activations
            ``(datapoints, neurons)`` instead of reduced bases.
        layer_scalars: also write each capture's per-layer similarity to the previous
            capture as scalars (``<name>/to_previous``; other loggers of the callback always
            get them). Off by default: at TensorBoard's default settings (smoothing 0.6,
            outliers ignored) such a front-loaded series is drawn wrong, the smoothing
            stretching the last change across the sparse late captures and the outlier cut
            dropping the first comparisons; the ``live/to_previous_curves`` image shows every
            value, one line per layer.
        layer_runs: with ``layer_scalars``, write them to one run per layer (one chart, a line
            per layer; default when ``writer`` is a ``SummaryWriter``); ``False``: one tag per
            layer in ``writer``'s run.
    """

    def __init__(
        self,
        writer: Any,
        name: str = "svcca",
        layers: Sequence[str] = (),
        *,
        total_steps: Optional[int] = None,
        max_images: int = TENSORBOARD_IMAGES_PER_TAG,
        live_fractions: Sequence[float] = LIVE_FRACTIONS,
        fractions: Optional[Sequence[float]] = None,
        min_change: float = 0.01,
        dpi: int = 100,
        font_size: float = 18.0,
        keep: Union[int, float] = 0.99,
        layer_scalars: bool = False,
        layer_runs: Optional[bool] = None,
    ) -> None:
        missing = [m for m in ("add_image", "add_scalar", "add_text", "add_custom_scalars") if not hasattr(writer, m)]
        if missing:
            raise ValueError(f"`writer` must be a TensorBoard SummaryWriter (or have add_image, add_scalar, add_text, "
                             f"add_custom_scalars); {type(writer).__name__} lacks {', '.join(missing)}.")
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"`name` must be a non-empty string without '/', got {name!r}.")
        layers = [str(n) for n in layers]
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"`layers` must be the recorded layer names, bottom-up, each once; got {layers}.")
        self.writer = writer
        self.name = name
        self.layers = layers
        self.total_steps = None if total_steps is None else check_positive_int(total_steps, "total_steps")
        self.max_images = check_positive_int(max_images, "max_images", minimum=2)  # live images and the last
        self.live_fractions = sorted(check_fraction(f, "live_fractions[i]", low_inclusive=True, high_inclusive=True)
                                     for f in live_fractions)
        self.fractions = None if fractions is None else [
            check_fraction(f, "fractions[i]", low_inclusive=True, high_inclusive=True) for f in fractions]
        self.min_change = check_fraction(min_change, "min_change", low_inclusive=True, high_inclusive=True)
        self.dpi = check_positive_int(dpi, "dpi")
        self.font_size = float(font_size)
        self.keep = check_keep(keep)
        self.short_names = short_layer_names(layers)
        width = max(2, len(str(len(layers) - 1)))
        #: layer -> ``NN_short``: the last component of its scalar tags (sorts by depth).
        self.layer_tags: Dict[str, str] = {
            n: f"{i:0{width}d}_{_tag_safe(s)}" for i, (n, s) in enumerate(zip(layers, self.short_names))}
        #: tag -> steps of the images written to it (each tag holds at most ``max_images``).
        self.images_written: Dict[str, List[int]] = {}
        #: layer -> the step it was frozen at (from :meth:`log_freeze`)
        self.frozen_at: Dict[str, int] = {}
        self._history: List[Dict[str, Any]] = []  # one entry per capture: step, fraction, to_previous
        self._targets = list(self.live_fractions)
        self._header = False
        log_dir = getattr(writer, "log_dir", None)
        if layer_runs is None:
            from torch.utils.tensorboard import SummaryWriter

            layer_runs = isinstance(writer, SummaryWriter) and isinstance(log_dir, str)
        elif layer_runs and not isinstance(log_dir, str):
            raise ValueError("`layer_runs=True` needs a writer with a `log_dir` (a torch SummaryWriter) to put the "
                             "per-layer runs in.")
        self.layer_runs = bool(layer_runs)
        self.layer_scalars = check_bool(layer_scalars, "layer_scalars")
        self._runs: Dict[str, Any] = {}  # run name -> its SummaryWriter
        self._categories: List[str] = []  # the custom-scalars categories written so far (only charts with data)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs to keep each image tag within ``max_images``: the steps
        of the images written, the capture history (to-previous curves) and the live schedule."""
        return {"images_written": {k: list(v) for k, v in self.images_written.items()},
                "history": [dict(h, to_previous=dict(h["to_previous"])) for h in self._history],
                "targets": list(self._targets), "frozen_at": dict(self.frozen_at)}

    def load_state_dict(self, state: Mapping[str, Any], resume_step: Optional[int] = None) -> None:
        """Restore :meth:`state_dict` in a resumed run.

        The capture history after ``resume_step`` is forgotten (those captures are made
        again). The live images already written stay counted, whatever their step: whether
        TensorBoard drops them when earlier steps arrive again depends on its reader (the
        Python reader keeps them), so new live images go only after the last one and a tag
        never exceeds ``max_images``. The end-of-training tags start afresh (``log_final``
        writes them from step 0 again).
        """
        live = self.tag("live", "")
        self.images_written = {k: list(v) for k, v in state.get("images_written", {}).items() if k.startswith(live)}
        keep = (lambda st: True) if resume_step is None else (lambda st: st <= int(resume_step))
        self._history = [dict(h, to_previous=dict(h["to_previous"])) for h in state.get("history", [])
                         if keep(h["step"])]
        self.frozen_at = {k: int(v) for k, v in state.get("frozen_at", {}).items() if keep(int(v))}
        last = self._history[-1]["fraction"] if self._history else None
        self._targets = [f for f in state.get("targets", self.live_fractions) if last is None or f > last]
        if resume_step is not None and last is not None:
            self._targets = sorted(set(self._targets) | {f for f in self.live_fractions if f > last})

    # ------------------------------------------------------------------ tags
    def tag(self, *parts: str) -> str:
        """``<name>/part/...``."""
        return "/".join((self.name,) + parts)

    def layer_tag(self, kind: str, layer: str) -> str:
        """``<name>/<kind>/NN_short`` of one layer, e.g. ``svcca/to_previous/00_block1`` (the
        tag a writer without per-layer runs gets; see :meth:`log_layer_scalar`)."""
        if layer not in self.layer_tags:
            raise ValueError(f"`layer` {layer!r} is not one of the layers {self.layers}.")
        return self.tag(kind, self.layer_tags[layer])

    def layer_run(self, layer: str) -> str:
        """The run folder of one layer's scalars, relative to the writer's: ``<name>/NN_short``
        (a name not among the layers, e.g. a freeze group: ``<name>/group_<name>``)."""
        return f"{self.name}/{self.layer_tags.get(layer) or 'group_' + _tag_safe(layer)}"

    def log_layer_scalar(self, kind: str, layer: str, value: float, step: int) -> None:
        """One layer's value of a per-layer signal (``to_previous``, ``freeze_signal``): tag ``<name>/<kind>`` in the layer's run (:meth:`layer_run`), so
        that one chart shows every layer, each in its own colour; without per-layer runs the
        tag ``<name>/<kind>/NN_short`` (a layer) or ``<name>/<kind>/<group>``."""
        if not math.isfinite(float(value)):
            return
        if not self.layer_runs:
            tag = self.layer_tag(kind, layer) if layer in self.layer_tags else self.tag(kind, _tag_safe(layer))
            self.writer.add_scalar(tag, float(value), int(step))
            return
        run = self.layer_run(layer)
        w = self._runs.get(run)
        if w is None:
            from torch.utils.tensorboard import SummaryWriter

            w = self._runs[run] = SummaryWriter(os.path.join(self.writer.log_dir, *run.split("/")))
        w.add_scalar(self.tag(kind), float(value), int(step))

    def flush(self) -> None:
        """Write what is buffered (the writer and the per-layer runs) to disk."""
        for w in [self.writer, *self._runs.values()]:
            if hasattr(w, "flush"):
                w.flush()

    def close(self) -> None:
        """Flush, and close the per-layer runs' writers (the caller's writer stays open)."""
        self.flush()
        for w in self._runs.values():
            w.close()
        self._runs = {}

    def layout(self) -> Dict[str, Dict[str, List[Any]]]:
        """Custom-scalars layout: the freeze count and fraction in separate charts and, with
        ``layer_scalars``, one chart with a line per layer (each layer's run, coloured apart;
        without per-layer runs every ``NN_short`` tag, told apart by marker). Each category
        is written once its first value is (an empty chart is never shown)."""
        out: Dict[str, Dict[str, List[Any]]] = {}
        if self.layer_scalars:
            kind = self.tag("to_previous")
            where = (f"one line per layer: runs {self.name}/NN_short, bottom-up" if self.layer_runs
                     else "one line per layer")
            out[f"{self.name}: per layer ({where})"] = {"similarity to previous capture": [
                "Multiline", [f"^{kind}$" if self.layer_runs else f"^{kind}/"]]}
        out[f"{self.name}: freeze training"] = {
            "frozen layer groups (count)": ["Multiline", [f"^{self.tag('freeze', 'frozen_groups')}$"]],
            "backward FLOPs saved (fraction of one backward pass)": [
                "Multiline", [f"^{self.tag('freeze', 'backward_flops_saved')}$"]],
        }
        return out

    def _use_category(self, prefix: str) -> None:
        """Write the custom-scalars layout with the category starting ``<name>: <prefix>``
        added (merged with every logger's on this writer: TensorBoard shows the last one)."""
        title = next((t for t in self.layout() if t.startswith(f"{self.name}: {prefix}")), None)
        if title is None or title in self._categories:
            return
        self._categories.append(title)
        try:
            merged = _LAYOUTS.setdefault(self.writer, {})
        except TypeError:  # a writer that cannot be weakly referenced: its own layout only
            merged = {}
        layout = self.layout()
        merged.update({t: layout[t] for t in self._categories})
        self.writer.add_custom_scalars(dict(merged))

    def _write_header(self, step: int) -> None:
        if self._header:
            return
        self._header = True
        if self.layer_scalars and self.layer_runs:
            rows = "\n".join(f"| `{s}` | `{self.layer_run(n)}` | `{n}` |" for n, s in zip(self.layers, self.short_names))
            table = f"| name in the images | run (scalars) | layer |\n|---|---|---|\n{rows}"
        else:
            rows = "\n".join(f"| `{s}` | `{n}` |" for n, s in zip(self.layers, self.short_names))
            table = f"| name in the images | layer |\n|---|---|\n{rows}"
        self.writer.add_text(self.tag("layers"), table, step)

    # ------------------------------------------------------------------ images
    def _room(self, tag: str, step: int) -> bool:
        steps = self.images_written.get(tag, [])
        # never more than the reservoir keeps, never out of step order
        return len(steps) < self.max_images and (not steps or step > steps[-1])

    def _add_image(self, tag: str, draw: Callable[[], Figure], step: int,
                   save_as: Optional[Path] = None, scale: float = 1.0) -> bool:
        """Draw (only when there is room, or a file is asked for) with card-sized fonts
        (``scale`` times ``font_size``), render, write; ``save_as``: also write the same pixels
        to that PNG file."""
        room = self._room(tag, step)
        if not room and save_as is None:
            return False
        with rc_context({"font.size": self.font_size * scale}):
            image = figure_to_array(draw(), self.dpi)
        if save_as is not None:
            imsave(save_as, image)
        if not room:
            return False
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.images_written.setdefault(tag, []).append(step)
        return True

    def _fraction(self, step: int, fraction: Optional[float]) -> Optional[float]:
        if fraction is not None:
            return check_fraction(fraction, "fraction", low_inclusive=True, high_inclusive=True)
        if self.total_steps is not None:
            return min(1.0, step / self.total_steps)
        return None

    def _live_due(self, fraction: Optional[float], final: bool) -> bool:
        used = len(self.images_written.get(self.tag("live", "to_previous_curves"), []))
        if final:
            return used < self.max_images
        if used >= self.max_images - 1:  # the last slot is the final capture's
            return False
        with_previous = sum(1 for h in self._history if h["to_previous"])
        if with_previous == 1:
            if fraction is not None:  # the points up to here are covered by this first image
                self._targets = [f for f in self._targets if f > fraction]
            return True
        due = False
        if fraction is not None:
            while self._targets and fraction >= self._targets[0]:
                self._targets.pop(0)
                due = True
        elif with_previous & (with_previous - 1) == 0:  # 1, 2, 4, 8, ... captures with a previous
            due = True
        return due and self._moved_since_last_image()

    def _moved_since_last_image(self) -> bool:
        """Whether some layer moved (a similarity to its previous capture below ``1 -
        min_change``) at a capture after the last live image: a new image shows a change."""
        last = (self.images_written.get(self.tag("live", "to_previous_curves")) or [-1])[-1]
        return any(v < 1.0 - self.min_change for h in self._history if h["step"] > last
                   for v in h["to_previous"].values() if math.isfinite(v))

    def _frozen_by(self, step: int) -> List[str]:
        """The layers frozen at or before ``step``, bottom-up."""
        return [n for n in self.layers if n in self.frozen_at and self.frozen_at[n] <= step]

    def _title(self, head: str, step: Optional[int]) -> str:
        """``head`` and, on a second line, the layers frozen by ``step`` with their freeze steps."""
        note = freeze_note(self.frozen_at, self.layers, self.short_names, step=step, limit=6)
        # wrapped to the heatmap's width (720 px at the title's 30 px font: about 42 characters)
        return head + ("\n" + textwrap.fill(note, 42, break_on_hyphens=False) if note else "")

    def _live_curves(self) -> Tuple[LayerCurves, bool]:
        rows = self._history
        values = torch.full((len(rows), len(self.layers)), math.nan, dtype=torch.float64)
        for c, h in enumerate(rows):
            for j, n in enumerate(self.layers):
                if n in h["to_previous"]:
                    values[c, j] = h["to_previous"][n]
        fractions = [h["fraction"] for h in rows]
        known = all(f is not None for f in fractions)
        return LayerCurves(list(self.layers), [h["step"] for h in rows],
                           [float(f) if known else float("nan") for f in fractions], values), known

    def _matrix(self, previous: Bases, current: Bases) -> Optional[torch.Tensor]:
        names = [n for n in self.layers if n in previous and n in current]
        if not names:
            return None

        def basis(z: Any, n: str) -> ReducedBasis:
            return z if isinstance(z, ReducedBasis) else svd_reduce(z, self.keep, name=f"layers[{n!r}]")

        m = similarity_matrix([basis(previous[n], n) for n in names], [basis(current[n], n) for n in names])
        full = torch.full((len(self.layers), len(self.layers)), math.nan, dtype=torch.float64)
        idx = torch.tensor([self.layers.index(n) for n in names])
        full[idx[:, None], idx[None, :]] = m.double().cpu()
        return full

    # ------------------------------------------------------------------ public logging
    def log_capture(
        self,
        step: int,
        to_previous: Optional[Mapping[str, float]] = None,
        *,
        fraction: Optional[float] = None,
        previous: Optional[Bases] = None,
        current: Optional[Bases] = None,
        matrix: Optional[torch.Tensor] = None,
        final: bool = False,
        images: bool = True,
    ) -> bool:
        """Log one capture: per-layer scalars always, the live images when due.

        Args:
            step: the training step of the capture (increasing from call to call; the same step
                again logs nothing new, except the final live images with ``final=True``).
            to_previous: ``{layer: SVCCA similarity to its previous capture}`` (empty or
                ``None`` at the first capture).
            fraction: fraction of training done (default ``step / total_steps`` when
                ``total_steps`` was given).
            previous, current: ``{layer: ReducedBasis or activations (datapoints, neurons)}``
                of the previous capture and this one; the layers x layers heatmap is computed
                from them only when a live image is due.
            matrix: that heatmap precomputed instead, ``(layers, layers)`` with
                ``matrix[i, j]`` = layer ``i`` at the previous capture vs layer ``j`` now.
            final: this is the last capture of training (always drawn).
            images: ``False``: the scalars only, no live images (e.g. for the end-of-training
                capture of a run captured only at its start and end: its one comparison is
                the first checkpoint's to-final heatmap and curve points of :meth:`log_final`).

        Returns:
            whether live images were written at this capture.
        """
        step = int(step)
        self._write_header(step)
        sims = {str(k): float(v) for k, v in (to_previous or {}).items()}
        unknown = [k for k in sims if k not in self.layer_tags]
        if unknown:
            raise ValueError(f"`to_previous` names layers {unknown} that are not among {self.layers}.")
        f = self._fraction(step, fraction)
        if self._history and step == self._history[-1]["step"]:
            # the same capture again (e.g. the end-of-training capture at the step of the last
            # periodic one): its scalars are logged already; only the final drawing may be new
            if not final:
                return False
            sims, f = self._history[-1]["to_previous"], self._history[-1]["fraction"]
            prev_step = self._history[-2]["step"] if len(self._history) > 1 else None
        else:
            prev_step = self._history[-1]["step"] if self._history else None
            self._history.append({"step": step, "fraction": f, "to_previous": sims})
            if self.layer_scalars and sims:
                self._use_category("per layer")
                for n in self.layers:
                    if n in sims:
                        self.log_layer_scalar("to_previous", n, sims[n], step)
        if not images or not sims or not self._live_due(f, final):
            self.flush()  # the scalars on disk now: visible at once
            return False
        when = checkpoint_label(step, f)
        if matrix is None and previous is not None and current is not None:
            matrix = self._matrix(previous, current)
        if matrix is not None:
            m = torch.as_tensor(matrix)
            self._add_image(self.tag("live", "to_previous_matrix"), lambda: plot_similarity_matrix(
                m, self.layers, title=self._title(f"{when} vs step {prev_step}", step),
                xlabel=f"layer at step {prev_step} (previous capture)", ylabel=f"layer at step {step}",
                frozen_layers=self._frozen_by(step)), step)
        curves, known = self._live_curves()
        drawn = self._add_image(self.tag("live", "to_previous_curves"), lambda: plot_convergence(
            curves, x="fraction" if known else "step", ylabel="SVCCA similarity",
            title=f"vs previous capture, to {when}", freeze_steps=self.frozen_at), step)
        self.flush()  # on disk now: visible at once, and kept if training crashes later
        return drawn

    def log_freeze(
        self,
        step: int,
        frozen_groups: int,
        *,
        backward_flops_saved: Optional[float] = None,
        frozen_parameters: Optional[int] = None,
        newly_frozen: Sequence[str] = (),
        n_groups: Optional[int] = None,
        frozen_layers: Optional[Sequence[str]] = None,
        note: str = "",
    ) -> None:
        """Log the freeze state at ``step``: call it at every capture and every freeze window
        from step 0 (0 frozen) and whenever groups are frozen, in increasing step order (a
        step function logged often reads right under TensorBoard's default smoothing).

        Args:
            step: the training step.
            frozen_groups: how many layer groups are frozen (count chart).
            backward_flops_saved: fraction of one backward pass's FLOPs no longer spent
                (fraction chart; 0.0 before anything is frozen).
            frozen_parameters: how many parameters are frozen (in the events text).
            newly_frozen: names of the groups frozen at this step (written as text).
            n_groups: how many groups there are (for the text).
            frozen_layers: the recorded layers of the groups frozen at this step (default:
                the ``newly_frozen`` names that are layers): their freeze step goes into
                titles and curves.
            note: why they were frozen (e.g. the adaptive signal's values), for the text.
        """
        step = int(step)
        self._write_header(step)
        self._use_category("freeze")
        self.writer.add_scalar(self.tag("freeze", "frozen_groups"), float(frozen_groups), step)
        if backward_flops_saved is not None:
            self.writer.add_scalar(self.tag("freeze", "backward_flops_saved"), float(backward_flops_saved), step)
        layers = [n for n in newly_frozen if n in self.layer_tags] if frozen_layers is None else list(frozen_layers)
        for n in layers:
            if n in self.layer_tags:
                self.frozen_at.setdefault(n, step)
        if newly_frozen:
            of = f" of {n_groups}" if n_groups is not None else ""
            saved = "" if backward_flops_saved is None else f", {100 * backward_flops_saved:.0f}% of backward FLOPs saved"
            params = "" if frozen_parameters is None else f", {int(frozen_parameters):,} parameters"
            why = f"; {note}" if note else ""
            self.writer.add_text(self.tag("freeze", "events"),
                                 f"step {step}: froze {', '.join(newly_frozen)} ({frozen_groups}{of} groups frozen"
                                 f"{params}{saved}{why})", step)

    def log_signal(self, step: int, similarity: Mapping[str, float]) -> None:
        """The adaptive freeze signal at ``step``: ``{group: similarity to one window
        earlier}`` (a group named after a recorded layer is drawn as that layer). Each group is
        judged at a few windows only (until it freezes), so its lines are short; the
        callback puts the values that froze a group in the freeze-events text instead."""
        step = int(step)
        self._write_header(step)
        for g, v in similarity.items():
            self.log_layer_scalar("freeze_signal", str(g), float(v), step)

    def log_freeze_note(self, step: int, text: str) -> None:
        """A line of the freeze-events text at ``step`` (e.g. what the frozen-output cache skipped)."""
        step = int(step)
        self._write_header(step)
        self.writer.add_text(self.tag("freeze", "events"), f"step {step}: {text}", step)

    def log_final(self, dynamics: LearningDynamics, save_dir: Optional[Union[str, Path]] = None, *,
                  freeze_steps: Optional[Mapping[str, int]] = None) -> Dict[str, List[int]]:
        """Log the end-of-training views from the learning-dynamics matrices.

        Writes the chosen ``<name>/dynamics/to_final_matrix`` heatmaps (:func:`select_checkpoints` among the
        checkpoints with a full matrix: where the curves change, plus ``fractions`` when
        given), the grid image (:func:`grid_checkpoints`: 4 of those heatmaps, 2x2) and the
        depth-coloured convergence curves at the final step, and the last live curves if the
        final capture was not logged with ``final=True`` and more than one capture was
        compared with a previous one (a single comparison is the first point of the to-final
        curves). Titles carry each checkpoint's step and fraction of training and the layers
        frozen by then (with their freeze steps); the curves mark each freeze.

        Args:
            dynamics: from :func:`svcca_torch.dynamics.learning_dynamics` over the run's store;
                to compute full matrices only for what is shown, pass
                ``full=[steps[c] for c in full_checkpoints(learning_dynamics(store, full=[]).curves())]``
                (what :class:`~svcca_torch.tracker.DynamicsTracker` does).
            save_dir: also write the grid and the curves, as logged, to
                ``learning_dynamics.png`` and ``convergence.png`` in this folder (drawn once
                for both; :class:`~svcca_torch.callbacks.SVCCACallback` passes its run folder).
            freeze_steps: ``{layer: step it was frozen}`` (default: what :meth:`log_freeze`
                was told).

        Returns:
            ``{image tag: steps written}`` for the tags written here.
        """
        if not isinstance(dynamics, LearningDynamics) or not dynamics.steps:
            raise ValueError("`dynamics` must be a LearningDynamics with at least one checkpoint "
                             "(svcca_torch.dynamics.learning_dynamics(store)).")
        unknown = [n for n in dynamics.layers if n not in self.layer_tags]
        if unknown:
            raise ValueError(f"`dynamics` has layers {unknown} that are not among {self.layers}.")
        if freeze_steps is not None:
            self.frozen_at.update({n: int(st) for n, st in freeze_steps.items() if n in self.layer_tags})
        frozen = dict(self.frozen_at)
        final_step = int(dynamics.steps[-1])
        self._write_header(int(dynamics.steps[0]))
        written: Dict[str, List[int]] = {}
        tag = self.tag("dynamics", "to_final_matrix")
        # only checkpoints with a full matrix can be heatmaps: choose among them (all when full is None)
        cands = list(range(len(dynamics.steps))) if dynamics.full is None else sorted(dynamics.full)
        picked = [cands[i] for i in select_checkpoints(
            dynamics.matrices[cands], [dynamics.fractions[c] for c in cands], max_images=self.max_images,
            anchors=self.fractions or (), min_change=self.min_change)] if cands else []
        for c in picked:
            s = int(dynamics.steps[c])
            if self._add_image(tag, lambda: plot_similarity_matrix(
                    dynamics.matrices[c], dynamics.layers,
                    title=self._title(f"{checkpoint_label(s, dynamics.fractions[c])} vs end of training", s),
                    xlabel=f"layer at end (step {final_step})", ylabel=f"layer at step {s}",
                    frozen_layers=[n for n in dynamics.layers if n in frozen and frozen[n] <= s]), s):
                written.setdefault(tag, []).append(s)
        folder = None if save_dir is None else Path(save_dir)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        grid = (grid_checkpoints(dynamics, fractions=self.fractions) if self.fractions is not None else
                grid_checkpoints(dynamics, candidates=picked, min_change=self.min_change) if picked else [])
        # four heatmaps in one card: larger fonts (a Time Series card shows it about 250 px high)
        if grid and self._add_image(self.tag("dynamics", "grid"), lambda: plot_learning_dynamics(
                dynamics, checkpoints=grid, ncols=2, panel_size=2.6, freeze_steps=frozen), final_step,
                save_as=None if folder is None else folder / "learning_dynamics.png", scale=GRID_FONT_SCALE):
            written[self.tag("dynamics", "grid")] = [final_step]
        if self._add_image(self.tag("dynamics", "to_final_curves"), lambda: plot_convergence(
                dynamics.curves(), ylabel="SVCCA similarity", title="similarity to own final state",
                freeze_steps=frozen), final_step,
                save_as=None if folder is None else folder / "convergence.png"):
            written[self.tag("dynamics", "to_final_curves")] = [final_step]
        live = self.tag("live", "to_previous_curves")
        last = self._history[-1] if self._history else None
        # one comparison only (captures at the start and the end): one point per layer, the
        # first point of the to-final curves drawn above
        compared = sum(1 for h in self._history if h["to_previous"])
        if (last is not None and last["to_previous"] and compared > 1
                and self.images_written.get(live, [None])[-1] != last["step"]):
            lc, known = self._live_curves()
            if self._add_image(live, lambda: plot_convergence(
                    lc, x="fraction" if known else "step", ylabel="SVCCA similarity",
                    title="similarity to previous capture, whole run", freeze_steps=frozen), last["step"]):
                written[live] = [last["step"]]
        self.flush()
        return written
