"""DynamicsTracker: SVCCA learning dynamics and freeze training in any PyTorch training loop.

The engine behind :class:`svcca_torch.callbacks.SVCCACallback`, usable without Lightning::

    tracker = DynamicsTracker(model, probe, run_dir="runs/svcca", freeze="adaptive",
                              freeze_window=len(loader))          # window: one epoch of steps
    tracker.start()                                               # capture at step 0
    step = 0
    for epoch in range(epochs):
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step(); step += 1
            tracker.maybe_capture(step, epoch=epoch)              # captures, freezes
    tracker.finish(step)                # figures + svcca_summary.json; releases the store's lock

It owns four things:

* the **capture schedule**: a capture records every chosen layer on the fixed probe set,
  reduces it (:func:`~svcca_torch.svd_reduce`) into a
  :class:`~svcca_torch.store.RepresentationStore` and measures each layer's similarity to
  the previous capture. Captures are taken at step 0, at the end, and in between: at every
  point of an explicit schedule (``every_n_steps``, or the caller's ``request``), all of
  them; with none, the tracker's own schedule within ``max_overhead`` of the training time
  (keeping enough in reserve for the final capture and analysis): front-loaded points at
  :data:`LADDER` (1% to 90% of training, log-spaced, where representations change most),
  each taken when the run's projected budget affords it, and in between captures spaced by
  the budget of the training time so far. Every capture the budget skips is counted and
  explained in :meth:`schedule_report` and ``svcca_summary.json`` (``"schedule"``).
* the **freeze signal** (``freeze="adaptive"``): every ``freeze_window`` optimizer steps
  (a grid fixed in training steps, independent of the capture schedule) it records only
  the layers of the lowest two still-trained groups (the forward stops after the highest
  of them), each on enough probe images for ``signal_datapoints_per_neuron`` datapoints
  per neuron at its own pooling grid, and compares them with the same recording one
  window earlier. A group freezes once that similarity has been ``>= freeze_threshold``
  at ``freeze_patience`` consecutive grid points (and every group below it is frozen).
  When the lowest may freeze at the next grid point, the two groups above are recorded
  too, so that they are judged right after it freezes. How often heatmap captures are
  taken therefore never changes what freezes.

  Each layer is judged against its **chance level**, measured once at the start: the same
  signal between the model and an independently initialised copy of it (same probe images
  and grid). A layer is judged on ``(s - chance) / (1 - chance)``, the part of its
  similarity that learning can move; a layer whose chance level is above
  :data:`~svcca_torch.freeze.CHANCE_LIMIT` (a first conv layer over image patches reads ~1
  whatever its weights) is not judged on its own signal and freezes with the group above it.
  See :class:`~svcca_torch.freeze.AdaptiveFreezePolicy` for the rule.

  The signal's **cost is inside the time budget**, for any model: its recordings (and the
  chance calibration) may spend :data:`SIGNAL_SHARE` of ``max_overhead`` of the training
  time so far (counted as at least :data:`SHORT_RUN_SECONDS`, as the capture schedule's
  floor), measured like captures. A recording that does not fit is thinned (the look-ahead
  groups dropped, then all but the lowest group) and otherwise the window is skipped (no
  observation: streaks neither grow nor reset). A recording that starts a comparison pair
  must fit twice (it is of use only with the next window's). What was skipped or thinned,
  and why, is in :attr:`signal_stats`, :meth:`signal_report` and ``svcca_summary.json``
  (``"freeze"`` / ``"signal_budget"``). Captures see the signal's time in the tracker's own
  time, so together they stay within ``max_overhead``. With ``max_overhead=None`` every
  window is recorded.
* the **freezing** (:mod:`svcca_torch.freeze`): frozen parameters get
  ``requires_grad=False`` and ``grad=None`` and their BatchNorm layers stay in eval mode,
  so they stay bit-identical. With ``frozen_cache=True`` (opt-in) the frozen prefix's output
  is kept per training input, so a batch seen before skips the frozen forward too
  (:mod:`svcca_torch._cache`: exact or off, off by itself under random augmentation).
* the **final analysis**: learning-dynamics matrices, figures and ``svcca_summary.json``.

Activations are ``(datapoints, neurons)`` (batch-first), or ``(N, C, H, W)`` for conv
layers (folded to datapoints by the recorder).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .dynamics import LayerCurves, LearningDynamics, learning_dynamics, paired_similarity
from ._cache import CACHE_BYTES, FrozenOutputCache
from ._prefix import PrefixReuse, Recording, call_order, outermost
from .freeze import (
    CHANCE_LIMIT,
    DEFAULT_THRESHOLD,
    AdaptiveFreezePolicy,
    FreezePolicy,
    LayerGroup,
    backward_flops,
    calibrated_similarity,
    default_layer_groups,
    explicit_layer_groups,
    freeze_group,
    is_frozen,
    get_policy,
)
from .functional.svcca import ReducedBasis, svd_reduce
from .recorder import ActivationRecorder, Inputs, _input_set, _iter_probe, direction_limits, to_model
from .settings import TrackerSettings
from .store import RepresentationStore
from .utils.validation import (
    NonFiniteError,
    ZeroVarianceError,
    check_bool,
    check_device,
    check_flag_or_bytes,
    check_fraction,
    check_keep,
    check_positive_int,
    check_probe,
)

__all__ = ["DynamicsTracker", "TrackerEvents", "FinalAnalysis", "CaptureError", "check_probe", "probe_size",
           "shown_dynamics"]

#: SVD truncation of the freeze signal's recordings (fraction of variance kept, as in the paper)
SIGNAL_KEEP = 0.99
#: probe inputs of the traced forwards (layer order, layer shapes, frozen modules' call order)
_FLOPS_EXAMPLES = 2
#: Seconds the capture budget holds back per end-of-run figure (drawing one 720 x 540 px
#: figure with Agg took 0.11 to 0.39 s on one CPU thread of the development machine).
FIGURE_SECONDS = 0.3
#: The default capture schedule's front-loaded points, as fractions of training: log-spaced
#: (ratio sqrt 2) from 1% to 90%, so that captures land where representations change most
#: (early), half of them in the first 10%. Each is taken when the whole run's budget
#: (``max_overhead`` of the training time projected from the steps so far) affords it.
LADDER = tuple(0.01 * 2 ** (k / 2) for k in range(14))
#: On a run projected to train for less than this (seconds), the ladder points nearest 1%, 3%
#: and 8% of training are taken even when the budget cannot afford them (a short run's 5% is
#: less than the figures drawn at its end); what they cost is reported at the end. The freeze
#: signal counts a training time of at least this for its share too.
SHORT_RUN_SECONDS = 300.0
#: The freeze signal's share of ``max_overhead``: its recordings (with the chance calibration)
#: may spend at most this fraction of the budget (of the training time so far, counted as at
#: least :data:`SHORT_RUN_SECONDS`); captures take what the whole budget leaves.
SIGNAL_SHARE = 0.5
#: Seed of the independently initialised copy the chance levels are measured against.
CHANCE_SEED = 20170601
FLOOR = (LADDER[0], LADDER[3], LADDER[6])

Groups = Union[Mapping[str, Sequence[str]], Sequence[Sequence[str]]]


# ----------------------------------------------------------------------------------- probe
def probe_size(probe: Any, model: Optional[nn.Module] = None) -> int:
    """Number of inputs in ``probe``: a tensor, one set of several model inputs (a tuple or
    dict of tensors, see :func:`svcca_torch.recorder.model_inputs`; ``model`` tells how its
    forward takes them) or a re-iterable of batches (iterated once when its size is not
    known otherwise)."""
    if isinstance(probe, torch.Tensor):
        return int(probe.shape[0])
    whole = _input_set(probe, model)
    if whole is not None:
        return whole.rows
    dataset = getattr(probe, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    return sum(b.rows for b in _iter_probe(probe, 1 << 62, model))


def _plain(x: Inputs) -> Union[torch.Tensor, Inputs]:
    """A batch of one positional input as that tensor (the single-input paths, as before
    several inputs were read), else the :class:`~svcca_torch.recorder.Inputs`."""
    if len(x.args) == 1 and not x.kwargs and isinstance(x.args[0], torch.Tensor):
        return x.args[0]
    return x


def _cat(batches: Sequence[Union[torch.Tensor, Inputs]]) -> Union[torch.Tensor, Inputs]:
    """Probe batches joined into one: tensors concatenated; :class:`Inputs` input by input (each
    per-input tensor concatenated, anything else taken from the first batch)."""
    if all(isinstance(b, torch.Tensor) for b in batches):
        return torch.cat(list(batches))
    parts = [b if isinstance(b, Inputs) else Inputs((b,)) for b in batches]

    def join(values: Sequence[Any]) -> Any:
        if isinstance(values[0], torch.Tensor) and values[0].ndim > 0:
            return torch.cat(list(values))
        return values[0]

    first = parts[0]
    args = [join([p.args[i] for p in parts]) for i in range(len(first.args))]
    return Inputs(args, {k: join([p.kwargs[k] for p in parts]) for k in first.kwargs})


def _hash_batch(h: Any, x: Inputs) -> None:
    """Feed one probe batch to the digest ``h``: every per-input tensor (shape, dtype and
    bits) and the other values passed with it. A batch of one tensor is hashed as it always
    was (its shape and float32 values), so the digests of earlier runs still match on resume."""
    tensors = x.tensors()
    if len(tensors) == 1 and len(x.args) + len(x.kwargs) == 1:
        t = tensors[0].detach().to("cpu", torch.float32).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
        return
    h.update(b"inputs")
    for key, v in x._items():
        h.update(f"|{key}|".encode())
        if isinstance(v, torch.Tensor):
            t = v.detach().to("cpu").contiguous()
            h.update(f"{tuple(t.shape)} {t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif v is None or isinstance(v, (bool, int, float, str)):
            h.update(repr(v).encode())
        else:
            h.update(type(v).__name__.encode())


class _Probe:
    """The probe as batches of model inputs, hashed as they are iterated.

    Batches are read as the recorder reads them (:func:`svcca_torch.recorder.model_inputs`:
    a tensor, ``(inputs, targets)``, or several inputs as a tuple or dict for a forward that
    takes them); a batch of one positional input is handled as that tensor, several as an
    :class:`~svcca_torch.recorder.Inputs` (called ``model(*args, **kwargs)``, sliced input
    by input).

    ``digests[i]`` is the SHA-1 of every input up to and including batch ``i`` (cumulative;
    every tensor of a batch of several inputs), so a capture that runs only the first batches
    (a freeze-signal capture) is checked against the same prefix of the first full pass, and
    a full pass checks every batch."""

    def __init__(self, probe: Any, batch_size: int, model: Optional[nn.Module] = None) -> None:
        self.probe = check_probe(probe)
        self.batch_size = batch_size
        self.model = model
        self.digests: List[str] = []

    def _batches(self) -> Iterator[Inputs]:
        yield from _iter_probe(self.probe, self.batch_size, self.model)

    def size(self) -> int:
        return probe_size(self.probe, self.model)

    def inputs(self, n_images: Optional[int] = None) -> Iterator[Union[torch.Tensor, Inputs]]:
        """Yield input batches (the first ``n_images`` inputs, default all; every input of a
        batch of several sliced alike), checking each batch's cumulative digest against the
        first pass."""
        h = hashlib.sha1()
        seen = 0
        for i, x in enumerate(self._batches()):
            _hash_batch(h, x)
            d = h.hexdigest()
            if i < len(self.digests):
                if d != self.digests[i]:
                    raise ValueError(
                        f"`probe` changed between captures (batch {i} differs): SVCCA compares the same "
                        "datapoints in the same order, so use a fixed tensor or a DataLoader with shuffle=False "
                        "and no random augmentation (e.g. svcca_torch.data.probe_set)."
                    )
            else:
                self.digests.append(d)
            rows = x.rows
            if n_images is not None and seen + rows >= n_images:
                yield _plain(x.slice(0, n_images - seen))
                return
            seen += rows
            yield _plain(x)

    def whole(self, n_images: Optional[int] = None) -> Union[torch.Tensor, Inputs]:
        """The first ``n_images`` inputs (default all) as one batch (hashed as :meth:`inputs`)."""
        return _cat(list(self.inputs(n_images)))

    @property
    def checksum(self) -> Optional[str]:
        """Digest of the whole probe (None before the first full pass)."""
        return self.digests[-1] if self.digests else None

    def head(self, k: int) -> Union[torch.Tensor, Inputs]:
        """The first ``k`` inputs of the first batch (copies; every input of a batch of several)."""
        x = next(iter(self._batches()))
        return _plain(x.slice(0, k).map(lambda t: t.clone()))

    def non_finite(self) -> Tuple[int, int]:
        """(probe inputs holding a NaN or Inf in any of their tensors, the first one's index or -1)."""
        bad, first, seen = 0, -1, 0
        for x in self._batches():
            rows = torch.zeros(x.rows, dtype=torch.bool)
            for t in x.tensors():
                if t.is_floating_point() or t.is_complex():
                    rows |= (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).cpu()
            n = int(rows.sum())
            if n and first < 0:
                first = seen + int(rows.nonzero()[0, 0])
            bad += n
            seen += x.rows
        return bad, first


@contextlib.contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    """PyTorch's fused multi-head-attention fast path off inside (restored after)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


def _swamped(t: torch.Tensor, earlier: Optional[ReducedBasis]) -> Optional[str]:
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


class _Bound(nn.Module):
    """``model`` called on fixed :class:`~svcca_torch.recorder.Inputs` whatever it is given
    (for code that calls ``model(x)`` with one input: the FLOPs counter). Its parameters and
    modules are ``model``'s."""

    def __init__(self, model: nn.Module, inputs: Inputs) -> None:
        super().__init__()
        self.model = model
        self._svcca_inputs = inputs

    def forward(self, *_: Any) -> Any:
        return self._svcca_inputs.call(self.model)


# ----------------------------------------------------------------------------------- results
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


@dataclass
class TrackerEvents:
    """What one :meth:`DynamicsTracker.maybe_capture` call did (plain data, for logging).

    Attributes:
        step: the optimizer step.
        capture: ``{"step", "to_previous": {layer: similarity}}`` when a capture was taken.
        signal: ``{"step", "window", "similarity": {group: similarity to one window earlier}}``
            when a freeze-signal recording was taken (rank 0 only has the values).
        freeze: a freeze-log entry ``{"step", "groups", "frozen_groups", "frozen_parameters",
            "backward_flops_saved"}`` when groups were frozen.
    """

    step: int
    capture: Optional[Dict[str, Any]] = None
    signal: Optional[Dict[str, Any]] = None
    freeze: Optional[Dict[str, Any]] = None


@dataclass
class FinalAnalysis:
    """The end-of-run analysis (rank 0): matrices, to-final and to-previous curves."""

    dynamics: LearningDynamics
    to_final: LayerCurves
    to_previous: LayerCurves
    summary: Dict[str, Any] = field(repr=False, default_factory=dict)


# ----------------------------------------------------------------------------------- tracker
class DynamicsTracker:
    r"""Record layers on a fixed probe during training, keep their SVCCA history on disk and
    optionally freeze converged layer groups bottom-up. Plain PyTorch (no Lightning).

    Call :meth:`start` before the first step, :meth:`maybe_capture` after every optimizer
    step and :meth:`finish` at the end (see the module docstring for a full loop).

    Args:
        model: the ``nn.Module`` being trained.
        probe: fixed probe inputs: a tensor ``(N, ...)``; for a model whose forward takes
            several inputs (``forward(ids, mask)``), a tuple of tensors (positional) or a dict
            of tensors (keywords), all with the same first dimension; or a re-iterable of
            batches of either (a DataLoader with ``shuffle=False``, a list of batches; see
            :func:`svcca_torch.recorder.model_inputs`), same order every time.
        layers: layers to record (see :func:`svcca_torch.recorder.select_layers`).
        run_dir: folder for the store (``<run_dir>/store``), figures and summary JSON.
        keep, max_directions: SVD truncation of the stored representations.
        grid, max_datapoints, batch_size: recorder settings.
        every_n_steps: capture every n optimizer steps, every one of them (an explicit
            schedule is honoured: ``max_overhead`` does not thin it; the end-of-run report says
            what it cost). None (default): the tracker schedules the captures itself (front-
            loaded, within ``max_overhead``: see :meth:`maybe_capture`), or the caller passes
            ``request``.
        max_overhead: the tracker's time budget, as a fraction of training time (default
            0.05): the default capture schedule's and, for :data:`SIGNAL_SHARE` of it, the
            adaptive freeze signal's; ``None``: no budget (every front-loaded point is taken,
            every signal window recorded).
        freeze: ``False``, ``"adaptive"`` (or ``True``) or ``"schedule"``.
        freeze_groups: explicit groups (default: one per recorded layer,
            :func:`svcca_torch.freeze.default_layer_groups`).
        freeze_window: the adaptive signal's window, in optimizer steps (e.g. one epoch).
        freeze_threshold, freeze_patience: settled when the similarity to one window earlier
            is ``>= freeze_threshold`` at ``freeze_patience`` consecutive windows.
        signal_datapoints_per_neuron: datapoints per neuron the signal records (10).
        max_frozen_fraction, schedule_start, schedule_end: see :mod:`svcca_torch.freeze`.
        frozen_cache: opt in to keeping the frozen prefix's output per training input and
            skipping the frozen forward for batches seen before (:mod:`svcca_torch._cache`:
            exact or off, and off by itself when inputs never repeat, as under random
            augmentation): ``True`` (up to 1 GiB of host memory), a number of bytes, or
            ``False`` (the default: the forward must be a function of the input and the
            modules' state alone, which cannot be proven for any model).
        total_steps: training length, when known (the schedule policy needs it).
        final_analysis: compute the learning-dynamics matrices and figures in :meth:`finish`.
        final_heatmaps: how many captures get a full layers x layers matrix (a heatmap) at the
            end: step 0, the end, the rest where the to-final curves change most
            (:func:`shown_dynamics`). Each costs about what a naive analysis spends per
            capture; every capture gets its to-final curves whatever this is.
        grid_fractions: the grid figure's panels: ``None`` (default) 4 of those heatmaps,
            where the curves change (:func:`svcca_torch.board.grid_checkpoints`); fractions
            of training, e.g. the paper's ``(0, 0.35, 0.75, 1)``: the capture nearest each
            (given a full matrix too).
        figures: write ``learning_dynamics.png`` and ``convergence.png`` (and, with freeze
            training, ``to_previous.png``) in :meth:`finish`; ``False`` when a caller draws
            them itself (:class:`~svcca_torch.callbacks.SVCCACallback` with TensorBoard
            writes the images it logs, so that each is drawn once).
        progress: progress bar during the final analysis.
        is_writer: whether this process writes the store (rank 0 under DDP).
        broadcast: ``obj -> obj`` from rank 0 to every rank (default identity).
        sharded_record: ``(recorder, inputs) -> {layer: rows} or None`` recording the probe
            split across ranks (rows gathered on rank 0) for full captures (common rows);
            ``inputs`` is the probe as one batch: a tensor, or an
            :class:`~svcca_torch.recorder.Inputs` for a model of several inputs (slice it with
            ``inputs.slice(start, stop)``, every input alike); default: record here.
            Freeze-signal recordings run on the writer alone.
        analysis_device: where the end-of-run analysis decodes and compares the stored
            bases (e.g. ``"cpu"`` to keep a GPU free); default: the model's device.

    The recorded layers are put in forward order at :meth:`setup` (one traced forward of
    two probe inputs), so freeze groups, "bottom-up" and "the output group is never frozen"
    follow the forward pass. Recordings and their SVD reductions stay on the model's device.

    A layer constant over the probe at the run's first capture (a zero-initialised output
    head, as torchvision's ViT ``heads.head`` or GoogLeNet's ``fc``; any layer whose weights
    start at zero) is no error: one ``UserWarning`` names it, captures and the freeze signal
    leave it out until it varies, and from the first capture at which it varies it is stored
    and compared like any other layer (its to-previous curve starts one capture later, its
    to-final curve there; its group is judged from the first signal recording at which it
    varies, so it cannot freeze before). :attr:`constant_layers` and ``svcca_summary.json``
    (``"constant_at_start"``) say when each first varied. Only when *every* recorded layer is
    constant at the first capture (a constant probe) is that an error.

    Otherwise a layer constant over the probe (zero variance) or not finite there (NaN/Inf) is
    a :class:`CaptureError` (a ``ValueError``) at the recording that meets it, naming the
    layer, the step, the kind of recording and the likely fix (the probe or the initial model
    at the start, the training later: a layer that died, a model that diverged). At the final
    capture and in the analysis :meth:`finish` records such errors instead and writes the rest.
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Any,
        layers: Optional[Sequence[Any]] = None,
        *,
        settings: Optional[TrackerSettings] = None,
        is_writer: bool = True,
        broadcast: Optional[Callable[[Any], Any]] = None,
        sharded_record: Optional[Callable[[ActivationRecorder, Union[torch.Tensor, Inputs]],
                                          Optional[Dict[str, torch.Tensor]]]] = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        if layers is not None:
            kwargs["layers"] = layers
        #: the run's :class:`~svcca_torch.settings.TrackerSettings` (immutable; validated once)
        self.settings = TrackerSettings.build(settings, **kwargs)
        self.model = model
        self._probe = _Probe(probe, self.settings.batch_size, model)
        self.is_writer = bool(is_writer)
        self._broadcast = broadcast or (lambda obj: obj)
        self._sharded_record = sharded_record

        self.recorder: Optional[ActivationRecorder] = None
        self.store: Optional[RepresentationStore] = None
        self.groups: List[LayerGroup] = []
        self.policy: Optional[FreezePolicy] = None
        self.group_layers: Dict[str, List[str]] = {}
        self._prev: Optional[Dict[str, ReducedBasis]] = None
        self._ref: Optional[Dict[str, Any]] = None  # the last signal recording: {"step", "bases", "rows"}
        # per signal layer: (neurons, pooled cells per image at its own grid), from one tiny recording
        self._signal_shapes: Dict[str, Tuple[int, int]] = {}
        #: layers constant over the probe at the run's first capture (zero-initialised heads):
        #: ``{layer: {"constant_at": step, "first_varied": capture step or None, "signal_from":
        #: first freeze-signal step at which it varied, or None}}``
        self.constant_layers: Dict[str, Dict[str, Optional[int]]] = {}
        #: the freeze signal's own accounting (see :meth:`signal_summary`): recordings, seconds,
        #: windows skipped or recorded with fewer groups to stay within its share of the budget
        self.signal_stats: Dict[str, Any] = _empty_signal_stats()
        self._signal_costs: Dict[Tuple[str, ...], float] = {}  # measured cost per recorded layer set
        self._signal_mark: Optional[float] = None  # training seconds at the last signal grid point
        #: each judgeable layer's chance level (its signal against an independently initialised
        #: copy of the model, measured once at the start; None: not measured), see :meth:`_calibrate`
        self.chance: Optional[Dict[str, Optional[float]]] = None
        #: how the chance levels were measured: ``{"step", "seconds", "error", "layers": {layer:
        #: {"chance", "judged", "reason"}}}``
        self.chance_info: Dict[str, Any] = {}
        # the frozen prefix's output on the probe, reused by signal recordings (runtime only)
        self._reuse = PrefixReuse()
        # the frozen prefix's output per training input (runtime only)
        self._cache: Optional[FrozenOutputCache] = None
        self._cache_epoch: Optional[int] = None
        self._set_up = False
        self._started = False
        # time accounting (seconds): own time nests, only the outermost section counts
        self._origin: Optional[float] = None
        self._own = 0.0
        self._t_outer = 0.0
        self._depth = 0
        self._n_probe: Optional[int] = None
        #: the archive folder of captures moved aside by the last :meth:`start` (resume)
        self.archived: Optional[Path] = None
        self._capture_cost: Optional[float] = None
        self._analysis_cost = 0.0
        self._warned: set = set()
        # the default schedule: front-loaded fractions still ahead; what each capture was for
        self._ladder: List[float] = list(LADDER)
        self.schedule_log: Dict[str, List[Any]] = _empty_schedule_log()
        self.frozen_cache_stats: Optional[Dict[str, Any]] = None  # the frozen-output cache's, at the end
        #: what :meth:`finish` could not record or analyse (data errors): ``{"step", "layer", "kind", "message"}``
        self.failures: List[Dict[str, Any]] = []
        self._final = False  # inside finish(): its capture records data errors instead of raising
        # checkpointed state
        self.captured_steps: List[int] = []
        self.to_previous: List[Dict[str, Any]] = []
        self.signal_log: List[Dict[str, Any]] = []
        #: the signal's raw (uncalibrated) group similarities, as :attr:`signal_log`
        self.signal_raw_log: List[Dict[str, Any]] = []
        self.freeze_log: List[Dict[str, Any]] = []
        self.baseline_backward_flops: Optional[int] = None
        self._restored: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ settings, read through
    @property
    def frozen_cache(self) -> Optional[int]:
        """The frozen-output cache's memory cap in bytes, None when off (``settings.cache_bytes``)."""
        return self.settings.cache_bytes

    @property
    def layers_spec(self) -> Optional[Sequence[Any]]:
        return self.settings.layers

    @property
    def signal_ratio(self) -> int:
        return self.settings.signal_datapoints_per_neuron

    # ------------------------------------------------------------------ setup
    @property
    def last_capture(self) -> Optional[Dict[str, ReducedBasis]]:
        """The last capture's reduced bases ``{layer: ReducedBasis}`` (None before the first)."""
        return self._prev

    @property
    def probe(self) -> Any:
        return self._probe.probe

    @property
    def probe_checksum(self) -> Optional[str]:
        """SHA-1 of every probe input, in order (None before the first capture)."""
        return self._probe.checksum

    def setup(self) -> None:
        """Resolve layers, groups and the policy, and check the probe's size (idempotent;
        :meth:`start` calls it). Unknown layer names fail here, listing the names that exist."""
        if self._set_up:
            return
        n = self._n_probe = self._probe.size()
        if n < 2:
            raise ValueError(
                f"`probe` holds {n} input(s): SVCCA compares layers across probe datapoints, so it needs at least "
                "2 inputs (a few hundred to a few thousand in practice, e.g. svcca_torch.data.probe_set(dataset, 1024))."
            )
        st = self.settings
        self.recorder = ActivationRecorder(self.model, st.layers, grid=st.grid, max_datapoints=st.max_datapoints,
                                           batch_size=st.batch_size)
        # groups, "bottom-up" and "the output group is never frozen" follow the forward pass, not the
        # order the modules were registered in: one traced forward of two probe inputs (falls back to
        # the given order with a LayerOrderWarning when the forward fails)
        self.recorder.order_layers(self._probe.head(_FLOPS_EXAMPLES))
        if self.freeze:
            self._setup_freeze()
        self._set_up = True

    def _setup_freeze(self) -> None:
        assert self.recorder is not None
        recorded = self.recorder.layers
        if self.freeze_groups is None:
            self.groups = default_layer_groups(self.model, recorded)
        else:
            self.groups = explicit_layer_groups(self.model, self.freeze_groups)
        self.group_layers = {
            g.name: [n for n in recorded if n == g.name or any(n == m or n.startswith(m + ".") for m in g.module_names)]
            for g in self.groups}
        names = [g.name for g in self.groups]
        if len(names) < 2:
            raise ValueError(
                f"freeze_training needs at least 2 layer groups (the last, the output layer, is never frozen); "
                f"got {names}. Record more layers or pass `freeze_groups`."
            )
        if self.freeze == "adaptive":
            silent = [g for g in names[:-1] if not self.group_layers[g]]
            if silent:
                raise ValueError(
                    f"freeze groups {silent} contain no recorded layer, so the adaptive policy has no similarity "
                    "to judge them by; add a layer of each group to `layers` or change `freeze_groups`."
                )
        self.policy = get_policy(self.freeze).from_settings(names, self.settings)

    def accounted(self) -> "contextlib.AbstractContextManager[None]":
        """``with tracker.accounted(): ...`` counts the time inside as the tracker's own, so
        that ``max_overhead`` covers it too (e.g. a caller's logging of each capture)."""
        return self._timed()

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        t0 = time.perf_counter()
        if self._origin is None:
            self._origin = t0
        if self._depth == 0:
            self._t_outer = t0
        self._depth += 1
        try:
            with self._cache.paused() if self._cache is not None else contextlib.nullcontext():
                yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._own += time.perf_counter() - t0

    @property
    def overhead(self) -> Optional[float]:
        """Time spent by the tracker so far / training time so far (None before training)."""
        if self._origin is None:
            return None
        train = time.perf_counter() - self._origin - self._own
        return self._own / train if train > 0 else None

    def start(self, step: int = 0, epoch: Optional[int] = None) -> TrackerEvents:
        """Set up, open the store, restore a resumed state (re-freezing its groups and
        archiving captures made after ``step`` by a run that was not kept) and capture
        ``step`` (0 for a new run)."""
        with self._timed():
            self.setup()
            if self.freeze == "adaptive" and self.freeze_window is None:
                raise ValueError(
                    "freeze_training='adaptive' needs `freeze_window` (optimizer steps between the two recordings "
                    "its signal compares, e.g. one epoch: len(train_loader))."
                )
            if self.freeze == "schedule" and self.total_steps is None:
                raise ValueError("freeze_training='schedule' needs a known training length: pass `total_steps`.")
            if self.is_writer:
                self.close()  # a second start (resume in the same process) reopens the store
                self.store = RepresentationStore(self.run_dir / "store", keep=self.keep,
                                                 max_directions=self.max_directions)
            self._restore(step)
            store = self.store
            if store is not None and len(store) and not self.captured_steps:
                # a new run in the folder of an earlier one: its captures must not stand in for this run's
                steps = [c.step for c in store.checkpoints]
                archive = store.archive_after(-1)
                warnings.warn(
                    f"{type(self).__name__}: {store.folder} held the captures of an earlier run (steps {steps}); "
                    f"moved to {archive} so that this run's are not mixed with them. Resume with the saved state "
                    "(load_state_dict) to continue a run, or pass a new run_dir.", UserWarning, stacklevel=2)
            if self.freeze and self.baseline_backward_flops is None and self.is_writer:
                self.baseline_backward_flops = self._backward_flops(all_trainable=True)
            events = TrackerEvents(step)
            done = step / self.total_steps if self.total_steps else 0.0
            self._ladder = [f for f in LADDER if f > done]  # the front-loaded points still ahead
            if step not in self.captured_steps:
                events.capture = self.capture(step, epoch)
            if self.freeze == "adaptive" and self.is_writer and self.chance is None:
                self._calibrate(step)  # once per run (restored on resume)
            if self.freeze == "adaptive" and step % self.freeze_window == 0:  # type: ignore[operator]
                events.signal = self._signal(step)
            self._started = True
            return events

    # ------------------------------------------------------------------ per step
    def maybe_capture(self, step: int, progress: Optional[float] = None, *, epoch: Optional[int] = None,
                      request: Optional[bool] = None) -> TrackerEvents:
        """Call after every optimizer step: applies the freeze schedule, takes the adaptive
        signal's recordings on its grid, and a capture when one is due and affordable.

        Args:
            step: optimizer steps done (the step just taken).
            progress: fraction of training done, if known (default ``step / total_steps``).
            epoch: the epoch, stored with a capture.
            request: ``True`` asks for a capture now (e.g. at an epoch end; taken, whatever
                the budget), ``False`` for none; default: ``every_n_steps`` (every multiple
                taken), or, when that is None, the tracker's own schedule:

                * the front-loaded points :data:`LADDER` (1% to 90% of training, log-spaced),
                  known from ``progress`` or ``total_steps``: each taken when one more
                  capture, with the final capture and analysis in reserve, keeps the
                  tracker's time within ``max_overhead`` of the training time projected for
                  the whole run (time so far / fraction done); on a run projected shorter
                  than :data:`SHORT_RUN_SECONDS` the points nearest 1%, 3% and 8% are taken
                  even over budget (reported);
                * at other steps, a capture whenever it fits within ``max_overhead`` of the
                  training time so far (none without a budget).

                Points the budget skipped are listed by :meth:`schedule_report`.
        """
        if not self._started:
            raise RuntimeError(f"{type(self).__name__}.maybe_capture: call start() once before the first step.")
        with self._timed():
            events = TrackerEvents(step)
            if self._cache is not None:
                self._note_cache_window(step, epoch)
            if self.freeze == "schedule":
                fraction = progress if progress is not None else (
                    min(1.0, step / self.total_steps) if self.total_steps else None)
                assert self.policy is not None
                if fraction is not None and self.policy.update(step, fraction=fraction):
                    events.freeze = self._apply_frozen(step)
            if self.freeze == "adaptive" and step % self.freeze_window == 0:  # type: ignore[operator]
                events.signal = self._signal(step)
                events.freeze = self._apply_frozen(step)
            if request is None and self.every_n_steps is not None:
                request = step % self.every_n_steps == 0
            if request:
                events.capture = self.capture_requested(step, epoch)
            elif request is None:
                fraction = progress if progress is not None else (
                    min(1.0, step / self.total_steps) if self.total_steps else None)
                events.capture = self._scheduled_capture(step, fraction, epoch)
            return events

    def capture_requested(self, step: int, epoch: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Take the capture an explicit schedule asks for at ``step`` (``every_n_steps``, an
        epoch end, the caller's ``request=True``), whatever the budget; None when ``step``
        is captured already."""
        if step in self.captured_steps:
            return None
        self.schedule_log["requested"].append(int(step))
        return self.capture(step, epoch)

    def _scheduled_capture(self, step: int, fraction: Optional[float], epoch: Optional[int]
                           ) -> Optional[Dict[str, Any]]:
        """The tracker's own schedule at ``step`` (see :meth:`maybe_capture`): a front-loaded
        point when ``fraction`` passes one, else a capture when the budget so far affords it."""
        if step in self.captured_steps:
            return None
        passed: List[float] = []
        if fraction is not None:
            passed = [f for f in self._ladder if f <= fraction]
            self._ladder = [f for f in self._ladder if f > fraction]
            if fraction >= 1.0:
                passed = []  # the end of training: the final capture is taken anyway
        if not passed and self.max_overhead is None:
            return None  # nothing due, on every rank alike
        with self._timed():
            decision = None
            if self.is_writer:
                if passed:
                    decision = self._ladder_decision(fraction, any(f in FLOOR for f in passed))  # type: ignore[arg-type]
                    if decision[0] is None:
                        self.schedule_log["skipped"].append(
                            {"step": int(step), "fraction": round(float(fraction), 6),  # type: ignore[arg-type]
                             "reason": decision[1]})
                elif self.max_overhead is not None and self._affordable():
                    decision = ("budget", None)
            kind = self._broadcast(None if decision is None else decision[0])
            if kind is None:
                return None
            out = self.capture(step, epoch)
            log = self.schedule_log["over_budget" if kind == "floor" else kind]
            log.append(int(step))
            if kind == "floor":
                self.schedule_log["front_loaded"].append(int(step))
            return out

    def _budget(self) -> Tuple[float, float, float]:
        """(own time so far, training time so far, the reserve: the final capture, the
        end-of-run analysis and its figures), in seconds."""
        now = time.perf_counter()
        spent = self._own + (now - self._t_outer if self._depth else 0.0)
        train = now - (self._origin if self._origin is not None else now) - spent
        cost = self._capture_cost or 0.0
        reserve = (2 * cost + (len(self.captured_steps) + 2) * self._analysis_cost
                   + (self.final_heatmaps + 3) * FIGURE_SECONDS)
        return spent, train, reserve

    def _ladder_decision(self, fraction: float, floor: bool) -> Tuple[Optional[str], Optional[str]]:
        """("front_loaded" | "floor" | None, why not): whether a front-loaded point is taken."""
        if self.max_overhead is None or self._origin is None or self._capture_cost is None:
            return "front_loaded", None
        spent, train, reserve = self._budget()
        projected = train / fraction if fraction > 0 else math.inf
        if spent + self._capture_cost + reserve <= self.max_overhead * projected:
            return "front_loaded", None
        if floor and projected < SHORT_RUN_SECONDS:
            return "floor", None
        return None, (f"a capture ({self._capture_cost:.2g} s) did not fit in max_overhead={self.max_overhead:g} of "
                      f"the training time projected for the run ({projected:.3g} s), with {spent:.2g} s spent and "
                      f"{reserve:.2g} s held for the final capture and analysis")

    def capture_if_affordable(self, step: int, epoch: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Take a capture at ``step`` unless it is taken already or would exceed the
        ``max_overhead`` budget (decided on the writer and broadcast); its result or None."""
        if step in self.captured_steps:
            return None
        with self._timed():
            if not self._broadcast(self._affordable() if self.is_writer else None):
                return None
            return self.capture(step, epoch)

    def schedule_summary(self) -> Dict[str, Any]:
        """What the capture schedule did (``svcca_summary.json``'s ``"schedule"``): the
        captures by kind (``front_loaded``, ``budget``: spaced by the budget of the training
        time so far, ``requested``: an explicit schedule, ``over_budget``: the short-run
        floor), the front-loaded points the budget ``skipped`` and why, the own time and the
        training time so far (seconds), and ``message``: :meth:`schedule_report`."""
        log = self.schedule_log
        spent, train, _ = self._budget()
        explicit = self.every_n_steps is not None or log["requested"] or self.explicit_schedule
        return {"mode": "explicit" if explicit else "default",
                "every_n_steps": self.every_n_steps, "max_overhead": self.max_overhead,
                "captures": len(self.captured_steps), "front_loaded": list(log["front_loaded"]),
                "budget": list(log["budget"]), "requested": list(log["requested"]),
                "over_budget": list(log["over_budget"]), "skipped": [dict(e) for e in log["skipped"]],
                "own_seconds": round(spent, 4), "training_seconds": round(train, 4),
                "overhead": None if train <= 0 else round(spent / train, 5), "message": self.schedule_report()}

    def schedule_report(self) -> str:
        """One paragraph: how many captures of which kind, what the budget skipped or thinned
        and why, and what the captures cost (own time against training time so far)."""
        log = self.schedule_log
        n = len(self.captured_steps)
        spent, train, _ = self._budget()
        frac = (lambda st: "" if not self.total_steps else f" ({100 * st / self.total_steps:.2g}%)")
        scheduled = {int(x) for k in ("front_loaded", "budget", "requested") for x in log[k]}
        ends = ["step 0"] + (["the end"] if len(self.captured_steps) > 1 and self.captured_steps[-1] not in scheduled
                             else [])
        parts: List[str] = []
        if self.every_n_steps is not None or log["requested"] or self.explicit_schedule:
            every = ("every step" if self.every_n_steps == 1 else f"every {self.every_n_steps} steps")
            how = f"{len(log['requested'])} " + (every if self.every_n_steps is not None
                                                 else self.explicit_schedule or "as requested")
            parts.append(f"{n} captures ({', '.join(ends[:1] + [how] + ends[1:])}), every one taken (an explicit "
                         "schedule is not thinned by max_overhead)")
        else:
            front, budget = log["front_loaded"], log["budget"]
            what = [f"{len(front)} front-loaded" + (f" at steps {front[0]}{frac(front[0])} to {front[-1]}"
                                                     f"{frac(front[-1])}" if front else "")]
            if self.max_overhead is not None:
                what.append(f"{len(budget)} spaced by the time budget (max_overhead={self.max_overhead:g} of the "
                            "training time so far)")
            parts.append(f"{n} captures ({', '.join(ends[:1] + what + ends[1:])})")
            skipped = log["skipped"]
            if skipped:
                steps = ", ".join(str(e["step"]) for e in skipped[:6]) + (", ..." if len(skipped) > 6 else "")
                parts.append(f"the budget skipped {len(skipped)} front-loaded point{'s' if len(skipped) > 1 else ''} "
                             f"(steps {steps}): {skipped[-1]['reason']}")
            if log["over_budget"]:
                parts.append(f"{len(log['over_budget'])} early captures (steps "
                             + ", ".join(map(str, log["over_budget"])) + ") were taken over the budget: a run "
                             f"projected under {SHORT_RUN_SECONDS:.0f} s cannot afford them at "
                             f"max_overhead={self.max_overhead:g}")
            if not self.total_steps and self.max_overhead is not None and not front:
                parts.append("no front-loaded captures: the training length is unknown (pass total_steps)")
        explicit = self.every_n_steps is not None or log["requested"] or self.explicit_schedule
        if train > 0:
            parts.append(f"own time {spent:.3g} s, {100 * spent / train:.1f}% of {train:.3g} s of training"
                         + (f" (max_overhead={self.max_overhead:g} is met on runs of {SHORT_RUN_SECONDS / 60:.0f} "
                            "minutes or more)" if not explicit and self.max_overhead is not None
                            and spent > self.max_overhead * train else ""))
        return "; ".join(parts) + "."

    def _affordable(self) -> bool:
        """Whether one more capture keeps the tracker's time within ``max_overhead`` of the
        training time so far, with the final capture and analysis held in reserve."""
        if self.max_overhead is None:
            return True
        if self._origin is None or self._capture_cost is None:
            return True
        spent, train, reserve = self._budget()
        return spent + self._capture_cost + reserve <= self.max_overhead * train

    def capture(self, step: int, epoch: Optional[int] = None) -> Dict[str, Any]:
        """Record every layer now, store it and return ``{"step", "to_previous"}``
        (``to_previous`` is empty on ranks other than the writer)."""
        with self._timed():
            t0 = time.perf_counter()
            acts = self._record(None)
            sims: Dict[str, float] = {}
            if acts is not None:
                assert self.store is not None
                settings = self.store.settings
                # keep directions within the datapoints' reach: beyond rows / 5 CCA reports
                # spuriously high similarity (e.g. 512 channels on 1,024 rows of 1x1 maps)
                limits = direction_limits(acts)
                capped = {n: (limits[n], acts[n].shape[0]) for n in acts
                          if limits[n] < acts[n].shape[1] and ("capped", n) not in self._warned}
                cap = settings["max_directions"]
                kind = "final capture" if self._final else "capture" if self._started else "start"
                bases: Dict[str, ReducedBasis] = {}
                first = not self.captured_steps
                constant: List[CaptureError] = []
                swamped: Dict[str, str] = {}
                for name in list(acts):
                    t = acts.pop(name)
                    try:
                        bases[name] = self._reduce(name, t, step, settings["keep"], settings["keep_rule"],
                                                   limits[name] if cap is None else min(cap, limits[name]), kind=kind)
                    except CaptureError as err:
                        if err.constant and (first or self._pending(name, "first_varied")):
                            constant.append(err)  # constant since the start (a zero-initialised head): left out
                            continue
                        why = _swamped(t, (self._prev or {}).get(name)) if err.constant else None
                        if why is not None:  # not dead: its variation is below its values' rounding for now
                            swamped[name] = why
                            continue
                        if not self._final:
                            raise
                        self.failures.append(err.entry())  # finish(): stored and analysed without this layer
                    finally:
                        del t
                self._note_swamped(step, swamped, kind)
                if constant and not bases and first and not self.failures:
                    raise constant[0]  # every layer constant at the first capture: the probe is
                self._note_constant(step, [e.layer for e in constant], bases)
                capped = {n: v for n, v in capped.items() if n in bases}  # a constant layer has no directions
                if capped:
                    self._warned.update(("capped", n) for n in capped)
                    warnings.warn(
                        f"{type(self).__name__}: the probe gives too few datapoints to keep every direction of "
                        + ", ".join(f"{n!r} (at most {k} directions from {rows} datapoints)" for n, (k, rows)
                                    in capped.items())
                        + "; they keep at most datapoints / 5 directions so that CCA stays unbiased. A larger probe "
                        "(or a larger `grid`) keeps more.", UserWarning, stacklevel=3)
                if not bases:  # every layer failed (in finish()): nothing to store, the run ends at the last capture
                    return {"step": step, "to_previous": sims}
                if step in [c.step for c in self.store.checkpoints]:
                    warnings.warn(
                        f"{type(self).__name__}: step {step} is already in the store at {self.store.folder} (a run "
                        "resumed from an earlier checkpoint?); keeping the stored capture.", UserWarning, stacklevel=2)
                else:
                    # no fraction stored: the store uses step / final step, right also when training stops early
                    self.store.add(bases, step=step, epoch=epoch)
                t1 = time.perf_counter()
                if self._prev is not None:
                    sims = paired_similarity(self._prev, bases)
                    # the final analysis compares every capture with the final one, layers x layers
                    self._analysis_cost = (time.perf_counter() - t1) * max(1, len(bases))
                self._prev = bases
                if sims:
                    self.to_previous.append({"step": step, **sims})
            self.captured_steps.append(step)
            self._capture_cost = time.perf_counter() - t0
            return {"step": step, "to_previous": sims}

    def _note_swamped(self, step: int, swamped: Mapping[str, str], where: str) -> None:
        """Layers found constant at ``step`` that are not dead (:func:`_swamped`): left out of
        the captures and the freeze signal until they vary again, like a layer constant at the
        start (:attr:`constant_layers`, ``"reason"`` says why), one warning per layer."""
        for n, why in swamped.items():
            self.constant_layers[n] = {"constant_at": int(step), "first_varied": None, "signal_from": None,
                                       "reason": why}
            if ("swamped", n) in self._warned:
                continue
            self._warned.add(("swamped", n))
            warnings.warn(
                f"{type(self).__name__}: layer {n!r} is constant over the probe at step {step} ({where}), but it is "
                f"not dead: {why}, as when an output bias grows over activations that are still tiny in eval mode "
                "(BatchNorm running statistics not adapted yet). It is left out of the captures and the freeze signal "
                "until it varies, then recorded and judged from there (svcca_summary.json, \"constant_at_start\", "
                "says when).", UserWarning, stacklevel=4)

    def _pending(self, name: str, key: str) -> bool:
        """Whether ``name`` was constant at the first capture and has not varied since, in the
        captures (``key="first_varied"``) or in the freeze signal (``"signal_from"``)."""
        entry = self.constant_layers.get(name)
        return entry is not None and entry[key] is None

    def _note_constant(self, step: int, constant: Sequence[str], bases: Mapping[str, Any]) -> None:
        """A capture's layers that are constant since the start (one warning for those new)
        and those that varied for the first time."""
        new = [n for n in constant if n not in self.constant_layers]
        for n in new:
            self.constant_layers[n] = {"constant_at": int(step), "first_varied": None, "signal_from": None}
        if new:
            names = ", ".join(repr(n) for n in new)
            one = len(new) == 1
            warnings.warn(
                f"{type(self).__name__}: layer{'' if one else 's'} {names} {'is' if one else 'are'} constant over the "
                f"probe at step {step} (every neuron has one value on every probe input, as a zero-initialised layer "
                f"has); {'it is' if one else 'they are'} left out of the captures and the freeze signal until "
                f"{'it varies' if one else 'each varies'}, then recorded and judged from there (svcca_summary.json, "
                "\"constant_at_start\", says when).", UserWarning, stacklevel=4)
        for n in bases:
            if self._pending(n, "first_varied"):
                self.constant_layers[n]["first_varied"] = int(step)

    # ------------------------------------------------------------------ recording
    def _model_device(self) -> Optional[torch.device]:
        return next((t.device for t in (*self.model.parameters(), *self.model.buffers())), None)

    def _record(self, layers: Optional[Sequence[str]] = None, n_images: Optional[int] = None
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
        rec.device = self._model_device()
        if layers is None:
            if self._sharded_record is not None:
                return self._sharded_record(rec, self._probe.whole(n_images))
            if not self.is_writer:
                return None
            return rec.record(self._probe.inputs(n_images), rows="common")
        if not self.is_writer:
            return None
        cap, rec.max_datapoints = rec.max_datapoints, None
        try:
            return rec.record(self._probe.inputs(n_images), layers=list(layers), rows="per_layer")
        finally:
            rec.max_datapoints = cap

    def _reduce(self, name: str, x: torch.Tensor, step: int, keep: Union[int, float], keep_rule: str,
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
            bad, where = self._probe.non_finite() if first else (0, -1)
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
        raise CaptureError(msg, step=step, layer=name, kind=kind, owner=type(self).__name__,
                           constant=constant) from None

    # ------------------------------------------------------------------ freeze signal
    def _signal_plan(self, groups: Sequence[str]) -> Tuple[List[str], Dict[str, int], int]:
        """Layers to record for ``groups``, the probe images each layer keeps and the images
        to run.

        Each layer gets ``signal_datapoints_per_neuron x neurons`` datapoints at its own
        pooling grid (whole images: ``ceil(ratio x neurons / cells)`` images of ``cells``
        rows each, at most the probe); the recording runs the largest of those image counts
        and each layer keeps the rows of its own first images. Neurons and cells come from a
        per-layer-rows recording of two probe inputs (once per layer; it stops after them)."""
        assert self.recorder is not None
        layers = [n for g in groups for n in self.group_layers[g]]
        todo = [n for n in layers if n not in self._signal_shapes]
        if todo:
            rec = self.recorder
            rec.device = self._model_device()
            tiny = rec.record(self._probe.head(_FLOPS_EXAMPLES), layers=todo, rows="per_layer")
            for n, t in tiny.items():
                h, w = rec.layer_grids[n]
                self._signal_shapes[n] = (int(t.shape[1]), h * w)
        total = self._n_probe or self._probe.size()
        images = {n: min(total, -(-self.signal_ratio * self._signal_shapes[n][0] // self._signal_shapes[n][1]))
                  for n in layers}
        return layers, images, max(images.values())

    def _signal(self, step: int) -> Optional[Dict[str, Any]]:
        """Record the lowest two still-judged groups and compare them with the recording one
        window earlier; feed the policy (on the writer, then broadcast).

        When the lowest of them may freeze at the next window (its streak is one short of
        ``patience``), the two groups above are recorded too (a look-ahead): they then have
        a recording one window earlier the moment they become the lowest, instead of
        spending a window on a first recording, and their streaks count from now.

        Each group is judged on the calibrated similarity of its layers (:meth:`_calibrate`,
        :func:`svcca_torch.freeze.calibrated_similarity`; the lowest over its layers); a group
        none of whose layers can be judged (chance level above
        :data:`~svcca_torch.freeze.CHANCE_LIMIT`) is not recorded and takes the value of the
        next judged group above it. The recording is taken, thinned or skipped within the
        signal's share of the time budget (:meth:`_signal_groups`); a skipped window is no
        observation (streaks neither grow nor reset)."""
        assert self.policy is not None and self.freeze_window is not None
        with self._timed():
            t0 = time.perf_counter()
            try:
                return self._signal_step(step)
            finally:
                self.signal_stats["seconds"] += time.perf_counter() - t0

    def _signal_step(self, step: int) -> Optional[Dict[str, Any]]:
        policy = self.policy
        assert isinstance(policy, AdaptiveFreezePolicy) and self.freeze_window is not None
        frozen = set(policy.frozen)
        room = policy.max_frozen - len(frozen)
        trained = [g for g in policy.groups if g not in frozen][:room]
        judged = [g for g in trained if self._judgeable(g)]
        want = judged[:2]
        if want and policy.streak[trained[0]] >= policy.patience - 1:
            want = judged[:4]
        state = None
        out: Optional[Dict[str, Any]] = None
        if want and self.is_writer:
            ref = self._ref
            paired = ref is not None and step - ref["step"] == self.freeze_window
            # the chance calibration recorded this step already (the start): nothing to compare yet
            groups = [] if ref is not None and ref["step"] == step else self._signal_groups(
                step, want, ref if paired else None)
            if groups:
                layers, images, n_images = self._signal_plan(groups)
                t1 = time.perf_counter()
                acts, index = self._record_signal(layers, n_images)  # index: row -> probe image, per layer
                bases = self._signal_bases(acts, index, layers, images, step) if acts is not None else {}
                self._signal_costs[tuple(layers)] = time.perf_counter() - t1
                self.signal_stats["recordings"] += 1
                sims: Dict[str, float] = {}
                raw: Dict[str, float] = {}
                carried: Dict[str, str] = {}
                if paired:
                    assert ref is not None
                    for g in groups:
                        names = [n for n in self.group_layers[g] if self._judged_layer(n)]
                        if names and all(n in ref["bases"] and n in bases
                                         and ref["bases"][n].n_datapoints == bases[n].n_datapoints for n in names) \
                                and all(self._trusted(bases[n], n) for n in names):
                            vals = paired_similarity({n: ref["bases"][n] for n in names}, {n: bases[n] for n in names})
                            raw[g] = min(vals.values())  # a group is settled when all its layers are
                            sims[g] = min(calibrated_similarity(vals[n], self._chance_of(n)) for n in names)
                    # a group that cannot be judged on its own signal goes with the next judged one above it
                    for i, g in enumerate(trained):
                        if g not in judged:
                            proxy = next((h for h in trained[i + 1:] if h in judged), None)
                            if proxy is not None and proxy in sims:
                                sims[g], carried[g] = sims[proxy], proxy
                self._ref = {"step": step, "bases": bases}
                if paired:
                    policy.update(step, sims)
                    out = {"step": step, "window": self.freeze_window, "similarity": sims, "raw": raw,
                           "carried": carried}
                    self.signal_log.append({"step": step, **sims})
                    self.signal_raw_log.append({"step": step, **raw})
            state = policy.state_dict()
        state = self._broadcast(state)
        if state is not None:
            policy.load_state_dict(state)
        return out

    def _signal_bases(self, acts: Dict[str, torch.Tensor], index: Mapping[str, torch.Tensor], layers: Sequence[str],
                      images: Mapping[str, int], step: int) -> Dict[str, ReducedBasis]:
        """The signal's reduced bases: each layer's rows of its own first ``images[layer]``
        probe images, reduced to the directions that explain 99% of the variance (the paper's
        SVD step: the signal judges the directions that carry the layer, not its low-variance
        tail). A layer constant since the start is left out until it varies."""
        bases: Dict[str, ReducedBasis] = {}
        for n in layers:
            t = acts.pop(n)
            t = t[(index[n] < images[n]).to(t.device)]
            try:
                bases[n] = self._reduce(n, t, step, SIGNAL_KEEP, "variance", kind="freeze signal")
            except CaptureError as err:
                if err.constant and self._pending(n, "signal_from"):
                    continue  # constant since the start (a zero-initialised head): its signal starts when it varies
                earlier = (self._ref or {}).get("bases", {}).get(n)
                if earlier is None:
                    earlier = (self._prev or {}).get(n)
                why = _swamped(t, earlier) if err.constant else None
                if why is None:
                    raise
                self._note_swamped(step, {n: why}, "freeze signal")  # not dead: left out until it varies
                continue
            if self._pending(n, "signal_from"):
                self.constant_layers[n]["signal_from"] = int(step)
        return bases

    # ------------------------------------------------------------------ the signal's budget
    def _signal_allowance(self, train: float) -> float:
        """Seconds the freeze signal may have spent by a training time of ``train`` seconds:
        :data:`SIGNAL_SHARE` of ``max_overhead`` of it, counting at least
        :data:`SHORT_RUN_SECONDS` (as the capture schedule's floor: a short run may spend what
        a 5-minute run's signal may)."""
        assert self.max_overhead is not None
        return SIGNAL_SHARE * self.max_overhead * max(train, SHORT_RUN_SECONDS)

    def _signal_estimate(self, layers: Sequence[str]) -> float:
        """The expected cost of a signal recording of ``layers`` (recording and reduction):
        as last measured for the same layers, else the cheapest measured recording of more
        layers (the chance calibration records every judgeable layer), else the largest
        measured, else the last capture's cost (every layer on the whole probe)."""
        key = tuple(layers)
        if key in self._signal_costs:
            return self._signal_costs[key]
        wanted = set(layers)
        covering = [c for k, c in self._signal_costs.items() if wanted <= set(k)]
        if covering:
            return min(covering)
        if self._signal_costs:
            return max(self._signal_costs.values())
        return self._capture_cost or 0.0

    def _signal_groups(self, step: int, want: Sequence[str], ref: Optional[Dict[str, Any]]) -> List[str]:
        """The groups the signal records at ``step``: ``want`` when that fits the signal's
        share of the budget, else fewer (the look-ahead dropped, then the lowest group
        alone), else none (the window is skipped). A recording that completes a pair (the
        lowest group was recorded one window earlier, ``ref``) must fit by itself; one that
        starts a pair must fit twice, by the next window's training time."""
        stats = self.signal_stats
        stats["windows"] += 1
        if self.max_overhead is None:
            return list(want)
        _, train, _ = self._budget()
        window = max(0.0, train - self._signal_mark) if self._signal_mark is not None else 0.0
        self._signal_mark = train
        spent = stats["seconds"]
        est = 0.0
        for k in sorted({len(want), min(2, len(want)), 1}, reverse=True):
            groups = list(want[:k])
            est = self._signal_estimate([n for g in groups for n in self.group_layers[g]])
            completes = ref is not None and all(n in ref["bases"] for n in self.group_layers[groups[0]]
                                                if self._judged_layer(n))
            need, horizon = (est, train) if completes else (2 * est, train + window)
            if spent + need <= self._signal_allowance(horizon):
                if k < len(want):
                    stats["reduced"] += 1
                    _append_capped(stats["reduced_steps"], int(step))
                return groups
        stats["skipped"] += 1
        _append_capped(stats["skipped_steps"], int(step))
        stats["reason"] = (
            f"a signal recording (~{est:.2g} s) did not fit in the signal's share of the budget ({SIGNAL_SHARE:g} x "
            f"max_overhead={self.max_overhead:g} of the training time so far, {train:.3g} s, counted as at least "
            f"{SHORT_RUN_SECONDS:.0f} s), with {spent:.2g} s spent on the signal")
        return []

    def signal_summary(self) -> Dict[str, Any]:
        """What the freeze signal cost and what its budget skipped (``svcca_summary.json``:
        ``"freeze"`` / ``"signal_budget"``): ``windows`` (grid points with groups to judge),
        ``recordings``, ``seconds`` (the signal's own time: recordings, reductions, the chance
        calibration, ``calibration_seconds`` of it), ``skipped`` / ``skipped_steps`` (windows
        not recorded: the recording did not fit; first 50 steps), ``reduced`` /
        ``reduced_steps`` (windows recorded with fewer groups), ``reason`` (the last skip's),
        ``allowance`` (seconds the signal may have spent by now), ``share`` and ``message``."""
        stats = {k: (list(v) if isinstance(v, list) else v) for k, v in self.signal_stats.items()}
        _, train, _ = self._budget()
        stats.update(share=SIGNAL_SHARE, training_seconds=round(train, 4),
                     allowance=None if self.max_overhead is None else round(self._signal_allowance(train), 4),
                     message=self.signal_report())
        return stats

    def signal_report(self) -> str:
        """One sentence: the freeze signal's recordings, their cost against the training time,
        and what the budget skipped or thinned (empty without the adaptive policy)."""
        if self.freeze != "adaptive":
            return ""
        s = self.signal_stats
        _, train, _ = self._budget()
        parts = [f"freeze signal: {s['recordings']} recording{'s' if s['recordings'] != 1 else ''} at "
                 f"{s['windows']} window{'s' if s['windows'] != 1 else ''}, {s['seconds']:.3g} s"
                 + (f" ({100 * s['seconds'] / train:.1f}% of {train:.3g} s of training)" if train > 0 else "")
                 + (f", {s['calibration_seconds']:.2g} s of it the chance calibration" if s["calibration_seconds"]
                    else "")]
        if s["reduced"]:
            parts.append(f"{s['reduced']} window{'s' if s['reduced'] > 1 else ''} recorded with fewer groups")
        if s["skipped"]:
            steps = ", ".join(map(str, s["skipped_steps"][:6])) + (", ..." if s["skipped"] > 6 else "")
            parts.append(f"{s['skipped']} window{'s' if s['skipped'] > 1 else ''} skipped (steps {steps}): "
                         f"{s['reason']}")
        return "; ".join(parts) + "."

    # ------------------------------------------------------------------ chance levels
    def _judged_layer(self, name: str) -> bool:
        """Whether ``name`` is judged on its own signal: its chance level is at most
        :data:`~svcca_torch.freeze.CHANCE_LIMIT` (or was not measured)."""
        c = self._chance_of(name)
        return c is None or c <= CHANCE_LIMIT

    def _chance_of(self, name: str) -> Optional[float]:
        return None if not self.chance else self.chance.get(name)

    def _judgeable(self, group: str) -> bool:
        return any(self._judged_layer(n) for n in self.group_layers[group])

    def _calibrate(self, step: int) -> None:
        """Measure each judgeable layer's chance level, once (at the start, on the writer).

        A layer's chance level is its signal similarity against the same layer of an
        independently initialised copy of the model, on the same probe images and grid: what
        the signal reads when nothing of the layer's learning is shared. A conv layer over
        image patches reads ~1 whatever its weights (it spans nearly the same subspace of
        its input), so a raw signal near 1 says nothing about it having settled; judged on
        ``(s - chance) / (1 - chance)`` (:func:`svcca_torch.freeze.calibrated_similarity`) it
        settles when it moved less in one window than ``1 - freeze_threshold`` of the way
        from an unrelated network. The copy is the model itself, re-initialised in place for
        one recording and restored bit for bit: ``reset_parameters()`` (or
        ``_reset_parameters()``) of every module that has it, under a fixed seed and a forked
        RNG (the caller's random streams are untouched); parameters no such method covers
        are redrawn by a random permutation of their own entries (the same values, so the
        same distribution for an i.i.d. initialisation). The model's recording here is also
        the signal's first recording. Not measured (every layer judged on its raw signal,
        the reason in :attr:`chance_info`) when it does not fit the signal's budget or the
        run resumed with frozen groups from a state without chance levels."""
        assert self.policy is not None
        policy = self.policy
        self.chance = {}
        info: Dict[str, Any] = {"step": int(step), "seconds": 0.0, "error": None, "limit": CHANCE_LIMIT, "layers": {}}
        self.chance_info = info
        groups = [g for g in policy.groups[:policy.max_frozen] if g not in policy.frozen]
        if not groups:
            return
        if policy.frozen:
            info["error"] = ("not measured: the run resumed with frozen groups from a state without chance levels; "
                             "every layer is judged on its raw signal")
            return
        t0 = time.perf_counter()
        try:
            layers, images, n_images = self._signal_plan(groups)

            def over(est: float) -> bool:
                spent = self.signal_stats["seconds"] + time.perf_counter() - t0
                if self.max_overhead is None or spent + est <= self._signal_allowance(self._budget()[1]):
                    return False
                info["error"] = (f"not measured: a recording of every judgeable layer (~{est:.2g} s) did not fit in "
                                 "the signal's share of the budget; every layer is judged on its raw signal")
                return True

            if over(self._signal_estimate(layers)):
                return
            t1 = time.perf_counter()
            acts = self._record(layers, n_images)
            assert acts is not None and self.recorder is not None
            mine = self._signal_bases(acts, dict(self.recorder.layer_datapoint_index), layers, images, step)
            self._signal_costs[tuple(layers)] = time.perf_counter() - t1
            self._ref = {"step": int(step), "bases": mine}  # the signal's recording at this step
            if over(self._signal_costs[tuple(layers)]):  # the copy's recording costs about the same
                return
            try:
                theirs = self._record_independent(layers, images, n_images)
            except Exception as err:  # anything about re-initialising a model we do not know: raw signals
                info["error"] = (f"not measured: the independently initialised copy failed ({type(err).__name__}: "
                                 f"{err}); every layer is judged on its raw signal")
                theirs = None
            if theirs is None:
                return
            for n in layers:
                c: Optional[float] = None
                reason = None
                if n not in mine:
                    reason = "not measured: constant over the probe at the start (judged on its raw signal)"
                elif n not in theirs:
                    reason = "not measured: constant or not finite in the independent copy (judged on its raw signal)"
                else:
                    c = paired_similarity({n: mine[n]}, {n: theirs[n]})[n]
                judged = c is None or c <= CHANCE_LIMIT
                if not judged:
                    reason = (f"chance level {c:.5f} > {CHANCE_LIMIT:g}: its signal cannot tell learning from no "
                              "learning, so it is not judged on it; its group goes with the next judged group above")
                self.chance[n] = c
                info["layers"][n] = {"chance": c, "judged": judged, "reason": reason}
        finally:
            dt = time.perf_counter() - t0
            info["seconds"] = round(dt, 6)
            self.signal_stats["seconds"] += dt
            self.signal_stats["calibration_seconds"] += dt

    def _record_independent(self, layers: Sequence[str], images: Mapping[str, int], n_images: int
                            ) -> Dict[str, ReducedBasis]:
        """The signal's bases of ``layers`` on an independently initialised copy of the model
        (see :meth:`_calibrate`); layers constant or not finite there are left out."""
        assert self.recorder is not None
        restore = _reinitialise(self.model)
        try:
            acts = self._record(layers, n_images)
            index = dict(self.recorder.layer_datapoint_index)
        finally:
            restore()
        assert acts is not None
        out: Dict[str, ReducedBasis] = {}
        for n in layers:
            t = acts.pop(n)
            try:
                out[n] = svd_reduce(t[(index[n] < images[n]).to(t.device)], SIGNAL_KEEP, keep_rule="variance", name=n)
            except (ZeroVarianceError, NonFiniteError):
                pass
        return out

    def _record_signal(self, layers: List[str], n_images: int) -> Recording:
        """A freeze-signal recording (per-layer rows) of ``layers`` on the first ``n_images``
        probe images, reusing the frozen prefix's output on the probe where that is exact
        (:class:`svcca_torch._prefix.PrefixReuse`: checked once per prefix on the first batch)."""
        assert self.recorder is not None and self.policy is not None
        rec = self.recorder

        def record(n: int) -> Recording:
            acts = self._record(layers, n)
            return acts, (dict(rec.layer_datapoint_index) if acts is not None else {})

        frozen = self._frozen_modules()
        example = lambda mods: call_order(self.model, mods, to_model(self._probe.head(_FLOPS_EXAMPLES),  # noqa: E731
                                                                     self.model))
        return self._reuse.run(frozen, layers, n_images, record, example, self._model_device())

    def _trusted(self, basis: ReducedBasis, name: str) -> bool:
        ok = basis.n_datapoints >= self.signal_ratio * basis.k
        if not ok and name not in self._warned:
            self._warned.add(name)
            warnings.warn(
                f"{type(self).__name__}: the freeze signal of layer {name!r} has {basis.n_datapoints} datapoints for "
                f"{basis.k} kept directions (< {self.signal_ratio} per direction), so its similarity is not "
                "trusted and its group is not frozen; use a larger probe or a larger `grid`.", UserWarning,
                stacklevel=3)
        return ok

    # ------------------------------------------------------------------ freezing
    def _apply_frozen(self, step: int, silent: bool = False) -> Optional[Dict[str, Any]]:
        """Freeze every group the policy lists that is not frozen yet; the freeze-log entry."""
        assert self.policy is not None
        by_name = {g.name: g for g in self.groups}
        # a group without parameters has nothing to freeze (and would count as newly frozen every time)
        newly = [n for n in self.policy.frozen if by_name[n].parameters() and not is_frozen(by_name[n])]
        if not newly:
            return None
        for n in newly:
            freeze_group(by_name[n])
        self._update_cache()
        if silent:
            return None
        frozen_params = sum(by_name[n].num_parameters() for n in self.policy.frozen)
        saved = None
        if self.is_writer and self.baseline_backward_flops:
            saved = 1.0 - self._backward_flops() / self.baseline_backward_flops
        entry = {"step": int(step), "groups": newly, "frozen_groups": len(self.policy.frozen),
                 "frozen_parameters": frozen_params, "backward_flops_saved": saved}
        self.freeze_log.append(entry)
        return entry

    def _update_cache(self) -> None:
        """Let the frozen-output cache serve the frozen modules (after a freeze)."""
        if self.frozen_cache is None or self.policy is None:
            return
        if self._cache is None:
            self._cache = FrozenOutputCache(self.model, self.frozen_cache)
        self._cache.update(self._frozen_modules(),
                           to_model(self._probe.head(FrozenOutputCache.CHECK_IMAGES), self.model))

    def _note_cache_window(self, step: int, epoch: Optional[int]) -> None:
        """End the cache's window (its rule for serving nothing): at each new epoch the loop
        passes (inputs repeat once per epoch), else every ``freeze_window`` steps, else every 5%
        of ``total_steps`` (100 steps when that is unknown too)."""
        assert self._cache is not None
        if epoch is not None:
            if self._cache_epoch is not None and epoch != self._cache_epoch:
                self._cache.note_window(f"epoch ({self._cache_epoch})")
            self._cache_epoch = epoch
            return
        window = self.freeze_window or max(1, (self.total_steps or 2000) // 20)
        if step % window == 0:
            self._cache.note_window(f"window of {window} steps")

    def _frozen_modules(self) -> Dict[str, nn.Module]:
        """The frozen groups' modules, outermost only (name -> module)."""
        assert self.policy is not None
        by_name = {g.name: g for g in self.groups}
        return outermost({m: mod for g in self.policy.frozen for m, mod in
                          zip(by_name[g].module_names, by_name[g].modules)})

    def _close_cache(self) -> None:
        if self._cache is not None:
            if self._cache.lookups or self._cache.off:
                self.frozen_cache_stats = self._cache.stats()
            self._cache.close()
            self._cache = None

    def _backward_flops(self, all_trainable: bool = False) -> int:
        """FLOPs of one backward pass on one probe input (eval mode, grad enabled), with
        PyTorch's fused attention fast path off: ``nn.TransformerEncoder`` decides on it from
        its first layer alone, so with that layer frozen and a padding mask it would hand a
        nested tensor to a trainable layer above, which refuses it outside the fast path (the
        fast path is for inference: training forwards never take it)."""
        x = to_model(self._probe.head(1), self.model)  # FLOPs are linear in the batch: one input (eval mode)
        model, arg = (self.model, x) if isinstance(x, torch.Tensor) else (_Bound(self.model, x), None)
        frozen = [p for g in self.groups for p in g.parameters() if not p.requires_grad] if all_trainable else []
        for p in frozen:
            p.requires_grad_(True)
        try:
            with _mha_fastpath_off():
                return backward_flops(model, arg)
        finally:
            for p in frozen:
                p.requires_grad_(False)

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        """Release the store's writer lock (another store may then write to ``run_dir``) and
        give the frozen modules their own forwards back (the frozen-output cache). Idempotent;
        call it when training stops without :meth:`finish` (an exception); a later
        :meth:`start` reopens the store, and the store stays readable."""
        self._close_cache()
        if self.store is not None:
            self.store.close()

    def finish(self, step: int, epoch: Optional[int] = None) -> Optional[FinalAnalysis]:
        """Capture the final state (if not captured yet) and, on the writer, run the final
        analysis and write ``svcca_summary.json`` (and figures) in ``run_dir``.

        The end of a run never loses what was captured. A data error (a layer constant over
        the probe or not finite at the final capture, :class:`CaptureError`; a zero-variance
        or non-finite error in the analysis) is recorded in :attr:`failures` and under
        ``"failures"`` in ``svcca_summary.json`` (``{"step", "layer", "kind", "message"}``);
        the final capture is stored without that layer (nothing is stored when every layer
        fails: the run then ends at its last capture), the rest is analysed and written, and
        one ``UserWarning`` at the end lists every failure. Any other error is raised, after
        the summary and the figures computed before it are written."""
        self.failures = []
        result: Optional[FinalAnalysis] = None
        with self._timed():
            self._close_cache()  # training is over: the frozen modules' forwards are restored
            try:
                error: Optional[Exception] = None
                self._final = True  # data errors of this capture are recorded, not raised
                try:
                    if step not in self.captured_steps:
                        self.capture(step, epoch)
                except Exception as err:  # not about the data: raised once what was saved is written
                    error = err
                finally:
                    self._final = False
                if self.is_writer:
                    try:
                        result = self._analyse()
                    except Exception as err:
                        if error is None:
                            raise
                        warnings.warn(f"{type(self).__name__}: the final analysis failed too ({type(err).__name__}: "
                                      f"{err}); raising the final capture's error.", UserWarning, stacklevel=2)
                if error is not None:
                    raise error
            finally:
                self.close()  # the run is over: release the store's writer lock
        if self.failures:
            n = len(self.failures)
            warnings.warn(
                f"{type(self).__name__}: {n} failure{'s' if n > 1 else ''} at the end of the run; what "
                f"{'they concern was' if n > 1 else 'it concerns was'} left out, the rest analysed and written to "
                f"{self.run_dir} (svcca_summary.json lists {'them' if n > 1 else 'it'} under \"failures\"):\n"
                + "\n".join(f"  - {f['message']}" for f in self.failures), UserWarning, stacklevel=2)
        return result

    @property
    def freeze_steps(self) -> Dict[str, int]:
        """``{group: the step it was frozen at}`` (bottom-up; from the freeze log)."""
        return {g: int(e["step"]) for e in self.freeze_log for g in e["groups"]}

    @property
    def layer_freeze_steps(self) -> Dict[str, int]:
        """``{recorded layer: the step its group was frozen at}``."""
        steps = self.freeze_steps
        return {n: steps[g] for g in steps for n in self.group_layers.get(g, [])}

    def _analysis_on(self) -> torch.device:
        if self.analysis_device is not None:
            return self.analysis_device
        return next((t.device for t in self.model.parameters()), torch.device("cpu"))

    def _analyse(self) -> Optional[FinalAnalysis]:
        """The end-of-run analysis, on ``analysis_device`` (default the model's device).

        Every capture is compared with the final one layer by layer (the to-final curves,
        the diagonal: one small eigenproblem per layer, batched); full layers x layers
        matrices only for the captures that are shown, chosen from those curves by
        :func:`svcca_torch.board.full_checkpoints` (the paper's grid at 0/35/75/100% and
        the at most 10 heatmaps TensorBoard shows). In ``svcca_summary.json`` the other
        captures' matrices are ``null`` off the diagonal; ``full_steps`` lists the captures
        with a full matrix. Figures: ``learning_dynamics.png``, ``convergence.png`` and, with
        freeze training, ``to_previous.png``.
        """
        from .board import grid_checkpoints
        from .dynamics import convergence_order
        from .plotting import plot_convergence, plot_learning_dynamics

        assert self.store is not None
        run_dir = self.run_dir
        frozen_at = self.layer_freeze_steps
        # in depth order (a layer constant at the start is stored first when it varies, after the others)
        order = [n for n in (self.recorder.layers if self.recorder is not None else []) if n in self.store.layers]
        layers = order + [n for n in self.store.layers if n not in order]
        summary: Dict[str, Any] = {
            "layers": layers,
            "captured_steps": list(self.captured_steps),
            "probe_checksum": self.probe_checksum,
            "store": str(self.store.folder),
            "overhead": self.overhead,
            "frozen_cache": self.frozen_cache_stats,
            "freeze": {"policy": self.freeze or None, "window": self.freeze_window,
                       "groups": [{"name": g.name, "modules": g.module_names} for g in self.groups],
                       "events": self.freeze_log, "signal": self.signal_log,
                       "freeze_steps": self.freeze_steps, "layer_freeze_steps": frozen_at,
                       "policy_state": self.policy.state_dict() if self.policy is not None else None,
                       "signal_raw": self.signal_raw_log,
                       "signal_budget": self.signal_summary() if self.freeze == "adaptive" else None,
                       "chance": self.chance_info or None},
            "schedule": self.schedule_summary(),
            "constant_at_start": {k: dict(v) for k, v in self.constant_layers.items()},
        }
        result = None
        run_dir.mkdir(parents=True, exist_ok=True)
        try:  # the summary is written whatever fails below (with what was computed before it)
            dyn = None
            if self.final_analysis and len(self.store) >= 1:
                device = self._analysis_on()
                online = self._online_previous(layers)
                try:
                    dyn = shown_dynamics(self.store, device=device, progress=self.progress, previous=online is None,
                                         max_images=self.final_heatmaps, grid=self.grid_fractions or (),
                                         layers=layers)
                except (ZeroVarianceError, NonFiniteError) as err:  # about the data: recorded, the rest written
                    self.failures.append({"step": None, "layer": None, "kind": "final analysis",
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
                summary["convergence"] = convergence_order(fin, freeze_steps=frozen_at)
                result = FinalAnalysis(dyn, fin, prev, summary)
                if self.figures:  # the views' pixels (svcca_torch.views.write_figures, through a PNGSink)
                    from .views import write_figures

                    write_figures(result, run_dir, grid_fractions=self.grid_fractions, freeze_steps=frozen_at,
                                  to_previous=bool(self.freeze))
        finally:
            summary["failures"] = [dict(f) for f in self.failures]
            tmp = run_dir / ".svcca_summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=1))
            os.replace(tmp, run_dir / "svcca_summary.json")
        return result

    def _online_previous(self, names: Optional[Sequence[str]] = None) -> Optional[torch.Tensor]:
        """``(captures, layers)`` similarity of each stored capture to the one before, from
        the values :meth:`capture` computed during training (on the bases before encoding),
        or None when some capture after the first has none (then the analysis recomputes)."""
        assert self.store is not None
        names, steps = list(names or self.store.layers), [c.step for c in self.store.checkpoints]
        known = {e["step"]: e for e in self.to_previous}
        if any(s not in known for s in steps[1:]):
            return None
        out = torch.full((len(steps), len(names)), math.nan, dtype=torch.float64)
        for c, s in enumerate(steps[1:], 1):
            for j, n in enumerate(names):
                if n in known[s]:
                    out[c, j] = float(known[s][n])
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable state: capture history, probe digests, policy, freeze log."""
        return {
            "captured_steps": list(self.captured_steps),
            "to_previous": [dict(e) for e in self.to_previous],
            "probe_checksum": self.probe_checksum,
            "probe_digests": list(self._probe.digests),
            "run_dir": str(self.run_dir),
            "policy": None if self.policy is None else self.policy.state_dict(),
            "freeze_window": self.freeze_window,
            "freeze_log": [dict(e) for e in self.freeze_log],
            "signal_log": [dict(e) for e in self.signal_log],
            "baseline_backward_flops": self.baseline_backward_flops,
            "schedule": {k: [dict(e) if isinstance(e, dict) else e for e in v] for k, v in self.schedule_log.items()},
            "signal_raw": [dict(e) for e in self.signal_raw_log],
            "signal_stats": {k: (list(v) if isinstance(v, list) else v) for k, v in self.signal_stats.items()},
            "constant_layers": {k: dict(v) for k, v in self.constant_layers.items()},
            "chance": None if self.chance is None else dict(self.chance),
            "chance_info": json.loads(json.dumps(self.chance_info)),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; applied by :meth:`start` (which re-freezes the groups)."""
        self._restored = dict(state)
        self.captured_steps = list(state.get("captured_steps", []))
        self.to_previous = [dict(e) for e in state.get("to_previous", [])]
        self._probe.digests = list(state.get("probe_digests", []))
        self.freeze_log = [dict(e) for e in state.get("freeze_log", [])]
        self.signal_log = [dict(e) for e in state.get("signal_log", [])]
        self.signal_raw_log = [dict(e) for e in state.get("signal_raw", [])]
        self.signal_stats = {**_empty_signal_stats(), **{k: (list(v) if isinstance(v, list) else v)
                                                         for k, v in state.get("signal_stats", {}).items()}}
        self.constant_layers = {k: dict(v) for k, v in state.get("constant_layers", {}).items()}
        self.chance = None if state.get("chance") is None else dict(state["chance"])
        self.chance_info = dict(state.get("chance_info") or {})
        self.baseline_backward_flops = state.get("baseline_backward_flops")
        self.schedule_log = _empty_schedule_log()
        for k, v in state.get("schedule", {}).items():
            if k in self.schedule_log:
                self.schedule_log[k] = [dict(e) if isinstance(e, dict) else e for e in v]

    def _restore(self, step: int) -> None:
        self._reuse = PrefixReuse()  # kept outputs came from weights this start may replace
        self._close_cache()
        state, self._restored = self._restored, None
        if state is None:
            return
        # captures after the checkpoint's step belong to a run that was not kept
        self.captured_steps = [s for s in self.captured_steps if s <= step]
        self.to_previous = [e for e in self.to_previous if e["step"] <= step]
        self.signal_log = [e for e in self.signal_log if e["step"] <= step]
        self.signal_raw_log = [e for e in self.signal_raw_log if e["step"] <= step]
        self._signal_mark = None
        for entry in self.constant_layers.values():  # varied in the part of the run that was not kept
            for key in ("first_varied", "signal_from"):
                if entry[key] is not None and entry[key] > step:
                    entry[key] = None
        self.freeze_log = [e for e in self.freeze_log if e["step"] <= step]
        self.schedule_log = {k: [e for e in v if (e["step"] if isinstance(e, dict) else e) <= step]
                             for k, v in self.schedule_log.items()}
        if state.get("policy") is not None:
            if self.policy is None:
                raise ValueError(
                    f"the saved state holds a {state['policy']['kind']!r} freeze-training state but this "
                    f"{type(self).__name__} has freeze_training=False; resume with the same settings."
                )
            self.policy.load_state_dict(state["policy"])
            self._apply_frozen(step, silent=True)
        if self.store is not None and len(self.store):
            self.archived = self.store.archive_after(step)
            done = [c for c in self.store.checkpoints if c.step <= step]
            if done:
                self._prev = self.store.load_checkpoint(done[-1], device=self._model_device())


def shown_dynamics(store: RepresentationStore, *, device: Optional[Union[str, torch.device]] = None,
                   progress: bool = False, max_images: int = 6, previous: bool = False,
                   grid: Sequence[float] = (), layers: Optional[Sequence[str]] = None) -> LearningDynamics:
    """The learning dynamics of a run with full matrices only where they are shown.

    One pass over ``store`` compares every capture with the final one layer by layer (the
    to-final curves) and, for the first and the last capture (and the captures nearest the
    ``grid`` fractions, e.g. the paper's 0/35/75/100%, when given), layers x layers.
    :func:`svcca_torch.board.full_checkpoints` then picks from the curves the heatmaps shown
    (at most ``max_images``: step 0, the end, then where the curves change most; the grid
    image's panels are among them), and only those not computed yet are loaded again for a
    full matrix. Off-diagonal entries of the other captures are NaN; ``.full`` lists the
    computed ones. ``previous=True`` also fills ``.previous`` (each layer against the capture
    before it) in the first pass. Bases are compared on ``device`` (default CPU); the result
    is on the CPU. ``layers``: which stored layers, in which order (default the store's).
    """
    from .board import full_checkpoints

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


def _empty_schedule_log() -> Dict[str, List[Any]]:
    """Steps captured by kind: ``front_loaded`` (:data:`LADDER` points, ``over_budget``
    ones included), ``over_budget`` (the short-run floor), ``budget`` (spaced by the budget of
    the training time so far), ``requested`` (an explicit schedule); ``skipped``:
    ``{"step", "fraction", "reason"}`` of the front-loaded points the budget did not afford."""
    return {"front_loaded": [], "over_budget": [], "budget": [], "requested": [], "skipped": []}


def _empty_signal_stats() -> Dict[str, Any]:
    return {"windows": 0, "recordings": 0, "seconds": 0.0, "calibration_seconds": 0.0, "skipped": 0,
            "skipped_steps": [], "reduced": 0, "reduced_steps": [], "reason": None}


def _append_capped(steps: List[int], step: int, cap: int = 50) -> None:
    if len(steps) < cap:
        steps.append(step)


def _reinitialise(model: nn.Module) -> Callable[[], None]:
    """Re-initialise ``model`` in place as an independently initialised copy of itself and
    return the function that restores it bit for bit (each parameter and buffer object put
    back, should a ``reset_parameters`` have replaced it, and its values copied back).

    Every module's ``reset_parameters()`` (``_reset_parameters()`` for
    ``nn.MultiheadAttention``) runs under :data:`CHANCE_SEED` with the RNG forked (the
    caller's random streams are untouched); a parameter no such method covers (an
    ``nn.Parameter`` set directly on a custom module: ViT's class token and position
    embedding) gets a random permutation of its own entries."""
    entries = []
    for mod in model.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is not None:
                    entries.append((table, name, t, t.detach().clone()))

    def restore() -> None:
        with torch.no_grad():
            for table, name, t, saved in entries:
                table[name] = t
                t.copy_(saved)

    cuda = sorted({t.device.index or 0 for _, _, t, _ in entries if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            torch.manual_seed(CHANCE_SEED)
            covered = set()
            for mod in model.modules():
                reset = getattr(mod, "reset_parameters", None)
                if not callable(reset):
                    reset = getattr(mod, "_reset_parameters", None)
                if callable(reset):
                    reset()
                    covered.update(id(p) for p in mod._parameters.values() if p is not None)
            for table, name, t, _ in entries:
                if isinstance(t, nn.Parameter) and id(t) not in covered and t.numel() > 1:
                    flat = t.detach().reshape(-1)
                    t.copy_(flat[torch.randperm(flat.numel(), device=t.device)].view_as(t))
    except BaseException:
        restore()
        raise
    return restore


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def _setting(name: str) -> property:
    def get(self: "DynamicsTracker") -> Any:
        return getattr(self.settings, name)

    def put(self: "DynamicsTracker", value: Any) -> None:
        if ("setting", name) not in _WARNED:
            _WARNED.add(("setting", name))
            warnings.warn(f"setting DynamicsTracker.{name} after construction is deprecated: pass {name}= to "
                          f"DynamicsTracker(...) (or settings=TrackerSettings(...).replace({name}=...)).",
                          FutureWarning, stacklevel=2)
        self.settings = self.settings.replace(**{name: value})

    return property(get, put, doc=f"``settings.{name}`` (:class:`~svcca_torch.settings.TrackerSettings`).")


_WARNED: set = set()
for _name in TrackerSettings.names():
    if _name not in ("layers", "frozen_cache"):
        setattr(DynamicsTracker, _name, _setting(_name))
