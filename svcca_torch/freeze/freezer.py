"""Applying a freeze policy's decisions to the model: freeze the groups it lists, log what froze,
when and why, and what it saves of a backward pass."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

from torch import nn

from ..frozen_prefix import outermost
from .groups import LayerGroup, freeze_group, is_frozen, probe_backward_flops
from .policy import FreezePolicy

__all__ = ["Freezer"]


class Freezer:
    """Freezes what ``policy`` decides (``requires_grad=False``, ``grad=None``, normalisation
    kept in eval mode: :func:`~svcca_torch.freeze.freeze_group`).

    Attributes:
        log: ``{"step", "groups", "frozen_groups", "frozen_parameters",
            "backward_flops_saved", "reason"}`` per step that froze groups.
        baseline_backward_flops: FLOPs of one backward pass with nothing frozen, on one probe
            input (measured once, on the writer).
    """

    def __init__(self, model: nn.Module, groups: List[LayerGroup], policy: FreezePolicy, example: Callable[[], Any],
                 *, is_writer: bool = True, on_freeze: Callable[[], None] = lambda: None) -> None:
        self.model, self.groups, self.policy = model, groups, policy
        self._example, self.is_writer, self._on_freeze = example, is_writer, on_freeze
        self._by_name = {g.name: g for g in groups}
        self.log: List[Dict[str, Any]] = []
        self.baseline_backward_flops: Optional[int] = None
        self._applied = -1  # how many of the policy's frozen groups the last apply() saw (every step calls it)

    def measure_baseline(self) -> None:
        if self.baseline_backward_flops is None and self.is_writer:
            self.baseline_backward_flops = self._flops(all_trainable=True)

    def _flops(self, all_trainable: bool = False) -> int:
        return probe_backward_flops(self.model, self._example(), self.groups, all_trainable=all_trainable)

    def apply(self, step: int, silent: bool = False) -> Optional[Dict[str, Any]]:
        """Freeze every group the policy lists that is not frozen yet; the log entry (None
        when nothing froze, or ``silent``: re-freezing a resumed run's groups)."""
        if len(self.policy.frozen) == self._applied:
            return None  # nothing new decided since the last call
        self._applied = len(self.policy.frozen)
        by_name = self._by_name
        # a group without parameters has nothing to freeze (and would count as newly frozen every time)
        newly = [n for n in self.policy.frozen if by_name[n].parameters() and not is_frozen(by_name[n])]
        if not newly:
            return None
        for n in newly:
            freeze_group(by_name[n])
        self._on_freeze()
        if silent:
            return None
        saved = None
        if self.is_writer and self.baseline_backward_flops:
            saved = 1.0 - self._flops() / self.baseline_backward_flops
        entry = {"step": int(step), "groups": newly, "frozen_groups": len(self.policy.frozen),
                 "frozen_parameters": sum(by_name[n].num_parameters() for n in self.policy.frozen),
                 "backward_flops_saved": saved, "reason": self.policy.reason(newly, step)}
        self.log.append(entry)
        return entry

    def frozen_modules(self) -> Dict[str, nn.Module]:
        """The frozen groups' modules, outermost only (name -> module)."""
        return outermost({m: mod for g in self.policy.frozen for m, mod in
                          zip(self._by_name[g].module_names, self._by_name[g].modules)})

    @property
    def steps(self) -> Dict[str, int]:
        """``{group: the step it was frozen at}`` (bottom-up)."""
        return {g: int(e["step"]) for e in self.log for g in e["groups"]}

    def state_dict(self) -> Dict[str, Any]:
        return {"freeze_log": [dict(e) for e in self.log], "baseline_backward_flops": self.baseline_backward_flops}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.log = [dict(e) for e in state.get("freeze_log", [])]
        self.baseline_backward_flops = state.get("baseline_backward_flops")
        self._applied = -1

    def keep_until(self, step: int) -> None:
        self.log = [e for e in self.log if e["step"] <= step]
        self._applied = -1
