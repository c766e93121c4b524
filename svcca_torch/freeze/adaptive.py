"""The adaptive freeze policy: freeze the lowest still-trained group once its calibrated SVCCA
similarity to itself one window earlier has stayed above a threshold."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..settings import DEFAULT_THRESHOLD
from ..utils.validation import check_fraction, check_positive_int
from .policy import FreezePolicy, PolicyRun, register_policy
from .signal import FreezeSignal

__all__ = ["AdaptiveFreezePolicy"]


class AdaptiveFreezePolicy(FreezePolicy):
    """Freeze the lowest trained group once its similarity signal has stayed at or above
    ``threshold`` for ``patience`` consecutive updates.

    :meth:`update` is agnostic to what the similarity compares. Driven by a
    :class:`~svcca_torch.tracker.DynamicsTracker`, the policy owns its signal
    (:class:`~svcca_torch.freeze.signal.FreezeSignal`, :attr:`signal`): every
    ``freeze_window`` steps it records the lowest still-trained groups and feeds
    :meth:`update` each group's SVCCA similarity to itself one window earlier, so that
    decisions do not depend on how often anything is captured.

    The rule the signal applies to each layer before it gets here (calibration to chance):
    a similarity is only informative above what an unrelated network reads. Once, at the
    start, each judgeable layer's *chance level* ``c`` is measured: its signal against the
    same layer of an independently initialised copy of the model (every module's
    ``reset_parameters()``, same probe images and grid). The layer is then judged on
    :func:`~svcca_torch.freeze.chance.calibrated_similarity`, ``s' = (s - c) / (1 - c)`` clipped to ``[0, 1]``, and a
    group on the lowest ``s'`` of its layers. So ``s' >= threshold`` means the layer moved
    less than ``1 - threshold`` of the distance to an unrelated network in one window: a
    first conv layer, which reads ~1 whatever its weights (0.991 against a random network on
    digits), no longer freezes at the first window just because its raw signal is ~1. A layer
    with ``c >`` :data:`~svcca_torch.freeze.chance.CHANCE_LIMIT` is not judged on its own signal (the reason is in
    ``svcca_summary.json``, ``"freeze"`` / ``"chance"``); a group with no judged layer takes
    the value of the next judged group above it (it freezes with that group: lower layers
    settle first). A layer whose chance level could not be measured (constant at the start,
    or the calibration did not fit the time budget) is judged on its raw signal.

    Args:
        groups: group names, bottom-up (the last one is never frozen).
        threshold: similarity counted as "settled".
        patience: consecutive settled updates needed.
        max_frozen_fraction: most groups frozen, as a fraction of all groups.
    """

    kind = "adaptive"

    def __init__(self, groups: Sequence[str], threshold: float = DEFAULT_THRESHOLD, patience: int = 1,
                 max_frozen_fraction: float = 0.75) -> None:
        super().__init__(groups, max_frozen_fraction)
        self.threshold = check_fraction(threshold, "threshold", high_inclusive=True)
        self.patience = check_positive_int(patience, "patience")
        #: consecutive settled captures per still-trained group
        self.streak: Dict[str, int] = {g: 0 for g in self.groups}
        self.signal: Optional[FreezeSignal] = None
        self._pending_signal: Optional[Dict[str, Any]] = None

    @classmethod
    def from_settings(cls, groups: Sequence[str], settings: Any) -> "AdaptiveFreezePolicy":
        return cls(groups, threshold=settings.freeze_threshold, patience=settings.freeze_patience,
                   max_frozen_fraction=settings.max_frozen_fraction)

    def update(self, step: int, similarities: Optional[Mapping[str, float]] = None,
               fraction: Optional[float] = None) -> List[str]:
        """Feed one capture's similarities (group name -> similarity to the previous capture)
        and return the groups to freeze now (possibly none). Missing groups reset their count."""
        if similarities is None:
            raise ValueError("`similarities` (group name -> similarity to the previous capture) is required.")
        unknown = [k for k in similarities if k not in self.streak]
        if unknown:
            raise ValueError(f"`similarities` names unknown groups {unknown}; groups are {self.groups}.")
        for g in self.groups:
            if g in self.frozen:
                continue
            s = similarities.get(g)
            self.streak[g] = self.streak[g] + 1 if s is not None and float(s) >= self.threshold else 0
        now: List[str] = []
        while len(self.frozen) + len(now) < self.max_frozen:
            g = self.groups[len(self.frozen) + len(now)]
            if self.streak[g] < self.patience:
                break
            now.append(g)
        return self._freeze(step, now)

    # ------------------------------------------------------------------ the engine's hooks
    def attach(self, run: PolicyRun) -> None:
        super().attach(run)
        silent = [g for g in self.groups[:-1] if not run.group_layers.get(g)]
        if silent:
            raise ValueError(
                f"freeze groups {silent} contain no recorded layer, so the adaptive policy has no similarity "
                "to judge them by; add a layer of each group to `layers` or change `freeze_groups`.")
        #: the policy's observations (:class:`~svcca_torch.freeze.signal.FreezeSignal`)
        self.signal = FreezeSignal(self, run)
        if self._pending_signal is not None:
            self.signal.load_state_dict(self._pending_signal)
            self._pending_signal = None

    def check_run(self, settings: Any) -> None:
        if settings.freeze_window is None:
            raise ValueError(
                "freeze_training='adaptive' needs `freeze_window` (optimizer steps between the two recordings "
                "its signal compares, e.g. one epoch: len(train_loader)).")

    def on_start(self, step: int) -> Optional[Dict[str, Any]]:
        run = self.run
        if run.is_writer and self.signal.chance is None:
            self.signal.calibrate(step)  # once per run (restored on resume)
        return self.on_step(step, None)

    def on_step(self, step: int, fraction: Optional[float]) -> Optional[Dict[str, Any]]:
        if step % self.run.settings.freeze_window:
            return None
        return self.signal.observe(step)

    def reason(self, groups: Sequence[str], step: int) -> str:
        log = self.signal.log if self.signal is not None else []
        sig = log[-1] if log and log[-1]["step"] == step else {}
        vals = [f"{g} {float(sig[g]):.3f}" for g in groups if g in sig]
        return f"similarity to one window earlier {', '.join(vals)} >= {self.threshold:g}" if vals else ""

    def summary(self) -> Dict[str, Any]:
        s = self.signal
        if s is None:
            return {}
        return {"signal": [dict(e) for e in s.log], "signal_raw": [dict(e) for e in s.raw_log],
                "signal_budget": s.summary(), "chance": s.chance_info or None}

    def report(self) -> str:
        return self.signal.report() if self.signal is not None else ""

    def keep_until(self, step: int) -> None:
        if self.signal is not None:
            self.signal.keep_until(step)

    # ------------------------------------------------------------------ state
    def decision_state(self) -> Dict[str, Any]:
        """The decision alone (frozen groups, streaks): what rank 0 broadcasts each window."""
        state = super().state_dict()
        state.update(threshold=self.threshold, patience=self.patience, streak=dict(self.streak))
        return state

    def load_decision_state(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.streak = {g: int(state["streak"].get(g, 0)) for g in self.groups}

    def state_dict(self) -> Dict[str, Any]:
        state = self.decision_state()
        if self.signal is not None:
            state["signal"] = self.signal.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.load_decision_state(state)
        if "signal" in state:
            if self.signal is not None:
                self.signal.load_state_dict(state["signal"])
            else:
                self._pending_signal = dict(state["signal"])


register_policy("adaptive", AdaptiveFreezePolicy)
