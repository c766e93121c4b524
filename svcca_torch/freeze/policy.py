"""Freeze policies' common ground: the base class with the tracker's hooks, the services a run
lends a policy (:class:`PolicyRun`), and the registry of policies by name."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..utils.validation import check_fraction
from .groups import LayerGroup

__all__ = ["FreezePolicy", "PolicyRun", "register_policy", "unregister_policy", "get_policy", "policy_names",
           "make_freeze_policy"]

Recording = Tuple[Optional[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]  # (rows per layer, row -> input)


@dataclass
class PolicyRun:
    """What a tracked run lends its freeze policy (:meth:`FreezePolicy.attach`).

    Attributes:
        settings: the run's :class:`~svcca_torch.settings.TrackerSettings`.
        model: the model being trained.
        groups: the layer groups, bottom-up; ``group_layers``: each group's recorded layers.
        capture: the run's :class:`~svcca_torch.capture.Capturer` (``reduce``,
            ``layer_shapes``, ``record``, ``constant``, ``last``, ``capture_cost``, ``probe``).
        record: ``(layers, n_inputs) -> (rows per layer, row -> probe input per layer)``: a
            per-layer-rows recording of ``layers`` on the first ``n_inputs`` probe inputs that
            reuses the frozen prefix's output where that is exact.
        clock: the run's :class:`~svcca_torch.schedule.Clock` (``timed()``, ``split()``).
        is_writer, broadcast: rank 0 decides, every rank follows (identity on one process).
        owner: the name warnings and errors start with.
    """

    settings: Any
    model: nn.Module
    groups: List[LayerGroup]
    group_layers: Dict[str, List[str]]
    capture: Any
    record: Callable[[List[str], int], Recording]
    clock: Any
    is_writer: bool = True
    broadcast: Callable[[Any], Any] = lambda obj: obj
    owner: str = "DynamicsTracker"


class FreezePolicy:
    """Base of the freeze policies: which groups (by name, bottom-up) to freeze, and when.

    A policy owns its inputs. Its decision is pure state (no model, no tensors):
    :meth:`update` returns the names of the groups to freeze now, always the lowest
    still-trained ones, contiguous from the bottom; the last group (the output layer) is never
    frozen, nor more than ``floor(max_frozen_fraction * len(groups))`` groups. Driven by a
    :class:`~svcca_torch.tracker.DynamicsTracker`, it also says what it needs and when,
    through the hooks the tracker calls (the tracker never asks which policy it holds):

    * :meth:`attach` (at setup): the run's services (:class:`PolicyRun`): recording the
      probe, the time budget, the layer groups;
    * :meth:`check_run` (at start): refuse settings the policy cannot run with;
    * :meth:`on_start` / :meth:`on_step` (at the first step and after every optimizer step):
      observe (record what it needs) and decide; the tracker then freezes :attr:`frozen`;
    * :meth:`reason`, :meth:`summary`, :meth:`report`: what it decided and why, for the
      freeze log, ``svcca_summary.json`` and the end-of-run message.

    A new policy is a subclass overriding :meth:`update` and the hooks it needs, registered
    once with :func:`register_policy`; its own options come from ``settings.freeze_options``
    (:meth:`from_settings`).
    """

    kind = "base"

    def __init__(self, groups: Sequence[str], max_frozen_fraction: float = 0.75) -> None:
        groups = [str(g) for g in groups]
        if len(groups) < 2:
            raise ValueError(
                f"`groups` must name at least 2 layer groups (the last, the output layer, is never frozen); "
                f"got {groups}."
            )
        if len(set(groups)) != len(groups):
            raise ValueError(f"`groups` must have unique names, got {groups}.")
        self.groups = groups
        self.max_frozen_fraction = check_fraction(max_frozen_fraction, "max_frozen_fraction", high_inclusive=True)
        #: names of the frozen groups, bottom-up
        self.frozen: List[str] = []
        #: ``[{"step": int, "group": str}, ...]`` in freezing order
        self.events: List[Dict[str, Any]] = []

    @property
    def max_frozen(self) -> int:
        """The most groups this policy will freeze."""
        return min(len(self.groups) - 1, int(math.floor(self.max_frozen_fraction * len(self.groups) + 1e-9)))

    def _freeze(self, step: int, names: List[str]) -> List[str]:
        for n in names:
            self.frozen.append(n)
            self.events.append({"step": int(step), "group": n})
        return names

    @classmethod
    def from_settings(cls, groups: Sequence[str], settings: Any) -> "FreezePolicy":
        """The policy over ``groups`` configured from a run's
        :class:`~svcca_torch.settings.TrackerSettings` (what the tracker calls; a registered
        policy reads its own options from ``settings.freeze_options``)."""
        return cls(groups, max_frozen_fraction=settings.max_frozen_fraction, **settings.freeze_options)

    # ------------------------------------------------------------------ the engine's hooks
    def attach(self, run: "PolicyRun") -> None:
        """Receive the run's services (once, at the tracker's setup)."""
        self.run = run

    def check_run(self, settings: Any) -> None:
        """Raise a ``ValueError`` naming the missing setting when the policy cannot run with
        ``settings`` (called at start, when a caller such as the callback has filled them in)."""

    def on_start(self, step: int) -> Optional[Dict[str, Any]]:
        """Observe the start of the run (``step``: 0, or the resumed step); a signal event
        (``{"step", ...}``, :attr:`~svcca_torch.tracker.TrackerEvents.signal`) or None."""
        return None

    def on_step(self, step: int, fraction: Optional[float]) -> Optional[Dict[str, Any]]:
        """Observe optimizer step ``step`` (``fraction`` of training done, when known) and
        decide; a signal event or None. The tracker freezes :attr:`frozen` afterwards."""
        return None

    def reason(self, groups: Sequence[str], step: int) -> str:
        """Why ``groups`` froze at ``step``, in words (the freeze log's ``"reason"``)."""
        return ""

    def summary(self) -> Dict[str, Any]:
        """The policy's part of ``svcca_summary.json``'s ``"freeze"`` (JSON-serialisable)."""
        return {}

    def report(self) -> str:
        """One sentence for the end of the run (what observing cost; empty when nothing)."""
        return ""

    def keep_until(self, step: int) -> None:
        """Forget observations after ``step`` (a resumed run's part that was not kept)."""

    # ------------------------------------------------------------------ the decision
    def update(self, step: int, similarities: Optional[Mapping[str, float]] = None,
               fraction: Optional[float] = None) -> List[str]:
        """Feed one observation (group similarities or training fraction, per policy) and
        return the names of the groups to freeze now, bottom-up (possibly none)."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable snapshot of the policy."""
        return {"kind": self.kind, "groups": list(self.groups), "max_frozen_fraction": self.max_frozen_fraction,
                "frozen": list(self.frozen), "events": [dict(e) for e in self.events]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the group names must match."""
        if state.get("kind") != self.kind:
            raise ValueError(f"state is of a {state.get('kind')!r} policy, this policy is {self.kind!r}.")
        if list(state["groups"]) != self.groups:
            raise ValueError(
                f"the saved policy froze groups {list(state['groups'])} but this one has {self.groups}; "
                "resume with the same model and layer groups."
            )
        self.frozen = list(state["frozen"])
        self.events = [dict(e) for e in state["events"]]




_POLICIES: Dict[str, type] = {}


def register_policy(name: str, policy: type) -> None:
    """Make ``policy`` (a :class:`FreezePolicy` subclass) available as ``freeze=name`` (the
    callback's ``freeze_training=name``). Raises ``ValueError`` when ``name`` is taken."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a policy name must be a non-empty string, got {name!r}.")
    if not (isinstance(policy, type) and issubclass(policy, FreezePolicy)):
        raise ValueError(f"policy {name!r} must be a FreezePolicy subclass, got {policy!r}.")
    if name in _POLICIES and _POLICIES[name] is not policy:
        raise ValueError(f"a freeze policy named {name!r} is registered already ({_POLICIES[name].__name__}); "
                         "unregister_policy it first or choose another name.")
    _POLICIES[name] = policy


def unregister_policy(name: str) -> None:
    """Forget the policy registered as ``name`` (no error when there is none)."""
    _POLICIES.pop(name, None)


def policy_names() -> tuple:
    """The registered policy names, in registration order."""
    return tuple(_POLICIES)


def get_policy(name: str) -> type:
    """The :class:`FreezePolicy` subclass registered as ``name``; a ``ValueError`` listing the
    registered names otherwise."""
    if name is True:
        name = "adaptive"
    if name not in _POLICIES:
        raise ValueError(f"unknown freeze policy {name!r} (`freeze`, the callback's `freeze_training`); registered: "
                         f"{list(_POLICIES)} (svcca_torch.freeze.register_policy adds one).")
    return _POLICIES[name]


def make_freeze_policy(kind: Union[str, bool], groups: Sequence[str], **kwargs: Any) -> FreezePolicy:
    """The policy registered as ``kind`` (``True`` = ``"adaptive"``) over ``groups``;
    ``kwargs`` go to its constructor."""
    return get_policy(kind)(groups, **kwargs)  # type: ignore[arg-type]
