"""The paper's fixed freeze schedule (Raghu et al. 2017, section 4.1): lower groups freeze
earlier, linearly in depth between two fractions of training."""
from __future__ import annotations

import numbers
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..utils.validation import check_fraction
from .policy import FreezePolicy, register_policy

__all__ = ["ScheduleFreezePolicy"]


class ScheduleFreezePolicy(FreezePolicy):
    """The paper's fixed schedule: the ``i``-th freezable group (bottom-up) is frozen once
    ``start + (end - start) * i / (m - 1)`` of training has passed (``m`` freezable groups),
    so the freezing point grows linearly with depth.

    Args:
        groups: group names, bottom-up (the last one is never frozen).
        start: training fraction at which the lowest group freezes.
        end: training fraction at which the highest freezable group freezes.
        max_frozen_fraction: most groups frozen, as a fraction of all groups.
    """

    kind = "schedule"

    def __init__(self, groups: Sequence[str], start: float = 0.25, end: float = 0.75,
                 max_frozen_fraction: float = 0.75) -> None:
        super().__init__(groups, max_frozen_fraction)
        self.start = check_fraction(start, "start", low_inclusive=True, high_inclusive=True)
        self.end = check_fraction(end, "end", low_inclusive=True, high_inclusive=True)
        if self.end < self.start:
            raise ValueError(f"`end` ({end}) must be >= `start` ({start}).")

    @classmethod
    def from_settings(cls, groups: Sequence[str], settings: Any) -> "ScheduleFreezePolicy":
        return cls(groups, start=settings.schedule_start, end=settings.schedule_end,
                   max_frozen_fraction=settings.max_frozen_fraction)

    @property
    def freeze_fractions(self) -> Dict[str, float]:
        """Training fraction at which each freezable group is frozen."""
        m = self.max_frozen
        if m == 0:
            return {}
        if m == 1:
            return {self.groups[0]: self.start}
        return {self.groups[i]: self.start + (self.end - self.start) * i / (m - 1) for i in range(m)}

    def check_run(self, settings: Any) -> None:
        if settings.total_steps is None:
            raise ValueError("freeze_training='schedule' needs a known training length: pass `total_steps` (the "
                             "callback sets it from the Trainer's max_epochs or max_steps).")

    def on_step(self, step: int, fraction: Optional[float]) -> Optional[Dict[str, Any]]:
        if fraction is not None:
            self.update(step, fraction=fraction)
        return None

    def reason(self, groups: Sequence[str], step: int) -> str:
        at = self.freeze_fractions
        return "the schedule: " + ", ".join(f"{g} at {100 * at[g]:.3g}% of training" for g in groups if g in at)

    def update(self, step: int, similarities: Optional[Mapping[str, float]] = None,
               fraction: Optional[float] = None) -> List[str]:
        """Return the groups whose freezing point ``fraction`` (of training done) has reached."""
        if fraction is None or not isinstance(fraction, numbers.Real):
            raise ValueError(f"`fraction` (the fraction of training done, in [0, 1]) is required, got {fraction!r}.")
        now = [g for g, f in self.freeze_fractions.items() if g not in self.frozen and fraction + 1e-12 >= f]
        return self._freeze(step, now)

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(start=self.start, end=self.end)
        return state


_POLICIES: Dict[str, type] = {}


register_policy("schedule", ScheduleFreezePolicy)
