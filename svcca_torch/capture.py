"""Captures: record the chosen layers on the probe, reduce them and keep them in the store.

A capture records every chosen layer on the fixed probe (common rows, for layers x layers
heatmaps), reduces each with :func:`~svcca_torch.svd_reduce` into a
:class:`~svcca_torch.store.RepresentationStore` and measures each layer's similarity to the
previous capture. A layer constant over the probe or not finite there is a
:class:`CaptureError` naming the layer, the step, the kind of recording and the fix; a layer
constant since the run's first capture (a zero-initialised head) or whose variation is below
its values' rounding for now is left out until it varies (:class:`ConstantLayers`).

Activations are ``(datapoints, neurons)``, ``(N, C, H, W)`` for conv layers (pooled to
datapoints by the recorder) and ``(N, L, D)`` for tokens (each token a datapoint).
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .dynamics import paired_similarity
from .functional.svcca import ReducedBasis, svd_reduce
from .probe import Probe
from .recorder import ActivationRecorder, Inputs, direction_limits
from .store import RepresentationStore
from .utils.validation import NonFiniteError, ZeroVarianceError

__all__ = ["CaptureError", "Capturer", "ConstantLayers", "swamped", "model_device"]

#: probe inputs of the small traced forwards (layer order, layer shapes, frozen modules' call order)
EXAMPLES = 2

ShardedRecord = Callable[[ActivationRecorder, Union[torch.Tensor, Inputs]], Optional[Dict[str, torch.Tensor]]]


def model_device(model: nn.Module) -> Optional[torch.device]:
    """The device of the model's first parameter or buffer (None when it has neither)."""
    return next((t.device for t in (*model.parameters(), *model.buffers())), None)


class CaptureError(ValueError):
    """A recorded layer cannot be reduced: constant over the probe (zero variance) or not
    finite (NaN/Inf). The message names the layer, the step, the kind of recording
    (``"start"``, ``"capture"``, ``"freeze signal"``, ``"final capture"``) and the fix; the
    same are attributes (``constant``: the layer had zero variance, else it was not finite).
    Raised at the recording that meets it, except in :meth:`DynamicsTracker.finish`, which
    records it (``tracker.failures``, ``"failures"`` in ``svcca_summary.json``), analyses the
    run without that layer and warns once; a layer constant at the run's first capture (a
    zero-initialised head) is no error at all (see :class:`DynamicsTracker`)."""

    def __init__(self, message: str, *, step: int, layer: str, kind: str, owner: str = "DynamicsTracker",
                 constant: bool = False) -> None:
        super().__init__(f"{owner}: {message}")
        self.step, self.layer, self.kind, self.detail = int(step), layer, kind, message
        self.constant = bool(constant)

    def entry(self) -> Dict[str, Any]:
        """``{"step", "layer", "kind", "message"}``: the summary JSON's failure record."""
        return {"step": self.step, "layer": self.layer, "kind": self.kind, "message": self.detail}


def swamped(t: torch.Tensor, earlier: Optional[ReducedBasis]) -> Optional[str]:
    """Why a recorded layer the kernel found constant (every neuron within the rounding of its
    mean) is not dead, or None when it is: its values do vary over the probe, below the float
    rounding of their mean, and their spread did not collapse since ``earlier`` (the layer's
    last reduced basis, if any: at least 1% of its root-mean-square spread then). A dead layer
    (ReLUs all off, zeroed weights, a saturated activation) is exactly constant or lost its
    spread."""
    x = t.detach().double()
    if x.ndim != 2 or x.shape[0] < 2 or not bool(torch.isfinite(x).all()):
        return None
    spread = float((x - x.mean(0)).pow(2).sum().div(x.shape[0]).sqrt())
    if not spread > 0:
        return None
    if earlier is not None and earlier.n_datapoints:
        before = float(earlier.singular_values.double().pow(2).sum().div(earlier.n_datapoints).sqrt())
        if spread < 0.01 * before:
            return None
    return (f"its values vary over the probe (root-mean-square spread {spread:.2g}), below the float rounding of their "
            f"mean (mean |value| {float(x.abs().mean()):.2g})")


class ConstantLayers:
    """Layers left out of captures and the freeze signal while they are constant over the probe.

    :attr:`layers` is ``{layer: {"constant_at": step, "first_varied": capture step or None,
    "signal_from": first freeze-signal step at which it varied, or None[, "reason"]}}``
    (``svcca_summary.json``'s ``"constant_at_start"``); :attr:`warned` holds the keys of the
    warnings given once per run."""

    def __init__(self, owner: str = "DynamicsTracker") -> None:
        self.owner = owner
        self.layers: Dict[str, Dict[str, Any]] = {}
        self.warned: set = set()

    def note_swamped(self, step: int, swamped: Mapping[str, str], where: str) -> None:
        """Layers found constant at ``step`` that are not dead (:func:`swamped`): left out of
        the captures and the freeze signal until they vary again, like a layer constant at the
        start (:attr:`constant_layers`, ``"reason"`` says why), one warning per layer."""
        for n, why in swamped.items():
            self.layers[n] = {"constant_at": int(step), "first_varied": None, "signal_from": None,
                                       "reason": why}
            if ("swamped", n) in self.warned:
                continue
            self.warned.add(("swamped", n))
            warnings.warn(
                f"{self.owner}: layer {n!r} is constant over the probe at step {step} ({where}), but it is "
                f"not dead: {why}, as when an output bias grows over activations that are still tiny in eval mode "
                "(BatchNorm running statistics not adapted yet). It is left out of the captures and the freeze signal "
                "until it varies, then recorded and judged from there (svcca_summary.json, \"constant_at_start\", "
                "says when).", UserWarning, stacklevel=4)

    def pending(self, name: str, key: str) -> bool:
        """Whether ``name`` was constant at the first capture and has not varied since, in the
        captures (``key="first_varied"``) or in the freeze signal (``"signal_from"``)."""
        entry = self.layers.get(name)
        return entry is not None and entry[key] is None

    def note_constant(self, step: int, constant: Sequence[str], bases: Mapping[str, Any]) -> None:
        """A capture's layers that are constant since the start (one warning for those new)
        and those that varied for the first time."""
        new = [n for n in constant if n not in self.layers]
        for n in new:
            self.layers[n] = {"constant_at": int(step), "first_varied": None, "signal_from": None}
        if new:
            names = ", ".join(repr(n) for n in new)
            one = len(new) == 1
            warnings.warn(
                f"{self.owner}: layer{'' if one else 's'} {names} {'is' if one else 'are'} constant over the "
                f"probe at step {step} (every neuron has one value on every probe input, as a zero-initialised layer "
                f"has); {'it is' if one else 'they are'} left out of the captures and the freeze signal until "
                f"{'it varies' if one else 'each varies'}, then recorded and judged from there (svcca_summary.json, "
                "\"constant_at_start\", says when).", UserWarning, stacklevel=4)
        for n in bases:
            if self.pending(n, "first_varied"):
                self.layers[n]["first_varied"] = int(step)

    def keep_until(self, step: int) -> None:
        """Forget what varied in the part of a run that was not kept (after ``step``)."""
        for entry in self.layers.values():
            for key in ("first_varied", "signal_from"):
                if entry[key] is not None and entry[key] > step:
                    entry[key] = None


class Capturer:
    """Records the probe, reduces and stores captures; keeps the capture history.

    Attributes:
        captured_steps: steps captured, in order.
        to_previous: ``[{"step", layer: similarity to the previous capture}]``.
        last: the last capture's bases ``{layer: ReducedBasis}`` (None before the first).
        failures: data errors recorded (not raised) at the final capture.
        capture_cost / analysis_cost: seconds of the last capture, of the analysis per capture.
        timings: ``[(step, seconds)]`` of every capture this process took, in order.
    """

    def __init__(self, model: nn.Module, probe: Probe, recorder: ActivationRecorder, *, is_writer: bool = True,
                 sharded_record: Optional[ShardedRecord] = None, owner: str = "DynamicsTracker") -> None:
        self.model, self.probe, self.recorder = model, probe, recorder
        self.is_writer, self.sharded_record, self.owner = is_writer, sharded_record, owner
        self.store: Optional[RepresentationStore] = None
        self.constant = ConstantLayers(owner)
        self.captured_steps: List[int] = []
        self.to_previous: List[Dict[str, Any]] = []
        self.last: Optional[Dict[str, ReducedBasis]] = None
        self.failures: List[Dict[str, Any]] = []
        self.capture_cost: Optional[float] = None
        self.analysis_cost = 0.0
        self.timings: List[Tuple[int, float]] = []
        self._shapes: Dict[str, Tuple[int, int]] = {}

    def record(self, layers: Optional[Sequence[str]] = None, n_images: Optional[int] = None
                ) -> Optional[Dict[str, torch.Tensor]]:
        """Record on the first ``n_images`` probe inputs (default all), hashing the probe
        batch by batch; ``None`` on ranks that do not receive the rows.

        ``layers=None``: a full capture, every layer on the common rows (for layers x layers
        heatmaps), sharded over ranks when ``sharded_record`` is set. Otherwise a freeze-signal
        recording of those layers only, each conv layer on its own grid (``rows="per_layer"``,
        same-layer comparisons need no common rows, so a deep 1x1 map does not starve them)
        and without ``max_datapoints`` (the signal slices whole images per layer instead); the
        forward stops after the highest of them. It runs on the writer alone, which decides
        and broadcasts the policy (it is a few hundred images through the bottom of the network).
        Results stay on the model's device.
        """
        rec = self.recorder
        assert rec is not None
        rec.device = model_device(self.model)
        if layers is None:
            if self.sharded_record is not None:
                return self.sharded_record(rec, self.probe.whole(n_images))
            if not self.is_writer:
                return None
            return rec.record(self.probe.inputs(n_images), rows="common")
        if not self.is_writer:
            return None
        cap, rec.max_datapoints = rec.max_datapoints, None
        try:
            return rec.record(self.probe.inputs(n_images), layers=list(layers), rows="per_layer")
        finally:
            rec.max_datapoints = cap

    def reduce(self, name: str, x: torch.Tensor, step: int, keep: Union[int, float], keep_rule: str,
                max_directions: Optional[int] = None, *, kind: str) -> ReducedBasis:
        """:func:`svd_reduce` of one recorded layer, on its device. A layer constant over the
        probe or not finite there is a :class:`CaptureError` naming the layer, the step, the
        kind of recording (``"start"``, ``"capture"``, ``"freeze signal"``, ``"final capture"``)
        and the likely cause and fix, caught by type from the kernel (not re-worded): at the
        start the probe or the initial model is to blame, later the training (the probe is
        checked unchanged at every capture, and the layer passed the earlier ones)."""
        first = kind == "start" or not self.captured_steps or step <= self.captured_steps[0]
        at = f"at step {step} ({kind})"
        try:
            return svd_reduce(x, keep, keep_rule=keep_rule, max_directions=max_directions, name=name)
        except ZeroVarianceError as err:
            constant = True
            if first:
                msg = (f"layer {name!r} is constant over the probe {at}: {err} Fix: use a probe of varied real "
                       "inputs (e.g. svcca_torch.data.probe_set(dataset, 1024)), or "
                       f"leave {name!r} out of `layers`.")
            else:
                msg = (f"layer {name!r} is constant over the probe {at}: every neuron has the same value on every "
                       "probe input, so it spans no direction to compare. The probe is the one of the earlier "
                       "captures (it is checked at each), so the layer died during training (e.g. every ReLU unit "
                       "off, or a saturated activation). Fix: lower the learning rate (or add normalisation before "
                       f"the layer), or leave {name!r} out of `layers`.")
        except NonFiniteError as err:
            constant = False
            what = (f"layer {name!r} has {err.count} NaN or Inf values ({err.nan} NaN, {err.count - err.nan} Inf, "
                    f"in {err.rows} of {err.n_rows} probe datapoints) {at}")
            bad, where = self.probe.non_finite() if first else (0, -1)
            if bad:
                msg = (f"{what}: the probe holds {bad} input{'s' if bad > 1 else ''} with NaN or Inf values (the "
                       f"first: input {where}). SVCCA compares finite activations; fix: drop or repair those "
                       "probe inputs.")
            elif first:
                msg = (f"{what}: the model is not finite on the (finite) probe at the start of the run. Fix: check "
                       "the initialisation (or the checkpoint the run resumed from) for NaN/Inf weights and the "
                       f"operations up to {name!r} (a log or a division by zero?); or leave {name!r} out of `layers`.")
            else:
                msg = (f"{what}: the model diverged by step {step} (the earlier captures were finite). Fix: lower "
                       "the learning rate (or clip gradients, or add a warm-up) and check the loss for NaN/Inf; if "
                       f"only this layer overflows, leave {name!r} out of `layers`.")
        raise CaptureError(msg, step=step, layer=name, kind=kind, owner=self.owner,
                           constant=constant) from None

    def capture(self, step: int, epoch: Optional[int] = None, *, final: bool = False, started: bool = True
                ) -> Dict[str, Any]:
        """Record every layer now, store it and return ``{"step", "to_previous"}``
        (``to_previous`` is empty on ranks other than the writer)."""
        t0 = time.perf_counter()
        acts = self.record(None)
        sims: Dict[str, float] = {}
        if acts is not None:
            assert self.store is not None
            settings = self.store.settings
            # keep directions within the datapoints' reach: beyond rows / 5 CCA reports
            # spuriously high similarity (e.g. 512 channels on 1,024 rows of 1x1 maps)
            limits = direction_limits(acts)
            capped = {n: (limits[n], acts[n].shape[0]) for n in acts
                      if limits[n] < acts[n].shape[1] and ("capped", n) not in self.constant.warned}
            cap = settings["max_directions"]
            kind = "final capture" if final else "capture" if started else "start"
            bases: Dict[str, ReducedBasis] = {}
            first = not self.captured_steps
            constant: List[CaptureError] = []
            quiet: Dict[str, str] = {}
            for name in list(acts):
                t = acts.pop(name)
                try:
                    bases[name] = self.reduce(name, t, step, settings["keep"], settings["keep_rule"],
                                               limits[name] if cap is None else min(cap, limits[name]), kind=kind)
                except CaptureError as err:
                    if err.constant and (first or self.constant.pending(name, "first_varied")):
                        constant.append(err)  # constant since the start (a zero-initialised head): left out
                        continue
                    why = swamped(t, (self.last or {}).get(name)) if err.constant else None
                    if why is not None:  # not dead: its variation is below its values' rounding for now
                        quiet[name] = why
                        continue
                    if not final:
                        raise
                    self.failures.append(err.entry())  # finish(): stored and analysed without this layer
                finally:
                    del t
            self.constant.note_swamped(step, quiet, kind)
            if constant and not bases and first and not self.failures:
                raise constant[0]  # every layer constant at the first capture: the probe is
            self.constant.note_constant(step, [e.layer for e in constant], bases)
            capped = {n: v for n, v in capped.items() if n in bases}  # a constant layer has no directions
            if capped:
                self.constant.warned.update(("capped", n) for n in capped)
                warnings.warn(
                    f"{self.owner}: the probe gives too few datapoints to keep every direction of "
                    + ", ".join(f"{n!r} (at most {k} directions from {rows} datapoints)" for n, (k, rows)
                                in capped.items())
                    + "; they keep at most datapoints / 5 directions so that CCA stays unbiased. A larger probe "
                    "(or a larger `grid`) keeps more.", UserWarning, stacklevel=3)
            if not bases:  # every layer failed (in finish()): nothing to store, the run ends at the last capture
                return {"step": step, "to_previous": sims}
            if step in [c.step for c in self.store.checkpoints]:
                warnings.warn(
                    f"{self.owner}: step {step} is already in the store at {self.store.folder} (a run "
                    "resumed from an earlier checkpoint?); keeping the stored capture.", UserWarning, stacklevel=2)
            else:
                # no fraction stored: the store uses step / final step, right also when training stops early
                self.store.add(bases, step=step, epoch=epoch)
            t1 = time.perf_counter()
            if self.last is not None:
                sims = paired_similarity(self.last, bases)
                # the final analysis compares every capture with the final one, layers x layers
                self.analysis_cost = (time.perf_counter() - t1) * max(1, len(bases))
            self.last = bases
            if sims:
                self.to_previous.append({"step": step, **sims})
        self.captured_steps.append(step)
        self.capture_cost = time.perf_counter() - t0
        self.timings.append((int(step), self.capture_cost))
        return {"step": step, "to_previous": sims}

    def layer_shapes(self, layers: Sequence[str]) -> Dict[str, Tuple[int, int]]:
        """``{layer: (neurons, pooled cells per input at its own grid)}``, from one tiny
        per-layer-rows recording of two probe inputs per new layer (it stops after them)."""
        todo = [n for n in layers if n not in self._shapes]
        if todo:
            rec = self.recorder
            rec.device = model_device(self.model)
            tiny = rec.record(self.probe.head(EXAMPLES), layers=todo, rows="per_layer")
            for n, t in tiny.items():
                h, w = rec.layer_grids[n]
                self._shapes[n] = (int(t.shape[1]), h * w)
        return {n: self._shapes[n] for n in layers}

    def keep_until(self, step: int) -> None:
        """Forget captures after ``step`` (a resumed run's that were not kept)."""
        self.captured_steps = [s for s in self.captured_steps if s <= step]
        self.to_previous = [e for e in self.to_previous if e["step"] <= step]
        self.constant.keep_until(step)
