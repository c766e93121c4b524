"""What the training views show, and when: every choice made once, in plain code.

The rules (each image tag gets at most ``max_images`` images, in increasing step order, so
TensorBoard's reservoir of 10 per tag keeps every one of them):

* live images (``<name>/live/...``) at the second capture (the first with a previous one),
  at the first capture past each of :data:`LIVE_FRACTIONS` (or, when the fraction of
  training is unknown, at the 2nd, 4th, 8th, ... capture) at which some layer moved since
  the last image, and at the final capture; one slot is kept for that last one
  (:class:`ImageSchedule`);
* the end-of-run heatmaps where the curves change (:func:`select_checkpoints`,
  :func:`full_checkpoints`) and a 2x2 grid among them (:func:`grid_checkpoints`);
* the freeze step functions at every capture and freeze window and every 0.5% of training
  (:func:`freeze_state_due`);
* the final capture's live images only when they show more than the end views do
  (:func:`final_live_images`).

Plain PyTorch (never imports Lightning).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..dynamics import LayerCurves, LearningDynamics
from ..utils.validation import check_fraction, check_positive_int

__all__ = ["LIVE_FRACTIONS", "GRID_PANELS", "TENSORBOARD_IMAGES_PER_TAG", "select_checkpoints", "full_checkpoints",
           "grid_checkpoints", "freeze_state_due", "final_live_images", "ImageSchedule"]

#: Fractions of training after which the live images are refreshed (besides the second
#: capture, the first with a previous one, and the last capture), front-loaded as the
#: default capture schedule is; a point passed while no layer moved since the last image is
#: skipped (its slot stays for a later change).
LIVE_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75)
#: Panels of the end-of-run grid image (2x2: legible in a TensorBoard Time Series card).
GRID_PANELS = 4
#: TensorBoard's default number of images kept per tag (``--samples_per_plugin images=10``).
TENSORBOARD_IMAGES_PER_TAG = 10
#: The freeze step functions are logged at least every this fraction of training.
FREEZE_STATE_EVERY = 0.005
#: ... or every this many steps when the training length is unknown.
FREEZE_STATE_STEPS = 50


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


def freeze_state_due(step: int, *, total_steps: Optional[int] = None, freeze_window: Optional[int] = None) -> bool:
    """Whether the freeze state (a step function) is logged at ``step`` besides captures,
    signal recordings and freezes: at the end of every freeze window (``freeze_window``, the
    adaptive policy's) and every 0.5% of training (every 50 steps when ``total_steps`` is
    unknown), so that TensorBoard's default smoothing (an average over points) follows it
    within about 1.5% of training."""
    every = [max(1, int(total_steps * FREEZE_STATE_EVERY)) if total_steps else FREEZE_STATE_STEPS]
    if freeze_window:
        every.append(int(freeze_window))
    return step > 0 and any(step % k == 0 for k in every)


def final_live_images(compared: int, final_analysis: bool) -> bool:
    """Whether the end-of-training capture gets live images: not when it is the only capture
    compared with a previous one (``compared`` captures have a previous one; a run captured
    at its start and end only) and the final analysis runs, whose first to-final heatmap and
    curve points show that comparison."""
    return compared > 1 or not final_analysis


class ImageSchedule:
    """The live images' schedule and every image tag's budget (plain data, resumable).

    Args:
        live_prefix: the tags of the live images (``<name>/live/``): they stay counted on
            resume, the end-of-run tags start afresh.
        live_tag: the tag whose images mark "the last live image" (the curves).
        max_images, live_fractions, min_change: see :class:`~svcca_torch.views.TrainingViews`.
    """

    def __init__(self, live_prefix: str, live_tag: str, *, max_images: int = TENSORBOARD_IMAGES_PER_TAG,
                 live_fractions: Sequence[float] = LIVE_FRACTIONS, min_change: float = 0.01) -> None:
        self.live_prefix, self.live_tag = live_prefix, live_tag
        self.max_images = check_positive_int(max_images, "max_images", minimum=2)  # live images and the last
        self.live_fractions = sorted(check_fraction(f, "live_fractions[i]", low_inclusive=True, high_inclusive=True)
                                     for f in live_fractions)
        self.min_change = check_fraction(min_change, "min_change", low_inclusive=True, high_inclusive=True)
        #: tag -> steps of the images written to it (each tag holds at most ``max_images``).
        self.images_written: Dict[str, List[int]] = {}
        #: one entry per capture: ``{"step", "fraction", "to_previous": {layer: similarity}}``
        self.history: List[Dict[str, Any]] = []
        self.targets = list(self.live_fractions)

    # ------------------------------------------------------------------ budget
    def room(self, tag: str, step: int) -> bool:
        """Whether ``tag`` takes an image at ``step``: never more than the reservoir keeps,
        never out of step order."""
        steps = self.images_written.get(tag, [])
        return len(steps) < self.max_images and (not steps or step > steps[-1])

    def record(self, tag: str, step: int) -> None:
        self.images_written.setdefault(tag, []).append(int(step))

    @property
    def compared(self) -> int:
        """How many captures so far have a previous one to compare with."""
        return sum(1 for h in self.history if h["to_previous"])

    # ------------------------------------------------------------------ live images
    def live_due(self, fraction: Optional[float], final: bool) -> bool:
        """Whether the live images are drawn at the capture just added (see the module docstring)."""
        used = len(self.images_written.get(self.live_tag, []))
        if final:
            return used < self.max_images
        if used >= self.max_images - 1:  # the last slot is the final capture's
            return False
        with_previous = self.compared
        if with_previous == 1:
            if fraction is not None:  # the points up to here are covered by this first image
                self.targets = [f for f in self.targets if f > fraction]
            return True
        due = False
        if fraction is not None:
            while self.targets and fraction >= self.targets[0]:
                self.targets.pop(0)
                due = True
        elif with_previous & (with_previous - 1) == 0:  # 1, 2, 4, 8, ... captures with a previous
            due = True
        return due and self.moved_since_last_image()

    def moved_since_last_image(self) -> bool:
        """Whether some layer moved (a similarity to its previous capture below ``1 -
        min_change``) at a capture after the last live image: a new image shows a change."""
        last = (self.images_written.get(self.live_tag) or [-1])[-1]
        return any(v < 1.0 - self.min_change for h in self.history if h["step"] > last
                   for v in h["to_previous"].values() if math.isfinite(v))

    def curves(self, layers: Sequence[str]) -> Tuple[LayerCurves, bool]:
        """The to-previous curves so far, and whether every capture's fraction is known."""
        values = torch.full((len(self.history), len(layers)), math.nan, dtype=torch.float64)
        for c, h in enumerate(self.history):
            for j, n in enumerate(layers):
                if n in h["to_previous"]:
                    values[c, j] = h["to_previous"][n]
        fractions = [h["fraction"] for h in self.history]
        known = all(f is not None for f in fractions)
        return LayerCurves(list(layers), [h["step"] for h in self.history],
                           [float(f) if known else float("nan") for f in fractions], values), known

    def seed(self, curves: LayerCurves) -> None:
        """Start the history from a run's to-previous curves (e.g. :attr:`FinalAnalysis.to_previous
        <svcca_torch.tracker.FinalAnalysis>`), for views drawn after the run."""
        self.history = [{"step": int(s), "fraction": None if math.isnan(f) else float(f),
                         "to_previous": {n: float(v) for n, v in zip(curves.layers, row.tolist()) if math.isfinite(v)}}
                        for s, f, row in zip(curves.steps, curves.fractions, curves.values)]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"images_written": {k: list(v) for k, v in self.images_written.items()},
                "history": [dict(h, to_previous=dict(h["to_previous"])) for h in self.history],
                "targets": list(self.targets)}

    def load_state_dict(self, state: Mapping[str, Any], resume_step: Optional[int] = None) -> None:
        """Restore :meth:`state_dict`: the live tags stay counted, the history after
        ``resume_step`` is forgotten, the end-of-run tags start afresh."""
        self.images_written = {k: list(v) for k, v in state.get("images_written", {}).items()
                               if k.startswith(self.live_prefix)}
        keep = (lambda st: True) if resume_step is None else (lambda st: st <= int(resume_step))
        self.history = [dict(h, to_previous=dict(h["to_previous"])) for h in state.get("history", [])
                        if keep(h["step"])]
        last = self.history[-1]["fraction"] if self.history else None
        self.targets = [f for f in state.get("targets", self.live_fractions) if last is None or f > last]
        if resume_step is not None and last is not None:
            self.targets = sorted(set(self.targets) | {f for f in self.live_fractions if f > last})
