"""The adaptive freeze policy's signal: each still-trained group's SVCCA similarity to itself one
window of training steps earlier, calibrated to chance, recorded within its share of the time
budget.

Every ``freeze_window`` optimizer steps (a grid fixed in training steps, independent of the
capture schedule) the signal records only the layers of the lowest two still-trained groups
(the forward stops after the highest of them), each on enough probe inputs for
``signal_datapoints_per_neuron`` datapoints per neuron at its own pooling grid, and compares
them with the same recording one window earlier. Each layer is judged against its **chance
level** (:mod:`svcca_torch.freeze.chance`), on ``(s - chance) / (1 - chance)``.

The signal's **cost is inside the time budget**: its recordings (and the chance calibration)
may spend :data:`SIGNAL_SHARE` of ``max_overhead`` of the training time so far (counted as at
least :data:`~svcca_torch.schedule.SHORT_RUN_SECONDS`). A recording that does not fit is
thinned (the look-ahead groups dropped, then all but the lowest group), else the window is
skipped (no observation: streaks neither grow nor reset); :meth:`FreezeSignal.summary` says
what and why.

Activations are ``(datapoints, neurons)``, ``(N, C, H, W)`` for conv layers (pooled per
layer) and ``(N, L, D)`` for tokens.
"""
from __future__ import annotations

import json
import time
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..capture import CaptureError, swamped
from ..dynamics import paired_similarity
from ..functional.svcca import ReducedBasis
from ..schedule import SHORT_RUN_SECONDS
from .chance import CHANCE_LIMIT, calibrate, calibrated_similarity
from .policy import PolicyRun

if TYPE_CHECKING:  # pragma: no cover
    from .adaptive import AdaptiveFreezePolicy

__all__ = ["FreezeSignal", "SIGNAL_KEEP", "SIGNAL_SHARE"]

#: SVD truncation of the signal's recordings (fraction of variance kept, as in the paper)
SIGNAL_KEEP = 0.99
#: The freeze signal's share of ``max_overhead``: its recordings (with the chance calibration)
#: may spend at most this fraction of the budget (of the training time so far, counted as at
#: least SHORT_RUN_SECONDS); captures take what the whole budget leaves.
SIGNAL_SHARE = 0.5


def _empty_stats() -> Dict[str, Any]:
    return {"windows": 0, "recordings": 0, "seconds": 0.0, "calibration_seconds": 0.0, "skipped": 0,
            "skipped_steps": [], "reduced": 0, "reduced_steps": [], "reason": None}


def _append_capped(steps: List[int], step: int, cap: int = 50) -> None:
    if len(steps) < cap:
        steps.append(step)


class FreezeSignal:
    """The adaptive policy's observations (see the module docstring).

    Attributes:
        log: ``[{"step", group: calibrated similarity}]`` at each compared window.
        raw_log: the same, uncalibrated.
        stats: recordings, seconds, windows skipped or thinned (:meth:`summary`).
        chance: each judgeable layer's chance level (None: not measured yet).
        chance_info: how the chance levels were measured (``{"step", "seconds", "error",
            "limit", "layers": {layer: {"chance", "judged", "reason"}}}``).
        ref: the last recording, ``{"step", "bases": {layer: ReducedBasis}}`` (runtime only):
            a documented window on what the next window is compared with.
    """

    def __init__(self, policy: "AdaptiveFreezePolicy", run: PolicyRun) -> None:
        self.policy, self.run = policy, run
        self.log: List[Dict[str, Any]] = []
        self.raw_log: List[Dict[str, Any]] = []
        self.stats: Dict[str, Any] = _empty_stats()
        self.chance: Optional[Dict[str, Optional[float]]] = None
        self.chance_info: Dict[str, Any] = {}
        self.ref: Optional[Dict[str, Any]] = None
        self._costs: Dict[Tuple[str, ...], float] = {}  # measured cost per recorded layer set
        self._mark: Optional[float] = None  # training seconds at the last signal grid point
        self._n_probe: Optional[int] = None
        self._warned: set = set()

    @property
    def settings(self) -> Any:
        return self.run.settings

    #: the SVD truncation of every recording (:data:`SIGNAL_KEEP`)
    KEEP = SIGNAL_KEEP

    def plan(self, groups: Sequence[str]) -> Tuple[List[str], Dict[str, int], int]:
        """Layers to record for ``groups``, the probe inputs each layer keeps and the inputs
        to run.

        Each layer gets ``signal_datapoints_per_neuron x neurons`` datapoints at its own
        pooling grid (whole inputs: ``ceil(ratio x neurons / cells)`` inputs of ``cells``
        rows each, at most the probe); the recording runs the largest of those input counts
        and each layer keeps the rows of its own first inputs. Neurons and cells come from a
        tiny recording of two probe inputs (once per layer, :meth:`Capturer.layer_shapes`)."""
        layers = [n for g in groups for n in self.run.group_layers[g]]
        shapes = self.run.capture.layer_shapes(layers)
        total = self._probe_size()
        ratio = self.settings.signal_datapoints_per_neuron
        images = {n: min(total, -(-ratio * shapes[n][0] // shapes[n][1])) for n in layers}
        return layers, images, max(images.values())

    def _probe_size(self) -> int:
        if self._n_probe is None:
            self._n_probe = self.run.capture.probe.size()
        return self._n_probe

    def observe(self, step: int) -> Optional[Dict[str, Any]]:
        """Record the lowest two still-judged groups and compare them with the recording one
        window earlier; feed the policy (on the writer, then broadcast).

        When the lowest of them may freeze at the next window (its streak is one short of
        ``patience``), the two groups above are recorded too (a look-ahead): they then have
        a recording one window earlier the moment they become the lowest, instead of
        spending a window on a first recording, and their streaks count from now.

        Each group is judged on the calibrated similarity of its layers (:meth:`calibrate`,
        :func:`svcca_torch.freeze.calibrated_similarity`; the lowest over its layers); a group
        none of whose layers can be judged (chance level above
        :data:`~svcca_torch.freeze.CHANCE_LIMIT`) is not recorded and takes the value of the
        next judged group above it. The recording is taken, thinned or skipped within the
        signal's share of the time budget (:meth:`_groups_within_budget`); a skipped window is no
        observation (streaks neither grow nor reset)."""
        with self.run.clock.timed():
            t0 = time.perf_counter()
            try:
                return self._step(step)
            finally:
                self.stats["seconds"] += time.perf_counter() - t0

    def _step(self, step: int) -> Optional[Dict[str, Any]]:
        policy = self.policy
        frozen = set(policy.frozen)
        room = policy.max_frozen - len(frozen)
        trained = [g for g in policy.groups if g not in frozen][:room]
        judged = [g for g in trained if self.judgeable(g)]
        want = judged[:2]
        if want and policy.streak[trained[0]] >= policy.patience - 1:
            want = judged[:4]
        state = None
        out: Optional[Dict[str, Any]] = None
        if want and self.run.is_writer:
            ref = self.ref
            paired = ref is not None and step - ref["step"] == self.settings.freeze_window
            # the chance calibration recorded this step already (the start): nothing to compare yet
            groups = [] if ref is not None and ref["step"] == step else self._groups_within_budget(
                step, want, ref if paired else None)
            if groups:
                layers, images, n_images = self.plan(groups)
                t1 = time.perf_counter()
                acts, index = self.run.record(layers, n_images)  # index: row -> probe image, per layer
                bases = self._bases(acts, index, layers, images, step) if acts is not None else {}
                self._costs[tuple(layers)] = time.perf_counter() - t1
                self.stats["recordings"] += 1
                sims: Dict[str, float] = {}
                raw: Dict[str, float] = {}
                carried: Dict[str, str] = {}
                if paired:
                    assert ref is not None
                    for g in groups:
                        names = [n for n in self.run.group_layers[g] if self.judged_layer(n)]
                        if names and all(n in ref["bases"] and n in bases
                                         and ref["bases"][n].n_datapoints == bases[n].n_datapoints for n in names) \
                                and all(self._trusted(bases[n], n) for n in names):
                            vals = paired_similarity({n: ref["bases"][n] for n in names}, {n: bases[n] for n in names})
                            raw[g] = min(vals.values())  # a group is settled when all its layers are
                            sims[g] = min(calibrated_similarity(vals[n], self.chance_of(n)) for n in names)
                    # a group that cannot be judged on its own signal goes with the next judged one above it
                    for i, g in enumerate(trained):
                        if g not in judged:
                            proxy = next((h for h in trained[i + 1:] if h in judged), None)
                            if proxy is not None and proxy in sims:
                                sims[g], carried[g] = sims[proxy], proxy
                self.ref = {"step": step, "bases": bases}
                if paired:
                    policy.update(step, sims)
                    out = {"step": step, "window": self.settings.freeze_window, "similarity": sims, "raw": raw,
                           "carried": carried}
                    self.log.append({"step": step, **sims})
                    self.raw_log.append({"step": step, **raw})
            state = policy.decision_state()
        state = self.run.broadcast(state)
        if state is not None:
            policy.load_decision_state(state)
        return out

    def _bases(self, acts: Dict[str, torch.Tensor], index: Mapping[str, torch.Tensor], layers: Sequence[str],
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
                bases[n] = self.run.capture.reduce(n, t, step, SIGNAL_KEEP, "variance", kind="freeze signal")
            except CaptureError as err:
                if err.constant and self.run.capture.constant.pending(n, "signal_from"):
                    continue  # constant since the start (a zero-initialised head): its signal starts when it varies
                earlier = (self.ref or {}).get("bases", {}).get(n)
                if earlier is None:
                    earlier = (self.run.capture.last or {}).get(n)
                why = swamped(t, earlier) if err.constant else None
                if why is None:
                    raise
                self.run.capture.constant.note_swamped(step, {n: why}, "freeze signal")  # not dead: left out until it varies
                continue
            if self.run.capture.constant.pending(n, "signal_from"):
                self.run.capture.constant.layers[n]["signal_from"] = int(step)
        return bases

    # ------------------------------------------------------------------ its budget
    def allowance(self, train: float) -> float:
        """Seconds the freeze signal may have spent by a training time of ``train`` seconds:
        :data:`SIGNAL_SHARE` of ``max_overhead`` of it, counting at least
        :data:`SHORT_RUN_SECONDS` (as the capture schedule's floor: a short run may spend what
        a 5-minute run's signal may)."""
        assert self.settings.max_overhead is not None
        return SIGNAL_SHARE * self.settings.max_overhead * max(train, SHORT_RUN_SECONDS)

    def estimate(self, layers: Sequence[str]) -> float:
        """The expected cost of a signal recording of ``layers`` (recording and reduction):
        as last measured for the same layers, else the cheapest measured recording of more
        layers (the chance calibration records every judgeable layer), else the largest
        measured, else the last capture's cost (every layer on the whole probe)."""
        key = tuple(layers)
        if key in self._costs:
            return self._costs[key]
        wanted = set(layers)
        covering = [c for k, c in self._costs.items() if wanted <= set(k)]
        if covering:
            return min(covering)
        if self._costs:
            return max(self._costs.values())
        return self.run.capture.capture_cost or 0.0

    def _groups_within_budget(self, step: int, want: Sequence[str], ref: Optional[Dict[str, Any]]) -> List[str]:
        """The groups the signal records at ``step``: ``want`` when that fits the signal's
        share of the budget, else fewer (the look-ahead dropped, then the lowest group
        alone), else none (the window is skipped). A recording that completes a pair (the
        lowest group was recorded one window earlier, ``ref``) must fit by itself; one that
        starts a pair must fit twice, by the next window's training time."""
        stats = self.stats
        stats["windows"] += 1
        if self.settings.max_overhead is None:
            return list(want)
        train = self.run.clock.split()[1]
        window = max(0.0, train - self._mark) if self._mark is not None else 0.0
        self._mark = train
        spent = stats["seconds"]
        est = 0.0
        for k in sorted({len(want), min(2, len(want)), 1}, reverse=True):
            groups = list(want[:k])
            est = self.estimate([n for g in groups for n in self.run.group_layers[g]])
            completes = ref is not None and all(n in ref["bases"] for n in self.run.group_layers[groups[0]]
                                                if self.judged_layer(n))
            need, horizon = (est, train) if completes else (2 * est, train + window)
            if spent + need <= self.allowance(horizon):
                if k < len(want):
                    stats["reduced"] += 1
                    _append_capped(stats["reduced_steps"], int(step))
                return groups
        stats["skipped"] += 1
        _append_capped(stats["skipped_steps"], int(step))
        stats["reason"] = (
            f"a signal recording (~{est:.2g} s) did not fit in the signal's share of the budget ({SIGNAL_SHARE:g} x "
            f"max_overhead={self.settings.max_overhead:g} of the training time so far, {train:.3g} s, counted as at least "
            f"{SHORT_RUN_SECONDS:.0f} s), with {spent:.2g} s spent on the signal")
        return []

    def summary(self) -> Dict[str, Any]:
        """What the freeze signal cost and what its budget skipped (``svcca_summary.json``:
        ``"freeze"`` / ``"signal_budget"``): ``windows`` (grid points with groups to judge),
        ``recordings``, ``seconds`` (the signal's own time: recordings, reductions, the chance
        calibration, ``calibration_seconds`` of it), ``skipped`` / ``skipped_steps`` (windows
        not recorded: the recording did not fit; first 50 steps), ``reduced`` /
        ``reduced_steps`` (windows recorded with fewer groups), ``reason`` (the last skip's),
        ``allowance`` (seconds the signal may have spent by now), ``share`` and ``message``."""
        stats = {k: (list(v) if isinstance(v, list) else v) for k, v in self.stats.items()}
        train = self.run.clock.split()[1]
        stats.update(share=SIGNAL_SHARE, training_seconds=round(train, 4),
                     allowance=None if self.settings.max_overhead is None else round(self.allowance(train), 4),
                     message=self.report())
        return stats

    def report(self) -> str:
        """One sentence: the freeze signal's recordings, their cost against the training time,
        and what the budget skipped or thinned (empty without the adaptive policy)."""
        s = self.stats
        train = self.run.clock.split()[1]
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
    def judged_layer(self, name: str) -> bool:
        """Whether ``name`` is judged on its own signal: its chance level is at most
        :data:`~svcca_torch.freeze.CHANCE_LIMIT` (or was not measured)."""
        c = self.chance_of(name)
        return c is None or c <= CHANCE_LIMIT

    def chance_of(self, name: str) -> Optional[float]:
        return None if not self.chance else self.chance.get(name)

    def judgeable(self, group: str) -> bool:
        return any(self.judged_layer(n) for n in self.run.group_layers[group])

    def calibrate(self, step: int) -> None:
        """Measure each judgeable layer's chance level, once (at the start, on the writer):
        :func:`svcca_torch.freeze.chance.calibrate`."""
        calibrate(self, step)

    def _trusted(self, basis: ReducedBasis, name: str) -> bool:
        ok = basis.n_datapoints >= self.settings.signal_datapoints_per_neuron * basis.k
        if not ok and name not in self._warned:
            self._warned.add(name)
            warnings.warn(
                f"{self.run.owner}: the freeze signal of layer {name!r} has {basis.n_datapoints} datapoints for "
                f"{basis.k} kept directions (< {self.settings.signal_datapoints_per_neuron} per direction), so its similarity is not "
                "trusted and its group is not frozen; use a larger probe or a larger `grid`.", UserWarning,
                stacklevel=3)
        return ok

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"log": [dict(e) for e in self.log], "raw": [dict(e) for e in self.raw_log],
                "stats": {k: (list(v) if isinstance(v, list) else v) for k, v in self.stats.items()},
                "chance": None if self.chance is None else dict(self.chance),
                "chance_info": json.loads(json.dumps(self.chance_info))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.log = [dict(e) for e in state.get("log", [])]
        self.raw_log = [dict(e) for e in state.get("raw", [])]
        self.stats = {**_empty_stats(), **{k: (list(v) if isinstance(v, list) else v)
                                           for k, v in state.get("stats", {}).items()}}
        self.chance = None if state.get("chance") is None else dict(state["chance"])
        self.chance_info = dict(state.get("chance_info") or {})

    def keep_until(self, step: int) -> None:
        self.log = [e for e in self.log if e["step"] <= step]
        self.raw_log = [e for e in self.raw_log if e["step"] <= step]
        self._mark = None
        self.ref = None
