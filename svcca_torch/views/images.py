"""The image views of :class:`~svcca_torch.views.TrainingViews`: the live images at each
capture and the end-of-run heatmaps, grid and curves (chosen by
:mod:`~svcca_torch.views.selection`, drawn once by :mod:`~svcca_torch.views.encoding`, sent
to every sink that takes them). A base class of the facade; plain PyTorch.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch

from ..dynamics import LearningDynamics
from ..functional.matrix import similarity_matrix
from ..functional.svcca import ReducedBasis, svd_reduce
from ..utils.validation import check_fraction
from . import encoding
from .selection import ImageSchedule, grid_checkpoints, select_checkpoints
from .sinks import Sink

__all__ = ["ImageViews"]

Bases = Mapping[str, Union[torch.Tensor, ReducedBasis]]


class ImageViews:
    """Live and end-of-run images (the facade's part that draws; see :class:`~svcca_torch.views.TrainingViews`)."""

    sinks: List[Sink]
    layers: List[str]
    layer_tags: Dict[str, str]
    short_names: List[str]
    frozen_at: Dict[str, int]
    schedule: ImageSchedule
    total_steps: Optional[int]
    fractions: Optional[List[float]]
    dpi: int
    font_size: float
    keep: Union[int, float]
    layer_scalars: bool

    # tag(), flush(), _write_header(), _use_category(), _scalars(), _tensorboard_layer_scalar(): the facade's

    @property
    def max_images(self) -> int:
        return self.schedule.max_images

    @property
    def min_change(self) -> float:
        return self.schedule.min_change

    @property
    def images_written(self) -> Dict[str, List[int]]:
        """Image tag -> the steps of the images written to it (at most ``max_images`` each)."""
        return self.schedule.images_written

    def _room(self, tag: str, step: int) -> bool:
        return self.schedule.room(tag, step)

    def _add_image(self, tag: str, draw: Callable[[], Any], step: int, *, final: bool = False,
                   scale: float = 1.0) -> bool:
        """Draw once (only if some sink takes it: a bounded one only while the tag has room),
        send the pixels to those sinks; whether the tag got the image."""
        room = self._room(tag, step)
        targets = [s for s in self.sinks if s.wants_image(tag, final) and (room or not s.bounded)]
        if not targets:
            return False
        image = encoding.render(draw, dpi=self.dpi, font_size=self.font_size, scale=scale)
        if image is None:
            return False
        for s in targets:
            s.add_image(tag, image, int(step))
        if room:
            self.schedule.record(tag, step)
        return room

    def _fraction(self, step: int, fraction: Optional[float]) -> Optional[float]:
        if fraction is not None:
            return check_fraction(fraction, "fraction", low_inclusive=True, high_inclusive=True)
        if self.total_steps is not None:
            return min(1.0, step / self.total_steps)
        return None

    def _frozen_by(self, step: int) -> List[str]:
        """The layers frozen at or before ``step``, bottom-up."""
        return [n for n in self.layers if n in self.frozen_at and self.frozen_at[n] <= step]

    def _title(self, head: str, step: Optional[int]) -> str:
        return encoding.titled(head, self.frozen_at, self.layers, self.short_names, step)

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
            fraction: fraction of training done (default ``step / total_steps``).
            previous, current: ``{layer: ReducedBasis or activations (datapoints, neurons)}``
                of the previous capture and this one; the layers x layers heatmap is computed
                from them only when a live image is drawn.
            matrix: that heatmap precomputed instead, ``(layers, layers)`` with
                ``matrix[i, j]`` = layer ``i`` at the previous capture vs layer ``j`` now.
            final: this is the last capture of training (always drawn).
            images: ``False``: the scalars only, no live images.

        Returns:
            whether the live images were written at this capture.
        """
        step = int(step)
        self._write_header(step)
        sims = {str(k): float(v) for k, v in (to_previous or {}).items()}
        unknown = [k for k in sims if k not in self.layer_tags]
        if unknown:
            raise ValueError(f"`to_previous` names layers {unknown} that are not among {self.layers}.")
        f = self._fraction(step, fraction)
        history = self.schedule.history
        if history and step == history[-1]["step"]:
            # the same capture again (e.g. the end-of-training capture at the step of the last
            # periodic one): its scalars are logged already; only the final drawing may be new
            if not final:
                return False
            sims, f = history[-1]["to_previous"], history[-1]["fraction"]
            prev_step = history[-2]["step"] if len(history) > 1 else None
        else:
            prev_step = history[-1]["step"] if history else None
            history.append({"step": step, "fraction": f, "to_previous": sims})
            if self.layer_scalars and sims:
                self._use_category("per layer")
            for n in self.layers:
                if n in sims and math.isfinite(sims[n]):
                    for s in self.sinks:
                        if s.all_scalars:
                            s.add_scalars({self.tag("to_previous", n): sims[n]}, step)
                    if self.layer_scalars:
                        self._tensorboard_layer_scalar("to_previous", n, sims[n], step)
        if not images or not sims or not self.schedule.live_due(f, final):
            self.flush()  # the scalars on disk now: visible at once
            return False
        when = encoding.checkpoint_label(step, f)
        if matrix is None and previous is not None and current is not None:
            m: Optional[torch.Tensor] = None
            prev_bases, cur_bases = previous, current

            def the_matrix() -> Optional[torch.Tensor]:  # computed only when drawn
                nonlocal m
                if m is None:
                    m = self._matrix(prev_bases, cur_bases)
                return m
        else:
            given = None if matrix is None else torch.as_tensor(matrix)
            the_matrix = lambda: given  # noqa: E731
        if matrix is not None or (previous is not None and current is not None):
            title = self._title(f"{when} vs step {prev_step}", step)
            frozen = self._frozen_by(step)
            self._add_image(self.tag("live", "to_previous_matrix"), lambda: encoding.live_matrix(
                the_matrix(), self.layers, title=title, step=step, previous_step=prev_step, frozen_layers=frozen)
                if the_matrix() is not None else None, step, final=final)  # no common layer: no heatmap
        curves, known = self.schedule.curves(self.layers)
        drawn = self._add_image(self.tag("live", "to_previous_curves"), lambda: encoding.curves(
            curves, x="fraction" if known else "step", title=f"vs previous capture, to {when}",
            freeze_steps=self.frozen_at), step, final=final)
        self.flush()  # on disk now: visible at once, and kept if training crashes later
        return drawn

    def log_dynamics(self, dynamics: LearningDynamics, *, freeze_steps: Optional[Mapping[str, int]] = None
                     ) -> Dict[str, List[int]]:
        """The end-of-training views from the learning-dynamics matrices: the chosen
        ``<name>/dynamics/to_final_matrix`` heatmaps (among the checkpoints with a full
        matrix, where the curves change, plus ``fractions``), the grid image (4 of them, 2x2),
        the depth-coloured convergence curves at the final step, the whole run's live curves
        if not drawn at the final capture; ``<name>/to_final/<layer>`` scalars for the sinks
        that take every series. ``freeze_steps``: ``{layer: step}`` (default: what
        :meth:`log_freeze` was told). Returns ``{image tag: steps written}``."""
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
        if any(s.all_scalars for s in self.sinks):
            to_final = dynamics.to_final()
            for c, st in enumerate(dynamics.steps):
                self._scalars({}, int(st), every={self.tag("to_final", n): float(v) for n, v in
                                                  zip(dynamics.layers, to_final[c].tolist()) if math.isfinite(v)})
        written: Dict[str, List[int]] = {}
        tag = self.tag("dynamics", "to_final_matrix")
        # only checkpoints with a full matrix can be heatmaps: choose among them (all when full is None)
        cands = list(range(len(dynamics.steps))) if dynamics.full is None else sorted(dynamics.full)
        picked = [cands[i] for i in select_checkpoints(
            dynamics.matrices[cands], [dynamics.fractions[c] for c in cands], max_images=self.max_images,
            anchors=self.fractions or (), min_change=self.min_change)] if cands else []
        for c in picked:
            s = int(dynamics.steps[c])
            title = self._title(f"{encoding.checkpoint_label(s, dynamics.fractions[c])} vs end of training", s)
            lower = [n for n in dynamics.layers if n in frozen and frozen[n] <= s]
            if self._add_image(tag, lambda: encoding.to_final_matrix(dynamics, c, title=title, frozen_layers=lower), s,
                               final=c == picked[-1]):
                written.setdefault(tag, []).append(s)
        grid = (grid_checkpoints(dynamics, fractions=self.fractions) if self.fractions is not None else
                grid_checkpoints(dynamics, candidates=picked, min_change=self.min_change) if picked else [])
        # four heatmaps in one card: larger fonts (a Time Series card shows it about 250 px high)
        if grid and self._add_image(self.tag("dynamics", "grid"), lambda: encoding.grid(dynamics, grid, frozen),
                                    final_step, final=True, scale=encoding.GRID_FONT_SCALE):
            written[self.tag("dynamics", "grid")] = [final_step]
        if self._add_image(self.tag("dynamics", "to_final_curves"), lambda: encoding.curves(
                dynamics.curves(), title="similarity to own final state", freeze_steps=frozen, x="fraction"),
                final_step, final=True):
            written[self.tag("dynamics", "to_final_curves")] = [final_step]
        live = self.tag("live", "to_previous_curves")
        history = self.schedule.history
        last = history[-1] if history else None
        # one comparison only (captures at the start and the end): one point per layer, the
        # first point of the to-final curves drawn above
        if (last is not None and last["to_previous"] and self.schedule.compared > 1
                and self.images_written.get(live, [None])[-1] != last["step"]):
            lc, known = self.schedule.curves(self.layers)
            if self._add_image(live, lambda: encoding.curves(
                    lc, x="fraction" if known else "step", title="similarity to previous capture, whole run",
                    freeze_steps=frozen), last["step"], final=True):
                written[live] = [last["step"]]
        self.flush()
        return written

