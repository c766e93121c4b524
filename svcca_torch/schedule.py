"""When a tracked run captures, within its time budget: the tracker's own time (:class:`Clock`)
and the capture schedule (:class:`CaptureSchedule`).

Captures are taken at step 0, at the end, and in between: at every point of an explicit
schedule (``every_n_steps``, an epoch end, the caller's ``request``), all of them; with none,
the tracker's own schedule within ``max_overhead`` of the training time (holding back the
final capture and analysis): front-loaded points at :data:`LADDER` (1% to 90% of training,
log-spaced, where representations change most), each taken when the run's projected budget
affords it, and in between captures spaced by the budget of the training time so far. Every
capture the budget skips is counted and explained (:meth:`CaptureSchedule.report`,
``svcca_summary.json``'s ``"schedule"``).
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Tuple

from .settings import TrackerSettings

__all__ = ["Clock", "CaptureSchedule", "LADDER", "SHORT_RUN_SECONDS", "FIGURE_SECONDS"]

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
FLOOR = (LADDER[0], LADDER[3], LADDER[6])


class Clock:
    """The tracker's own time against the training time, in seconds.

    Sections inside :meth:`timed` are the tracker's own time (nested sections count once);
    everything else since the first section is training. ``pause`` (optional) is entered in
    every section: the frozen-output cache must not serve the tracker's own forwards.
    """

    def __init__(self, pause: Optional[Callable[[], ContextManager[Any]]] = None) -> None:
        self._pause = pause or contextlib.nullcontext
        self.origin: Optional[float] = None
        self.own = 0.0
        self._outer = 0.0
        self._depth = 0

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        t0 = time.perf_counter()
        if self.origin is None:
            self.origin = t0
        if self._depth == 0:
            self._outer = t0
        self._depth += 1
        try:
            with self._pause():
                yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.own += time.perf_counter() - t0

    def split(self) -> Tuple[float, float]:
        """(own time so far, training time so far), the open section included."""
        now = time.perf_counter()
        spent = self.own + (now - self._outer if self._depth else 0.0)
        train = now - (self.origin if self.origin is not None else now) - spent
        return spent, train

    @property
    def overhead(self) -> Optional[float]:
        """Own time / training time so far (None before training)."""
        if self.origin is None:
            return None
        spent, train = self.split()
        return spent / train if train > 0 else None


def _empty_log() -> Dict[str, List[Any]]:
    """Steps captured by kind: ``front_loaded`` (:data:`LADDER` points, ``over_budget`` ones
    included), ``over_budget`` (the short-run floor), ``budget`` (spaced by the budget of the
    training time so far), ``requested`` (an explicit schedule); ``skipped``: ``{"step",
    "fraction", "reason"}`` of the front-loaded points the budget did not afford."""
    return {"front_loaded": [], "over_budget": [], "budget": [], "requested": [], "skipped": []}


class CaptureSchedule:
    """Which steps are captured (see the module docstring), decided on the writer and broadcast.

    ``captures()`` gives the number of captures so far; :attr:`capture_cost` and
    :attr:`analysis_cost` are measured by the tracker (seconds of the last capture, and of
    the end-of-run analysis per capture)."""

    def __init__(self, settings: TrackerSettings, clock: Clock, captures: Callable[[], List[int]], *,
                 is_writer: bool = True, broadcast: Callable[[Any], Any] = lambda obj: obj) -> None:
        self.settings, self.clock, self._captures = settings, clock, captures
        self.is_writer, self._broadcast = is_writer, broadcast
        self.capture_cost: Optional[float] = None
        self.analysis_cost = 0.0
        self.ladder: List[float] = list(LADDER)
        #: steps captured by kind, and the front-loaded points skipped (see :func:`_empty_log`)
        self.log: Dict[str, List[Any]] = _empty_log()

    # ------------------------------------------------------------------ decisions
    def restart(self, done: float) -> None:
        """Start (or resume) at fraction ``done`` of training: the front-loaded points ahead."""
        self.ladder = [f for f in LADDER if f > done]

    def requested(self, step: int) -> None:
        self.log["requested"].append(int(step))

    def decide(self, step: int, fraction: Optional[float]) -> Optional[str]:
        """The tracker's own schedule at ``step``: ``"front_loaded"``, ``"floor"`` (taken over
        budget on a short run), ``"budget"`` or None (no capture), the same on every rank."""
        passed: List[float] = []
        if fraction is not None:
            passed = [f for f in self.ladder if f <= fraction]
            self.ladder = [f for f in self.ladder if f > fraction]
            if fraction >= 1.0:
                passed = []  # the end of training: the final capture is taken anyway
        budget = self.settings.max_overhead
        if not passed and budget is None:
            return None  # nothing due, on every rank alike
        decision: Optional[Tuple[Optional[str], Optional[str]]] = None
        if self.is_writer:
            if passed:
                decision = self._ladder_decision(fraction, any(f in FLOOR for f in passed))  # type: ignore[arg-type]
                if decision[0] is None:
                    self.log["skipped"].append({"step": int(step), "fraction": round(float(fraction), 6),  # type: ignore[arg-type]
                                                "reason": decision[1]})
            elif budget is not None and self.affordable():
                decision = ("budget", None)
        return self._broadcast(None if decision is None else decision[0])

    def taken(self, step: int, kind: str) -> None:
        """Log a capture the schedule decided (:meth:`decide`'s kind)."""
        self.log["over_budget" if kind == "floor" else kind].append(int(step))
        if kind == "floor":
            self.log["front_loaded"].append(int(step))

    def budget(self) -> Tuple[float, float, float]:
        """(own time so far, training time so far, the reserve: the final capture, the
        end-of-run analysis and its figures), in seconds."""
        spent, train = self.clock.split()
        cost = self.capture_cost or 0.0
        reserve = (2 * cost + (len(self._captures()) + 2) * self.analysis_cost
                   + (self.settings.final_heatmaps + 3) * FIGURE_SECONDS)
        return spent, train, reserve

    def _ladder_decision(self, fraction: float, floor: bool) -> Tuple[Optional[str], Optional[str]]:
        budget = self.settings.max_overhead
        if budget is None or self.clock.origin is None or self.capture_cost is None:
            return "front_loaded", None
        spent, train, reserve = self.budget()
        projected = train / fraction if fraction > 0 else math.inf
        if spent + self.capture_cost + reserve <= budget * projected:
            return "front_loaded", None
        if floor and projected < SHORT_RUN_SECONDS:
            return "floor", None
        return None, (f"a capture ({self.capture_cost:.2g} s) did not fit in max_overhead={budget:g} of the "
                      f"training time projected for the run ({projected:.3g} s), with {spent:.2g} s spent and "
                      f"{reserve:.2g} s held for the final capture and analysis")

    def affordable(self) -> bool:
        """Whether one more capture keeps the own time within ``max_overhead`` of the training
        time so far, with the final capture and analysis held in reserve."""
        budget = self.settings.max_overhead
        if budget is None or self.clock.origin is None or self.capture_cost is None:
            return True
        spent, train, reserve = self.budget()
        return spent + self.capture_cost + reserve <= budget * train

    # ------------------------------------------------------------------ what it did
    @property
    def explicit(self) -> bool:
        st = self.settings
        return bool(st.every_n_steps is not None or self.log["requested"] or st.explicit_schedule)

    def summary(self) -> Dict[str, Any]:
        """``svcca_summary.json``'s ``"schedule"``: the captures by kind (``front_loaded``,
        ``budget``, ``requested``, ``over_budget``), the front-loaded points the budget
        ``skipped`` and why, own and training seconds, and ``message`` (:meth:`report`)."""
        log, st = self.log, self.settings
        spent, train, _ = self.budget()
        return {"mode": "explicit" if self.explicit else "default",
                "every_n_steps": st.every_n_steps, "max_overhead": st.max_overhead,
                "captures": len(self._captures()), "front_loaded": list(log["front_loaded"]),
                "budget": list(log["budget"]), "requested": list(log["requested"]),
                "over_budget": list(log["over_budget"]), "skipped": [dict(e) for e in log["skipped"]],
                "own_seconds": round(spent, 4), "training_seconds": round(train, 4),
                "overhead": None if train <= 0 else round(spent / train, 5), "message": self.report()}

    def report(self) -> str:
        """One paragraph: how many captures of which kind, what the budget skipped and why,
        and what the captures cost (own time against training time so far)."""
        log, st, steps = self.log, self.settings, self._captures()
        n, total, budget = len(steps), st.total_steps, st.max_overhead
        spent, train, _ = self.budget()
        frac = (lambda x: "" if not total else f" ({100 * x / total:.2g}%)")
        scheduled = {int(x) for k in ("front_loaded", "budget", "requested") for x in log[k]}
        ends = ["step 0"] + (["the end"] if n > 1 and steps[-1] not in scheduled else [])
        parts: List[str] = []
        if self.explicit:
            every = "every step" if st.every_n_steps == 1 else f"every {st.every_n_steps} steps"
            how = f"{len(log['requested'])} " + (every if st.every_n_steps is not None
                                                 else st.explicit_schedule or "as requested")
            parts.append(f"{n} captures ({', '.join(ends[:1] + [how] + ends[1:])}), every one taken (an explicit "
                         "schedule is not thinned by max_overhead)")
        else:
            front, spaced = log["front_loaded"], log["budget"]
            what = [f"{len(front)} front-loaded" + (f" at steps {front[0]}{frac(front[0])} to {front[-1]}"
                                                     f"{frac(front[-1])}" if front else "")]
            if budget is not None:
                what.append(f"{len(spaced)} spaced by the time budget (max_overhead={budget:g} of the training "
                            "time so far)")
            parts.append(f"{n} captures ({', '.join(ends[:1] + what + ends[1:])})")
            skipped = log["skipped"]
            if skipped:
                at = ", ".join(str(e["step"]) for e in skipped[:6]) + (", ..." if len(skipped) > 6 else "")
                parts.append(f"the budget skipped {len(skipped)} front-loaded point{'s' if len(skipped) > 1 else ''} "
                             f"(steps {at}): {skipped[-1]['reason']}")
            if log["over_budget"]:
                parts.append(f"{len(log['over_budget'])} early captures (steps "
                             + ", ".join(map(str, log["over_budget"])) + ") were taken over the budget: a run "
                             f"projected under {SHORT_RUN_SECONDS:.0f} s cannot afford them at "
                             f"max_overhead={budget:g}")
            if not total and budget is not None and not front:
                parts.append("no front-loaded captures: the training length is unknown (pass total_steps)")
        if train > 0:
            parts.append(f"own time {spent:.3g} s, {100 * spent / train:.1f}% of {train:.3g} s of training"
                         + (f" (max_overhead={budget:g} is met on runs of {SHORT_RUN_SECONDS / 60:.0f} minutes or "
                            "more)" if not self.explicit and budget is not None and spent > budget * train else ""))
        return "; ".join(parts) + "."

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, List[Any]]:
        return {k: [dict(e) if isinstance(e, dict) else e for e in v] for k, v in self.log.items()}

    def load_state_dict(self, state: Dict[str, List[Any]]) -> None:
        self.log = _empty_log()
        for k, v in state.items():
            if k in self.log:
                self.log[k] = [dict(e) if isinstance(e, dict) else e for e in v]

    def keep_until(self, step: int) -> None:
        """Forget what a run that was not kept (after ``step``, on resume) logged."""
        self.log = {k: [e for e in v if (e["step"] if isinstance(e, dict) else e) <= step] for k, v in self.log.items()}
