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

The tracker is a short coordinator; each job has its own module:

* settings (:mod:`svcca_torch.settings`): every setting declared and validated once;
* when to capture, within the time budget (:mod:`svcca_torch.schedule`);
* what a capture does: record the probe, reduce, store (:mod:`svcca_torch.capture`);
* freeze training (:mod:`svcca_torch.freeze`): the policy owns its signal and decides; the
  tracker freezes what it decides (``requires_grad=False``, ``grad=None``, normalisation kept
  in eval mode, so frozen groups stay bit-identical) and never asks which policy it holds;
* the frozen prefix (:mod:`svcca_torch.frozen_prefix`): its output reused on the probe, and
  (``frozen_cache=True``) per training input; exact or off;
* the end of the run (:mod:`svcca_torch.analysis`): matrices, figures, ``svcca_summary.json``.

Activations are ``(datapoints, neurons)``, ``(N, C, H, W)`` for conv layers (pooled to
datapoints by the recorder) and ``(N, L, D)`` for tokens (each token a datapoint).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from torch import nn

from .analysis import FinalAnalysis, analyse_run, shown_dynamics
from .capture import EXAMPLES, CaptureError, Capturer, ShardedRecord
from .freeze import FreezePolicy, LayerGroup, PolicyRun, default_layer_groups, explicit_layer_groups, get_policy
from .freeze.freezer import Freezer
from .freeze.policy import Recording
from .frozen_prefix import FrozenPrefix
from .functional.svcca import ReducedBasis
from .probe import Probe, check_probe, probe_size
from . import resume
from .recorder import ActivationRecorder, to_model
from .schedule import LADDER, SHORT_RUN_SECONDS, CaptureSchedule, Clock
from .settings import TrackerSettings
from .store import RepresentationStore

__all__ = ["DynamicsTracker", "TrackerEvents", "FinalAnalysis", "CaptureError", "check_probe", "probe_size",
           "shown_dynamics", "LADDER", "SHORT_RUN_SECONDS"]


@dataclass
class TrackerEvents:
    """What one :meth:`DynamicsTracker.start` / :meth:`~DynamicsTracker.maybe_capture` call did
    (plain data, for logging: :class:`svcca_torch.board.BoardLogger` and the callback read it).

    Attributes:
        step: the optimizer step.
        capture: ``{"step", "to_previous": {layer: similarity}}`` when a capture was taken.
        signal: the freeze policy's observation when it made one (the adaptive policy:
            ``{"step", "window", "similarity": {group: similarity to one window earlier},
            "raw", "carried"}``; rank 0 only has the values).
        freeze: a freeze-log entry ``{"step", "groups", "frozen_groups", "frozen_parameters",
            "backward_flops_saved", "reason"}`` when groups were frozen.
    """

    step: int
    capture: Optional[Dict[str, Any]] = None
    signal: Optional[Dict[str, Any]] = None
    freeze: Optional[Dict[str, Any]] = None


class DynamicsTracker:
    r"""Record layers on a fixed probe during training, keep their SVCCA history on disk and
    optionally freeze converged layer groups bottom-up. Plain PyTorch (no Lightning).

    Call :meth:`start` before the first step, :meth:`maybe_capture` after every optimizer
    step and :meth:`finish` at the end (see the module docstring for a full loop).

    Args:
        model: the ``nn.Module`` being trained.
        probe: fixed probe inputs: a tensor ``(N, ...)``; for a model whose forward takes
            several inputs, a tuple (positional) or dict (keywords) of tensors with the same
            first dimension; or a re-iterable of batches of either (a DataLoader with
            ``shuffle=False``), the same inputs in the same order every time.
        layers: layers to record (the setting ``layers``).
        settings: a :class:`~svcca_torch.settings.TrackerSettings`; keyword arguments (any
            setting's name: ``run_dir``, ``freeze``, ``freeze_window``, ``max_overhead``, ...)
            are applied on top of it. Each setting is documented there.
        is_writer: whether this process writes the store (rank 0 under DDP).
        broadcast: ``obj -> obj`` from rank 0 to every rank (default identity).
        sharded_record: ``(recorder, inputs) -> {layer: rows} or None`` recording the probe
            split across ranks (rows gathered on rank 0) for full captures; ``inputs`` is the
            probe as one batch (a tensor, or an :class:`~svcca_torch.recorder.Inputs`).

    The recorded layers are put in forward order at :meth:`setup` (one traced forward of two
    probe inputs), so freeze groups and "bottom-up" follow the forward pass. A layer constant
    over the probe at the run's first capture (a zero-initialised head) is left out, with one
    warning, until it varies (:attr:`constant_layers`); any other constant or non-finite layer
    is a :class:`CaptureError` naming the layer, the step and the fix, except in
    :meth:`finish`, which records it in :attr:`failures` and writes the rest.
    """

    def __init__(self, model: nn.Module, probe: Any, layers: Optional[Sequence[Any]] = None, *,
                 settings: Optional[TrackerSettings] = None, is_writer: bool = True,
                 broadcast: Optional[Callable[[Any], Any]] = None, sharded_record: Optional[ShardedRecord] = None,
                 **kwargs: Any) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        if layers is not None:
            kwargs["layers"] = layers
        #: the run's :class:`~svcca_torch.settings.TrackerSettings` (immutable, validated once)
        self.settings = TrackerSettings.build(settings, **kwargs)
        self.model = model
        self.is_writer = bool(is_writer)
        self._broadcast = broadcast or (lambda obj: obj)
        self._sharded_record = sharded_record
        self._probe = Probe(probe, self.settings.batch_size, model)
        self.clock = Clock(pause=self._paused)
        self.recorder: Optional[ActivationRecorder] = None
        self.capturer: Optional[Capturer] = None
        self.schedule = CaptureSchedule(self.settings, self.clock, lambda: self.captured_steps,
                                        is_writer=self.is_writer, broadcast=self._broadcast)
        self.store: Optional[RepresentationStore] = None
        self.groups: List[LayerGroup] = []
        self.group_layers: Dict[str, List[str]] = {}
        self.policy: Optional[FreezePolicy] = None
        self.freezer: Optional[Freezer] = None  # applies the policy's decisions (with freeze training)
        #: the archive folder of captures moved aside by the last :meth:`start` (resume)
        self.archived: Optional[Path] = None
        self.frozen_cache_stats: Optional[Dict[str, Any]] = None  # the frozen-output cache's, at the end
        # the frozen prefix's output on the probe and, opted in, per training input (runtime only)
        self._frozen_prefix = FrozenPrefix(model, self.frozen_cache)
        self._started = False
        self._restored: Optional[Dict[str, Any]] = None  # a loaded state, applied by start()

    # ------------------------------------------------------------------ read-only views
    @property
    def probe(self) -> Any:
        return self._probe.probe

    @property
    def probe_batches(self) -> Probe:
        """The probe as model-ready batches, digest-checked (:class:`svcca_torch.probe.Probe`)."""
        return self._probe

    @property
    def probe_checksum(self) -> Optional[str]:
        """SHA-1 of every probe input, in order (None before the first capture)."""
        return self._probe.checksum

    @property
    def frozen_prefix(self) -> FrozenPrefix:
        """The frozen prefix's kept outputs (probe recordings, the opt-in training cache): read
        :meth:`~svcca_torch.frozen_prefix.FrozenPrefix.stats`."""
        return self._frozen_prefix

    @property
    def frozen_cache(self) -> Optional[int]:
        """The frozen-output cache's memory cap in bytes, None when off (``settings.cache_bytes``)."""
        return self.settings.cache_bytes

    def _history(self, name: str, empty: Any) -> Any:
        return getattr(self.capturer, name) if self.capturer is not None else (self._restored or {}).get(name, empty)

    @property
    def captured_steps(self) -> List[int]:
        """Steps captured so far, in order."""
        return self._history("captured_steps", [])

    @property
    def to_previous(self) -> List[Dict[str, Any]]:
        """``[{"step", layer: SVCCA similarity to the previous capture}]``, one per capture after the first."""
        return self._history("to_previous", [])

    @property
    def last_capture(self) -> Optional[Dict[str, ReducedBasis]]:
        """The last capture's reduced bases ``{layer: ReducedBasis}`` (None before the first)."""
        return self.capturer.last if self.capturer is not None else None

    @property
    def failures(self) -> List[Dict[str, Any]]:
        """What :meth:`finish` could not record or analyse: ``{"step", "layer", "kind", "message"}``."""
        return self.capturer.failures if self.capturer is not None else []

    @property
    def constant_layers(self) -> Dict[str, Dict[str, Any]]:
        """Layers constant over the probe at the first capture: when each first varied
        (:class:`svcca_torch.capture.ConstantLayers`)."""
        return self.capturer.constant.layers if self.capturer is not None else self._history("constant_layers", {})

    @property
    def schedule_log(self) -> Dict[str, List[Any]]:
        return self.schedule.log

    @property
    def overhead(self) -> Optional[float]:
        """Time spent by the tracker so far / training time so far (None before training)."""
        return self.clock.overhead

    @property
    def freeze_log(self) -> List[Dict[str, Any]]:
        """``{"step", "groups", "frozen_groups", "frozen_parameters", "backward_flops_saved",
        "reason"}`` per step that froze groups (:class:`svcca_torch.freeze.freezer.Freezer`)."""
        return self.freezer.log if self.freezer is not None else (self._restored or {}).get("freeze_log", [])

    @property
    def baseline_backward_flops(self) -> Optional[int]:
        return self.freezer.baseline_backward_flops if self.freezer is not None else None

    @property
    def freeze_steps(self) -> Dict[str, int]:
        """``{group: the step it was frozen at}`` (bottom-up; from the freeze log)."""
        return {g: int(e["step"]) for e in self.freeze_log for g in e["groups"]}

    @property
    def layer_freeze_steps(self) -> Dict[str, int]:
        """``{recorded layer: the step its group was frozen at}``."""
        steps = self.freeze_steps
        return {n: steps[g] for g in steps for n in self.group_layers.get(g, [])}

    def schedule_summary(self) -> Dict[str, Any]:
        """What the capture schedule did (``svcca_summary.json``'s ``"schedule"``)."""
        return self.schedule.summary()

    def schedule_report(self) -> str:
        """One paragraph: the captures by kind, what the budget skipped and why, their cost."""
        return self.schedule.report()

    def signal_summary(self) -> Dict[str, Any]:
        """What the freeze policy's observations cost (``"freeze"`` / ``"signal_budget"``)."""
        return self.policy.summary().get("signal_budget") or {} if self.policy is not None else {}

    def signal_report(self) -> str:
        """One sentence on what the freeze policy's observations cost (empty when none)."""
        return self.policy.report() if self.policy is not None else ""

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Resolve layers, groups and the policy, and check the probe's size (idempotent;
        :meth:`start` calls it). Unknown layer names fail here, listing the names that exist."""
        if self.capturer is not None:
            return
        n = self._probe.size()
        if n < 2:
            raise ValueError(
                f"`probe` holds {n} input(s): SVCCA compares layers across probe datapoints, so it needs at least "
                "2 inputs (a few hundred to a few thousand in practice, e.g. svcca_torch.data.probe_set(dataset, 1024))."
            )
        st = self.settings
        self.recorder = ActivationRecorder(self.model, st.layers, grid=st.grid, max_datapoints=st.max_datapoints,
                                           batch_size=st.batch_size)
        # groups and "bottom-up" follow the forward pass, not the registration order: one traced forward
        self.recorder.order_layers(self._probe.head(EXAMPLES))
        capturer = Capturer(self.model, self._probe, self.recorder, is_writer=self.is_writer,
                            sharded_record=self._sharded_record, owner=type(self).__name__)
        self.capturer = capturer
        if st.freeze:
            self._setup_freeze()
        if self._restored is not None:
            resume.apply_history(self, self._restored)

    def _setup_freeze(self) -> None:
        assert self.recorder is not None and self.capturer is not None
        recorded, st = self.recorder.layers, self.settings
        self.groups = (default_layer_groups(self.model, recorded) if st.freeze_groups is None
                       else explicit_layer_groups(self.model, st.freeze_groups))
        self.group_layers = {
            g.name: [n for n in recorded if n == g.name or any(n == m or n.startswith(m + ".") for m in g.module_names)]
            for g in self.groups}
        names = [g.name for g in self.groups]
        if len(names) < 2:
            raise ValueError(
                f"freeze_training needs at least 2 layer groups (the last, the output layer, is never frozen); "
                f"got {names}. Record more layers or pass `freeze_groups`.")
        self.policy = get_policy(st.freeze).from_settings(names, st)
        self.policy.attach(PolicyRun(settings=st, model=self.model, groups=self.groups,
                                     group_layers=self.group_layers, capture=self.capturer,
                                     record=self._record_signal, clock=self.clock, is_writer=self.is_writer,
                                     broadcast=self._broadcast, owner=type(self).__name__))
        self.freezer = Freezer(self.model, self.groups, self.policy, lambda: self._probe.head(1),
                               is_writer=self.is_writer, on_freeze=self._update_cache)

    def accounted(self) -> "contextlib.AbstractContextManager[None]":
        """``with tracker.accounted(): ...`` counts the time inside as the tracker's own, so
        that ``max_overhead`` covers it too (e.g. a caller's logging of each capture)."""
        return self.clock.timed()

    def _paused(self) -> "contextlib.AbstractContextManager[Any]":
        return self._frozen_prefix.paused()

    # ------------------------------------------------------------------ the run
    def start(self, step: int = 0, epoch: Optional[int] = None) -> TrackerEvents:
        """Set up, open the store, restore a resumed state (re-freezing its groups and
        archiving captures made after ``step`` by a run that was not kept) and capture
        ``step`` (0 for a new run)."""
        with self.clock.timed():
            self.setup()
            if self.policy is not None:
                self.policy.check_run(self.settings)
            if self.is_writer:
                self.close()  # a second start (resume in the same process) reopens the store
                self.store = RepresentationStore(self.settings.run_dir / "store", keep=self.settings.keep,
                                                 max_directions=self.settings.max_directions)
            assert self.capturer is not None
            self.capturer.store = self.store
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
            if self.freezer is not None:
                self.freezer.measure_baseline()
            events = TrackerEvents(step)
            total = self.settings.total_steps
            self.schedule.restart(step / total if total else 0.0)
            if step not in self.captured_steps:
                events.capture = self.capture(step, epoch)
            if self.policy is not None:
                events.signal = self.policy.on_start(step)
                events.freeze = self.freezer.apply(step)  # type: ignore[union-attr]
            self._started = True
            return events

    def maybe_capture(self, step: int, progress: Optional[float] = None, *, epoch: Optional[int] = None,
                      request: Optional[bool] = None) -> TrackerEvents:
        """Call after every optimizer step: the freeze policy observes and decides, and a
        capture is taken when one is due and affordable.

        Args:
            step: optimizer steps done (the step just taken).
            progress: fraction of training done, if known (default ``step / total_steps``).
            epoch: the epoch, stored with a capture (and the frozen-output cache's window).
            request: ``True`` asks for a capture now (taken, whatever the budget), ``False``
                for none; default: ``every_n_steps`` when set, else the tracker's own
                front-loaded schedule within ``max_overhead`` (:mod:`svcca_torch.schedule`).
        """
        if not self._started:
            raise RuntimeError(f"{type(self).__name__}.maybe_capture: call start() once before the first step.")
        with self.clock.timed():
            events = TrackerEvents(step)
            total = self.settings.total_steps
            fraction = progress if progress is not None else (min(1.0, step / total) if total else None)
            # the training cache's window: inputs repeat once per epoch, else every freeze window,
            # else every 5% of total_steps (100 steps when that is unknown too)
            self._frozen_prefix.note_step(step, epoch, self.settings.freeze_window or max(1, (total or 2000) // 20))
            if self.policy is not None:
                events.signal = self.policy.on_step(step, fraction)
                events.freeze = self.freezer.apply(step)  # type: ignore[union-attr]
            every = self.settings.every_n_steps
            if request is None and every is not None:
                request = step % every == 0
            if request:
                events.capture = self.capture_requested(step, epoch)
            elif request is None and step not in self.captured_steps:
                kind = self.schedule.decide(step, fraction)
                if kind is not None:
                    events.capture = self.capture(step, epoch)
                    self.schedule.taken(step, kind)
            return events

    def capture_requested(self, step: int, epoch: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Take the capture an explicit schedule asks for at ``step`` (``every_n_steps``, an
        epoch end, ``request=True``), whatever the budget; None when ``step`` is captured."""
        if step in self.captured_steps:
            return None
        self.schedule.requested(step)
        return self.capture(step, epoch)

    def capture_if_affordable(self, step: int, epoch: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """A capture at ``step`` unless taken already or over the ``max_overhead`` budget
        (decided on the writer and broadcast); its result or None."""
        if step in self.captured_steps:
            return None
        with self.clock.timed():
            if not self._broadcast(self.schedule.affordable() if self.is_writer else None):
                return None
            return self.capture(step, epoch)

    def capture(self, step: int, epoch: Optional[int] = None, *, final: bool = False) -> Dict[str, Any]:
        """Record every layer now, store it and return ``{"step", "to_previous"}``
        (``to_previous`` is empty on ranks other than the writer)."""
        assert self.capturer is not None, "call start() first"
        with self.clock.timed():
            out = self.capturer.capture(step, epoch, final=final, started=self._started)
            self.schedule.capture_cost = self.capturer.capture_cost
            self.schedule.analysis_cost = self.capturer.analysis_cost
            return out

    # ------------------------------------------------------------------ the frozen prefix
    def _record_signal(self, layers: List[str], n_images: int) -> Recording:
        """A per-layer-rows recording of ``layers`` on the first ``n_images`` probe inputs:
        (rows per layer, row -> probe input per layer), reusing the frozen prefix's output on
        the probe where that is exact (:attr:`frozen_prefix`)."""
        assert self.capturer is not None and self.recorder is not None
        with self._frozen_prefix.probe_recording():
            acts = self.capturer.record(layers, n_images)
        return acts, (dict(self.recorder.layer_datapoint_index) if acts is not None else {})

    def _update_cache(self) -> None:
        """Let the frozen prefix serve the frozen modules (after a freeze)."""
        if self.freezer is not None:
            self._frozen_prefix.update(self.freezer.frozen_modules(),
                                       to_model(self._probe.head(FrozenPrefix.CHECK_IMAGES), self.model))

    def _close_cache(self) -> None:
        self._frozen_prefix.close()
        cache = self._frozen_prefix.stats().cache
        if cache is not None and (cache.lookups or cache.off):
            self.frozen_cache_stats = cache.summary()

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        """Release the store's writer lock and give the frozen modules their own forwards back
        (the frozen-output cache). Idempotent; call it when training stops without
        :meth:`finish` (an exception); a later :meth:`start` reopens the store."""
        self._close_cache()
        if self.store is not None:
            self.store.close()

    def finish(self, step: int, epoch: Optional[int] = None) -> Optional[FinalAnalysis]:
        """Capture the final state (if not captured yet) and, on the writer, run the final
        analysis and write ``svcca_summary.json`` (and figures) in ``run_dir``.

        The end of a run never loses what was captured: a data error (a layer constant or not
        finite at the final capture, or in the analysis) is recorded in :attr:`failures` and
        ``svcca_summary.json`` (``"failures"``), the rest analysed and written, and one
        ``UserWarning`` lists them. Any other error is raised after what was saved is written."""
        result: Optional[FinalAnalysis] = None
        assert self.capturer is not None, "call start() first"
        self.capturer.failures = []
        with self.clock.timed():
            self._close_cache()  # training is over: the frozen modules' forwards are restored
            try:
                error: Optional[Exception] = None
                try:
                    if step not in self.captured_steps:
                        self.capture(step, epoch, final=True)  # data errors recorded, not raised
                except Exception as err:  # not about the data: raised once what was saved is written
                    error = err
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
                f"{self.settings.run_dir} (svcca_summary.json lists {'them' if n > 1 else 'it'} under \"failures\"):\n"
                + "\n".join(f"  - {f['message']}" for f in self.failures), UserWarning, stacklevel=2)
        return result

    def _analyse(self) -> Optional[FinalAnalysis]:
        assert self.store is not None
        return analyse_run(self, self.store)

    # ------------------------------------------------------------------ state (svcca_torch.resume)
    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable state: capture history, probe digests, policy, freeze log."""
        return resume.state_of(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (0.2 states too); applied by :meth:`start`, which
        re-freezes the groups and archives captures made after the resumed step."""
        self._restored = resume.normalise(state)
        self._probe.digests = list(self._restored.get("probe_digests", []))
        self.schedule.load_state_dict(self._restored.get("schedule", {}))
        if self.capturer is not None:
            resume.apply_history(self, self._restored)

    def _restore(self, step: int) -> None:
        self._close_cache()
        self._frozen_prefix = FrozenPrefix(self.model, self.frozen_cache)  # kept outputs came from replaced weights
        state, self._restored = self._restored, None
        if state is not None:
            resume.resume_at(self, state, step)

def _setting(name: str) -> property:
    def get(self: DynamicsTracker) -> Any:
        return getattr(self.settings, name)

    def put(self: DynamicsTracker, value: Any) -> None:
        warned = self.__dict__.setdefault("_warned_settings", set())
        if name not in warned:  # once per tracker and setting
            warned.add(name)
            warnings.warn(f"setting DynamicsTracker.{name} after construction is deprecated: pass {name}= to "
                          f"DynamicsTracker(...) (or settings=TrackerSettings(...).replace({name}=...)).",
                          FutureWarning, stacklevel=2)
        self.settings = self.settings.replace(**{name: value})
        self.schedule.settings = self.settings
        if self.policy is not None:
            self.policy.run.settings = self.settings

    return property(get, put, doc=f"``settings.{name}`` (:class:`~svcca_torch.settings.TrackerSettings`).")


for _name in TrackerSettings.names():  # 0.2 read these as attributes: read through to the settings
    if _name not in ("layers", "frozen_cache"):
        setattr(DynamicsTracker, _name, _setting(_name))


def _signal_view(attr: str, empty: Callable[[], Any], doc: str) -> property:
    def get(self: DynamicsTracker) -> Any:
        signal = getattr(self.policy, "signal", None)
        return getattr(signal, attr) if signal is not None else empty()

    return property(get, doc=doc)


# 0.2 read the adaptive signal's records on the tracker: read through to the policy's signal
for _name, _attr, _empty in (("signal_log", "log", list), ("signal_raw_log", "raw_log", list),
                             ("signal_stats", "stats", dict), ("chance", "chance", lambda: None),
                             ("chance_info", "chance_info", dict)):
    setattr(DynamicsTracker, _name, _signal_view(_attr, _empty, f"``policy.signal.{_attr}`` (the adaptive policy's "
                                                               ":class:`~svcca_torch.freeze.signal.FreezeSignal`)."))
