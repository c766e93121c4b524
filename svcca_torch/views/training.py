"""TrainingViews: one object that shows a run's SVCCA learning dynamics in every sink.

The facade over :mod:`~svcca_torch.views.selection` (what to show, when),
:mod:`~svcca_torch.views.encoding` (figures drawn once as RGB arrays) and
:mod:`~svcca_torch.views.sinks` (TensorBoard, PNG files, any logger). A plain PyTorch loop::

    tracker = DynamicsTracker(model, probe, total_steps=total, freeze="adaptive", freeze_window=len(loader),
                              figures=False)
    views = TrainingViews.for_tracker(tracker, [TensorBoardSink("runs/tb"), PNGSink(tracker.run_dir)])
    views.log(tracker.start())
    for step in ...:                           # after every optimizer step
        views.log(tracker.maybe_capture(step))
    views.log_final(tracker.finish(step))
    views.close()

Tags, all under ``<name>/``::

    <name>/live/to_previous_matrix    image: layers x layers SVCCA, previous capture vs this one
    <name>/live/to_previous_curves    image: every layer's similarity to its previous capture so far
    <name>/dynamics/grid              image: 2x2 heatmaps where the curves change (end of training)
    <name>/dynamics/to_final_matrix   images: layers x layers vs the final network, chosen captures
    <name>/dynamics/to_final_curves   image: similarity to the final state, coloured by depth
    <name>/freeze/frozen_groups       scalar (count) at every capture and freeze window from step 0
    <name>/freeze/backward_flops_saved  scalar (fraction of one backward pass), as often
    <name>/freeze/events, <name>/layers  text: what was frozen when, and why; names -> layers
    <name>/to_previous                with ``layer_scalars=True`` (TensorBoard): scalar per layer per capture

and, for sinks that take every scalar (``Sink.all_scalars``: loggers other than TensorBoard),
``<name>/to_previous/<layer>``, ``<name>/to_final/<layer>``, ``<name>/freeze_signal/<group>``
and ``<name>/freeze/frozen_parameters``.

Everything is meant to read right at TensorBoard's default settings (smoothing 0.6,
outliers ignored): per-layer curves are images (one chart, a line per layer coloured by
depth, every point, each freeze marked), the step functions are scalars logged often, each
image tag gets at most ``max_images`` (10) images, chosen in advance and in step order, so
TensorBoard's reservoir keeps every one. Images are titled with the step and a fraction of
training precise enough to tell early captures apart; frozen layers carry their freeze step.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

from ..functional.svcca import ReducedBasis
from ..plotting import short_layer_names
from ..utils.validation import check_bool, check_fraction, check_keep, check_positive_int
from . import encoding
from .selection import (
    LIVE_FRACTIONS,
    TENSORBOARD_IMAGES_PER_TAG,
    ImageSchedule,
    final_live_images,
    freeze_state_due,

)
from .images import ImageViews
from .sinks import Sink

__all__ = ["TrainingViews"]

Bases = Mapping[str, Union[torch.Tensor, ReducedBasis]]


def _tag_safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name) or "layer"


class TrainingViews(ImageViews):
    """SVCCA learning dynamics in every sink, under ``<name>/`` (see the module docstring).

    With a tracker (:meth:`for_tracker`): :meth:`log` every :class:`~svcca_torch.tracker.TrackerEvents`
    of ``tracker.start`` / ``tracker.maybe_capture``, :meth:`log_final` the result of
    ``tracker.finish``, :meth:`close` last. From plain data: :meth:`log_capture` after every
    capture (step 0 included), :meth:`log_freeze` at every capture and freeze window when
    freeze training is on, :meth:`log_final` with a ``LearningDynamics``.

    Activations given to :meth:`log_capture` are ``(datapoints, neurons)`` per layer (or
    :class:`~svcca_torch.functional.svcca.ReducedBasis` objects).

    Args:
        sinks: where the views go (:class:`~svcca_torch.views.sinks.Sink` objects).
        name: the first component of every tag (two views with different names coexist).
        layers: the recorded layer names, bottom-up (the store's order).
        total_steps: the planned number of training steps (the fraction of training).
        max_images: images per image tag (TensorBoard keeps 10 by default; raise it only
            together with ``--samples_per_plugin images=N``).
        live_fractions: fractions of training at which the live images are refreshed.
        fractions: ``None``: the grid and the heatmaps are chosen where the curves change;
            the paper's ``(0, 0.35, 0.75, 1)`` or other fractions: the grid shows the
            checkpoint nearest each, and the heatmaps include them.
        min_change: matrices within this largest cell difference count as alike.
        dpi, font_size: the images' pixels per inch and base font size (points).
        keep: SVD truncation when :meth:`log_capture` gets activations instead of bases.
        layer_scalars: also write each capture's per-layer similarity as TensorBoard scalars
            (``<name>/to_previous``, a run per layer; off: at TensorBoard's default settings a
            front-loaded series is drawn wrong, the live curves image shows every value).
        freeze: the freeze policy's name (False: none): the freeze state is logged at every
            capture, signal recording, freeze and :func:`~svcca_torch.views.selection.freeze_state_due` step.
        freeze_window: the adaptive signal's window (its ends get the freeze state).
        final_analysis: whether an end-of-run analysis follows (:func:`final_live_images`).
        tracker: the :class:`~svcca_torch.tracker.DynamicsTracker` whose events :meth:`log` takes.
    """

    def __init__(
        self,
        sinks: Iterable[Sink],
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
        freeze: Union[bool, str] = False,
        freeze_window: Optional[int] = None,
        final_analysis: bool = True,
        tracker: Any = None,
    ) -> None:
        self.sinks: List[Sink] = list(sinks)
        bad = [type(s).__name__ for s in self.sinks if not all(hasattr(s, m) for m in ("add_scalars", "add_image",
                                                                                        "add_text"))]
        if bad:
            raise ValueError(f"`sinks` must be svcca_torch.views.Sink objects (add_scalars, add_image, add_text); "
                             f"got {bad}. Wrap a SummaryWriter in TensorBoardSink(writer).")
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"`name` must be a non-empty string without '/', got {name!r}.")
        layers = [str(n) for n in layers]
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"`layers` must be the recorded layer names, bottom-up, each once; got {layers}.")
        self.name = name
        self.layers = layers
        self.total_steps = None if total_steps is None else check_positive_int(total_steps, "total_steps")
        self.fractions = None if fractions is None else [
            check_fraction(f, "fractions[i]", low_inclusive=True, high_inclusive=True) for f in fractions]
        self.dpi = check_positive_int(dpi, "dpi")
        self.font_size = float(font_size)
        self.keep = check_keep(keep)
        self.layer_scalars = check_bool(layer_scalars, "layer_scalars")
        self.freeze = freeze
        self.freeze_window = freeze_window
        self.final_analysis = check_bool(final_analysis, "final_analysis")
        self.tracker = tracker
        #: the image budget and live schedule (plain data, resumable)
        self.schedule = ImageSchedule(self.tag("live", ""), self.tag("live", "to_previous_curves"),
                                      max_images=max_images, live_fractions=live_fractions, min_change=min_change)
        self.short_names = short_layer_names(layers)
        width = max(2, len(str(len(layers) - 1)))
        #: layer -> ``NN_short``: the last component of its scalar tags (sorts by depth).
        self.layer_tags: Dict[str, str] = {
            n: f"{i:0{width}d}_{_tag_safe(s)}" for i, (n, s) in enumerate(zip(layers, self.short_names))}
        #: layer -> the step it was frozen at (from :meth:`log_freeze`)
        self.frozen_at: Dict[str, int] = {}
        self._header = False
        self._categories: List[str] = []  # the custom-scalars categories written so far (only charts with data)
        self._freeze_entry: Optional[Dict[str, Any]] = None  # the last freeze, without a tracker
        self._bases = tracker.last_capture if tracker is not None else None  # the last capture's, for the heatmap

    @classmethod
    def for_tracker(cls, tracker: Any, sinks: Iterable[Sink], name: str = "svcca", **options: Any) -> "TrainingViews":
        """Views of ``tracker``'s run (a :class:`~svcca_torch.tracker.DynamicsTracker`): its
        layers (``tracker.setup()`` is called), training length, freeze policy and window,
        and grid fractions from ``tracker.settings``; ``options`` as the constructor's."""
        tracker.setup()
        st = tracker.settings
        kw: Dict[str, Any] = dict(total_steps=st.total_steps, fractions=st.grid_fractions, freeze=st.freeze,
                                  freeze_window=st.freeze_window if st.freeze == "adaptive" else None,
                                  final_analysis=st.final_analysis)
        kw.update(options)
        return cls(sinks, name, tracker.recorder.layers, tracker=tracker, **kw)

    # ------------------------------------------------------------------ state
    @property
    def live_fractions(self) -> List[float]:
        return self.schedule.live_fractions

    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs to keep each image tag within ``max_images``: the steps
        of the images written, the capture history (to-previous curves), the live schedule
        and the freeze steps."""
        return {**self.schedule.state_dict(), "frozen_at": dict(self.frozen_at)}

    def load_state_dict(self, state: Mapping[str, Any], resume_step: Optional[int] = None) -> None:
        """Restore :meth:`state_dict` in a resumed run.

        The capture history after ``resume_step`` is forgotten (those captures are made
        again). The live images already written stay counted, whatever their step: whether
        TensorBoard drops them when earlier steps arrive again depends on its reader (the
        Python reader keeps them), so new live images go only after the last one and a tag
        never exceeds ``max_images``. The end-of-training tags start afresh."""
        self.schedule.load_state_dict(state, resume_step)
        keep = (lambda st: True) if resume_step is None else (lambda st: st <= int(resume_step))
        self.frozen_at = {k: int(v) for k, v in state.get("frozen_at", {}).items() if keep(int(v))}

    # ------------------------------------------------------------------ tags
    def tag(self, *parts: str) -> str:
        """``<name>/part/...``."""
        return "/".join((self.name,) + parts)

    def layer_tag(self, kind: str, layer: str) -> str:
        """``<name>/<kind>/NN_short`` of one layer, e.g. ``svcca/to_previous/00_block1``."""
        if layer not in self.layer_tags:
            raise ValueError(f"`layer` {layer!r} is not one of the layers {self.layers}.")
        return self.tag(kind, self.layer_tags[layer])

    def layer_run(self, layer: str) -> str:
        """The run folder of one layer's TensorBoard scalars: ``<name>/NN_short`` (a name not
        among the layers, e.g. a freeze group: ``<name>/group_<name>``)."""
        return f"{self.name}/{self.layer_tags.get(layer) or 'group_' + _tag_safe(layer)}"

    def log_layer_scalar(self, kind: str, layer: str, value: float, step: int) -> None:
        """One layer's value of a per-layer signal (``to_previous``, ``freeze_signal``): in
        TensorBoard tag ``<name>/<kind>`` in the layer's run (:meth:`layer_run`; without
        per-layer runs the tag ``<name>/<kind>/NN_short``); other sinks ``<name>/<kind>/<layer>``."""
        if not math.isfinite(float(value)):
            return
        self._scalars({}, int(step), every={self.tag(kind, layer): float(value)})
        self._tensorboard_layer_scalar(kind, layer, float(value), int(step))

    def layout(self, layer_runs: bool = True) -> Dict[str, Dict[str, List[Any]]]:
        """Custom-scalars layout: the freeze count and fraction in separate charts and, with
        ``layer_scalars``, one chart with a line per layer (each layer's run, coloured apart;
        without per-layer runs every ``NN_short`` tag). Each category is written once its
        first value is (an empty chart is never shown)."""
        out: Dict[str, Dict[str, List[Any]]] = {}
        if self.layer_scalars:
            kind = self.tag("to_previous")
            where = f"one line per layer: runs {self.name}/NN_short, bottom-up" if layer_runs else "one line per layer"
            out[f"{self.name}: per layer ({where})"] = {"similarity to previous capture": [
                "Multiline", [f"^{kind}$" if layer_runs else f"^{kind}/"]]}
        out[f"{self.name}: freeze training"] = {
            "frozen layer groups (count)": ["Multiline", [f"^{self.tag('freeze', 'frozen_groups')}$"]],
            "backward FLOPs saved (fraction of one backward pass)": [
                "Multiline", [f"^{self.tag('freeze', 'backward_flops_saved')}$"]],
        }
        return out

    def flush(self) -> None:
        """Write what every sink buffered."""
        for s in self.sinks:
            s.flush()

    def close(self) -> None:
        """Flush and close every sink (a writer passed to a sink stays open)."""
        for s in self.sinks:
            s.close()

    # ------------------------------------------------------------------ writing
    def _scalars(self, scalars: Mapping[str, float], step: int, *, every: Mapping[str, float] = {}) -> None:
        """``scalars`` to every sink, ``every`` only to the sinks that take every series."""
        for s in self.sinks:
            out = {**scalars, **every} if s.all_scalars else dict(scalars)
            if out:
                s.add_scalars(out, int(step))

    def _text(self, tag: str, text: str, step: int) -> None:
        for s in self.sinks:
            s.add_text(tag, text, int(step))

    def _use_category(self, prefix: str) -> None:
        """Write the custom-scalars layout with the category starting ``<name>: <prefix>``
        added (to the sinks that have one: TensorBoard's ``set_layout``)."""
        if prefix in self._categories:
            return
        self._categories.append(prefix)
        for s in self.sinks:
            if hasattr(s, "set_layout"):
                layout = self.layout(getattr(s, "layer_runs", False))
                s.set_layout(self, {t: v for t, v in layout.items()  # type: ignore[attr-defined]
                                    if any(t.startswith(f"{self.name}: {p}") for p in self._categories)})

    def _write_header(self, step: int) -> None:
        if self._header:
            return
        self._header = True
        for s in self.sinks:
            if self.layer_scalars and getattr(s, "layer_runs", False):
                rows = "\n".join(f"| `{sh}` | `{self.layer_run(n)}` | `{n}` |" for n, sh in zip(self.layers,
                                                                                                self.short_names))
                table = f"| name in the images | run (scalars) | layer |\n|---|---|---|\n{rows}"
            else:
                rows = "\n".join(f"| `{sh}` | `{n}` |" for n, sh in zip(self.layers, self.short_names))
                table = f"| name in the images | layer |\n|---|---|\n{rows}"
            s.add_text(self.tag("layers"), table, step)

    # ------------------------------------------------------------------ plain data
    def _tensorboard_layer_scalar(self, kind: str, layer: str, value: float, step: int) -> None:
        """A per-layer value in TensorBoard: the layer's run, or a tag per layer without runs."""
        for s in self.sinks:
            if getattr(s, "layer_runs", False):
                s.add_run_scalar(self.layer_run(layer), self.tag(kind), value, step)  # type: ignore[attr-defined]
            elif hasattr(s, "set_layout") and not s.all_scalars:
                tag = self.layer_tag(kind, layer) if layer in self.layer_tags else self.tag(kind, _tag_safe(layer))
                s.add_scalars({tag: value}, step)

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
            backward_flops_saved: fraction of one backward pass's FLOPs no longer spent.
            frozen_parameters: how many parameters are frozen (events text; a scalar for the
                sinks that take every series).
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
        scalars = {self.tag("freeze", "frozen_groups"): float(frozen_groups)}
        if backward_flops_saved is not None:
            scalars[self.tag("freeze", "backward_flops_saved")] = float(backward_flops_saved)
        every = {} if frozen_parameters is None else {self.tag("freeze", "frozen_parameters"): float(frozen_parameters)}
        self._scalars(scalars, step, every=every)
        layers = [n for n in newly_frozen if n in self.layer_tags] if frozen_layers is None else list(frozen_layers)
        for n in layers:
            if n in self.layer_tags:
                self.frozen_at.setdefault(n, step)
        if newly_frozen:
            of = f" of {n_groups}" if n_groups is not None else ""
            saved = "" if backward_flops_saved is None else f", {100 * backward_flops_saved:.0f}% of backward FLOPs saved"
            params = "" if frozen_parameters is None else f", {int(frozen_parameters):,} parameters"
            why = f"; {note}" if note else ""
            self._text(self.tag("freeze", "events"), f"step {step}: froze {', '.join(newly_frozen)} ({frozen_groups}"
                       f"{of} groups frozen{params}{saved}{why})", step)

    def log_signal(self, step: int, similarity: Mapping[str, float], *, tensorboard: bool = True) -> None:
        """The adaptive freeze signal at ``step``: ``{group: similarity to one window
        earlier}`` (a group named after a recorded layer is drawn as that layer); in
        TensorBoard (unless ``tensorboard=False``) one run per group, short lines."""
        step = int(step)
        self._write_header(step)
        for g, v in similarity.items():
            if not math.isfinite(float(v)):
                continue
            self._scalars({}, step, every={self.tag("freeze_signal", str(g)): float(v)})
            if tensorboard:
                self._tensorboard_layer_scalar("freeze_signal", str(g), float(v), step)

    def log_freeze_note(self, step: int, text: str) -> None:
        """A line of the freeze-events text at ``step`` (e.g. what the frozen-output cache skipped)."""
        step = int(step)
        self._write_header(step)
        self._text(self.tag("freeze", "events"), f"step {step}: {text}", step)

    # ------------------------------------------------------------------ with a tracker
    def _accounted(self) -> "contextlib.AbstractContextManager[None]":
        """The tracker's ``accounted()`` (logging counts in its ``max_overhead``), or nothing."""
        return self.tracker.accounted() if self.tracker is not None else contextlib.nullcontext()

    def _bound(self, what: str) -> Any:
        if self.tracker is None:
            raise ValueError(f"TrainingViews.{what} needs the tracker: build the views with "
                             "TrainingViews.for_tracker(tracker, sinks) (or pass tracker=).")
        return self.tracker

    def log(self, events: Any, *, final: bool = False) -> None:
        """Log one :class:`~svcca_torch.tracker.TrackerEvents` (from ``tracker.start`` or
        ``tracker.maybe_capture``; call it with every one, in step order): the signal (to the
        sinks that take every series), a freeze (the events text names the groups, their
        parameters and ``entry["reason"]``), a capture (scalars, the live images when due),
        and with freeze training the freeze state as a step function.

        ``final``: the capture is the end of training (:meth:`log_final` does this)."""
        tracker = self._bound("log")
        with self._accounted():
            step = int(events.step)
            if events.signal is not None:
                self.log_signal(events.signal["step"], events.signal["similarity"], tensorboard=False)
            # a freeze of this step first: the capture recorded the network frozen (its images name it)
            if events.freeze is not None:
                entry = events.freeze
                self._freeze_entry = dict(entry)
                self._log_freeze_state(entry["step"], entry["groups"], note=entry.get("reason", "") or "")
            if events.capture is not None:
                capture = events.capture
                images = not final or final_live_images(len(tracker.to_previous), self.final_analysis)
                self.log_capture(capture["step"], capture["to_previous"], previous=self._bases,
                                 current=tracker.last_capture, final=final, images=images)
            if events.freeze is None and self.freeze and (
                    events.capture is not None or events.signal is not None or freeze_state_due(
                        step, total_steps=self.total_steps, freeze_window=self.freeze_window)):
                self._log_freeze_state(step)
            self._bases = tracker.last_capture

    def _log_freeze_state(self, step: int, newly: Sequence[str] = (), note: str = "") -> None:
        tracker = self.tracker
        last = (tracker.freeze_log[-1] if tracker is not None and tracker.freeze_log else self._freeze_entry)
        layers = [n for g in newly for n in tracker.group_layers.get(g, [])] if tracker is not None else None
        self.log_freeze(step, last["frozen_groups"] if last else 0,
                        backward_flops_saved=(last["backward_flops_saved"] if last else 0.0),
                        frozen_parameters=last["frozen_parameters"] if last else 0, newly_frozen=list(newly),
                        n_groups=len(tracker.groups) if tracker is not None else None, frozen_layers=layers, note=note)

    def log_final(self, analysis: Any = None, *, freeze_steps: Optional[Mapping[str, int]] = None
                  ) -> Dict[str, List[int]]:
        """The end of the run: with a tracker, the end-of-training capture (its final live
        images) and the frozen-output cache's note; then, given ``analysis`` (the
        :class:`~svcca_torch.tracker.FinalAnalysis` of ``tracker.finish``, or a
        :class:`~svcca_torch.dynamics.LearningDynamics`), the end views (:meth:`log_dynamics`).
        Returns ``{image tag: steps written}`` of the end views."""
        if self.tracker is not None:
            with self._accounted():
                self._log_end_capture()
                stats = self.tracker.frozen_cache_stats
                if stats is not None and self.tracker.captured_steps:
                    self.log_freeze_note(self.tracker.captured_steps[-1], encoding.cache_note(stats))
        dyn = getattr(analysis, "dynamics", analysis)
        if dyn is None:
            self.flush()
            return {}
        with self._accounted():
            return self.log_dynamics(dyn, freeze_steps=freeze_steps)

    def _log_end_capture(self) -> None:
        tracker = self.tracker
        if not tracker.captured_steps:
            return
        step = int(tracker.captured_steps[-1])
        last = tracker.to_previous[-1] if tracker.to_previous else None
        sims = {k: v for k, v in last.items() if k != "step"} if last and last["step"] == step else {}
        history = self.schedule.history
        if not history or history[-1]["step"] != step:  # the end-of-training capture
            from ..tracker import TrackerEvents

            self.log(TrackerEvents(step, capture={"step": step, "to_previous": sims}), final=True)
        elif sims and final_live_images(len(tracker.to_previous), self.final_analysis) and tracker.store is not None:
            # the last capture was logged already: only its final live images are new
            done = [c for c in tracker.store.checkpoints if c.step < step]
            earlier = tracker.store.load_checkpoint(done[-1]) if done else None
            self.log_capture(step, sims, previous=earlier, current=tracker.last_capture, final=True)
