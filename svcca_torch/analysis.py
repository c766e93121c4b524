"""The end of a tracked run: learning-dynamics matrices, curves, figures and ``svcca_summary.json``.

Every capture is compared with the final one layer by layer (the to-final curves, one small
eigenproblem per layer, batched); full layers x layers matrices only for the captures that are
shown, chosen from those curves (:func:`shown_dynamics`). Activations are never read here:
the store keeps each capture's reduced bases.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from .dynamics import LayerCurves, LearningDynamics, convergence_order, learning_dynamics
from .settings import TrackerSettings
from .store import RepresentationStore
from .utils.files import atomic_write
from .utils.validation import NonFiniteError, ZeroVarianceError

__all__ = ["FinalAnalysis", "analyse", "analyse_run", "shown_dynamics", "online_previous"]


@dataclass
class FinalAnalysis:
    """The end-of-run analysis (rank 0): matrices, to-final and to-previous curves."""

    dynamics: LearningDynamics
    to_final: LayerCurves
    to_previous: LayerCurves
    summary: Dict[str, Any] = field(repr=False, default_factory=dict)


def shown_dynamics(store: RepresentationStore, *, device: Optional[Union[str, torch.device]] = None,
                   progress: bool = False, max_images: int = 6, previous: bool = False,
                   grid: Sequence[float] = (), layers: Optional[Sequence[str]] = None) -> LearningDynamics:
    """The learning dynamics of a run with full matrices only where they are shown.

    One pass over ``store`` compares every capture with the final one layer by layer (the
    to-final curves) and, for the first and the last capture (and the captures nearest the
    ``grid`` fractions, e.g. the paper's 0/35/75/100%, when given), layers x layers.
    :func:`svcca_torch.views.selection.full_checkpoints` then picks from the curves the heatmaps shown
    (at most ``max_images``: step 0, the end, then where the curves change most; the grid
    image's panels are among them), and only those not computed yet are loaded again for a
    full matrix. Off-diagonal entries of the other captures are NaN; ``.full`` lists the
    computed ones. ``previous=True`` also fills ``.previous`` (each layer against the capture
    before it) in the first pass. Bases are compared on ``device`` (default CPU); the result
    is on the CPU. ``layers``: which stored layers, in which order (default the store's).
    """
    from .views.selection import full_checkpoints

    first = sorted({store.checkpoints[0].step, store.checkpoints[-1].step}
                   | {store.nearest(f).step for f in grid})
    dyn = learning_dynamics(store, layers=layers, full=first, progress=progress, device=device, previous=previous)
    full = full_checkpoints(dyn.curves(), grid=grid, max_images=max_images)
    extra = [c for c in full if c not in (dyn.full or [])]
    if extra:
        steps = [dyn.steps[c] for c in extra]
        dyn.matrices[extra] = learning_dynamics(store, steps, layers=layers, full=steps, device=device).matrices
    dyn.full = sorted(set(full) | set(dyn.full or []))
    return dyn


def online_previous(store: RepresentationStore, to_previous: Sequence[Mapping[str, Any]],
                    names: Sequence[str]) -> Optional[torch.Tensor]:
    """``(captures, layers)`` similarity of each stored capture to the one before, from the
    values the captures computed during training (on the bases before encoding), or None when
    some capture after the first has none (then the analysis recomputes them)."""
    steps = [c.step for c in store.checkpoints]
    known = {e["step"]: e for e in to_previous}
    if any(s not in known for s in steps[1:]):
        return None
    out = torch.full((len(steps), len(names)), math.nan, dtype=torch.float64)
    for c, s in enumerate(steps[1:], 1):
        for j, n in enumerate(names):
            if n in known[s]:
                out[c, j] = float(known[s][n])
    return out


def analyse(store: RepresentationStore, settings: TrackerSettings, summary: Dict[str, Any], *,
            layers: Sequence[str], to_previous: Sequence[Mapping[str, Any]], freeze_steps: Mapping[str, int],
            device: torch.device, failures: List[Dict[str, Any]]) -> Optional[FinalAnalysis]:
    """Analyse the run in ``store`` and write ``svcca_summary.json`` (``summary`` plus what is
    computed here) and, with ``settings.figures``, the run folder's PNGs to
    ``settings.run_dir``. Data errors of the analysis are appended to ``failures`` (the rest
    is written); any other error is raised after the summary is written."""
    run_dir = Path(settings.run_dir)
    result = None
    run_dir.mkdir(parents=True, exist_ok=True)
    try:  # the summary is written whatever fails below (with what was computed before it)
        dyn = None
        if settings.final_analysis and len(store) >= 1:
            online = online_previous(store, to_previous, layers)
            try:
                dyn = shown_dynamics(store, device=device, progress=settings.progress, previous=online is None,
                                     max_images=settings.final_heatmaps, grid=settings.grid_fractions or (),
                                     layers=layers)
            except (ZeroVarianceError, NonFiniteError) as err:  # about the data: recorded, the rest written
                failures.append({"step": None, "layer": None, "kind": "final analysis",
                                 "message": f"final analysis: {err}"})
        if dyn is not None:
            if online is not None:
                dyn.previous = online
            shown = [dyn.steps[c] for c in dyn.full or []]
            fin, prev = dyn.curves(), dyn.to_previous()
            summary.update(steps=dyn.steps, fractions=dyn.fractions, full_steps=shown,
                           matrices=_nan_to_none(dyn.matrices.tolist()), to_final=_nan_to_none(fin.values.tolist()),
                           to_previous=_nan_to_none(prev.values.tolist()))
            # judged on each layer before it froze, with its statistic
            summary["convergence"] = convergence_order(fin, freeze_steps=freeze_steps)
            result = FinalAnalysis(dyn, fin, prev, summary)
            if settings.figures:  # the views' pixels, through a PNGSink (the same as TensorBoard's)
                from .views import write_figures

                write_figures(result, run_dir, grid_fractions=settings.grid_fractions, freeze_steps=freeze_steps,
                              to_previous=bool(settings.freeze))
    finally:
        summary["failures"] = [dict(f) for f in failures]
        text = json.dumps(summary, indent=1).encode()
        atomic_write(run_dir / "svcca_summary.json", lambda f: f.write(text))  # a link there is replaced
    return result


def analyse_run(tracker: Any, store: RepresentationStore) -> Optional[FinalAnalysis]:
    """:func:`analyse` a :class:`~svcca_torch.tracker.DynamicsTracker`'s run from its public
    record: the summary's run facts (layers in depth order, captures, probe, own time, the
    freeze policy's log and :meth:`~svcca_torch.freeze.FreezePolicy.summary`, the capture
    schedule, the layers constant at the start) and the analysis of ``store``."""
    st, frozen_at, policy = tracker.settings, tracker.layer_freeze_steps, tracker.policy
    # in depth order (a layer constant at the start is stored first when it varies, after the others)
    order = [n for n in (tracker.recorder.layers if tracker.recorder is not None else []) if n in store.layers]
    layers = order + [n for n in store.layers if n not in order]
    freeze: Dict[str, Any] = {
        "policy": st.freeze or None, "window": st.freeze_window,
        "groups": [{"name": g.name, "modules": g.module_names} for g in tracker.groups],
        "events": tracker.freeze_log, "signal": [], "freeze_steps": tracker.freeze_steps,
        "layer_freeze_steps": frozen_at, "signal_raw": [], "signal_budget": None, "chance": None,
        "policy_state": policy.state_dict() if policy is not None else None,
        **(policy.summary() if policy is not None else {})}
    summary: Dict[str, Any] = {
        "layers": layers, "captured_steps": list(tracker.captured_steps), "probe_checksum": tracker.probe_checksum,
        "store": str(store.folder), "overhead": tracker.overhead, "frozen_cache": tracker.frozen_cache_stats,
        "freeze": freeze, "schedule": tracker.schedule_summary(),
        "constant_at_start": {k: dict(v) for k, v in tracker.constant_layers.items()}}
    device = st.analysis_device or next((t.device for t in tracker.model.parameters()), torch.device("cpu"))
    return analyse(store, st, summary, layers=layers, to_previous=tracker.to_previous, freeze_steps=frozen_at,
                   device=device, failures=tracker.failures)


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x
