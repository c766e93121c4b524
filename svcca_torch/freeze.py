"""Freeze training (Raghu et al. 2017, section 4.1) as plain PyTorch: layer groups, freeze
policies as small serialisable state machines, and the freezing itself.

Lower layers of a network converge (reach their final representation, as measured by SVCCA)
earlier than higher ones, so they can be frozen bottom-up during training to save backward
compute. This module has no Lightning dependency; :class:`svcca_torch.callbacks.SVCCACallback`
drives it from a ``Trainer``, and a plain training loop can drive it directly::

    groups = default_layer_groups(model, example_input=batch)  # bottom-up in forward order
    policy = AdaptiveFreezePolicy([g.name for g in groups])
    ...every window of training steps, with each group's SVCCA similarity to one window earlier:
    for name in policy.update(step, similarities):
        freeze_group(groups_by_name[name])

:class:`svcca_torch.tracker.DynamicsTracker` does all of this (and the recording) for you.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .settings import DEFAULT_THRESHOLD
from .recorder import NORM_TYPES, default_layers, first_tensor, forward_order
from .utils.validation import check_fraction, check_positive_int

__all__ = [
    "LayerGroup",
    "default_layer_groups",
    "explicit_layer_groups",
    "FreezePolicy",
    "AdaptiveFreezePolicy",
    "ScheduleFreezePolicy",
    "make_freeze_policy",
    "register_policy",
    "unregister_policy",
    "get_policy",
    "policy_names",
    "DEFAULT_THRESHOLD",
    "calibrated_similarity",
    "CHANCE_LIMIT",
    "freeze_group",
    "unfreeze_group",
    "is_frozen",
    "frozen_parameter_count",
    "backward_flops",
]

_NORM_TYPES = NORM_TYPES
_FROZEN_FLAG = "_svcca_frozen"
_HOOK_ATTR = "_svcca_frozen_hook"


@dataclass
class LayerGroup:
    """Modules frozen together: a recorded layer and the modules that belong to it.

    Attributes:
        name: the group's name (the recorded layer it was built around, or the name given).
        module_names: names (in the model) of the modules of the group.
        modules: those modules.
    """

    name: str
    module_names: List[str]
    modules: List[nn.Module] = field(repr=False)

    def parameters(self) -> List[nn.Parameter]:
        """The group's parameters, each once."""
        seen, out = set(), []
        for m in self.modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def num_parameters(self) -> int:
        """Parameter elements in the group."""
        return sum(p.numel() for p in self.parameters())


def _contains(ancestor: str, name: str) -> bool:
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _check_names(model: nn.Module, names: Sequence[str], arg: str) -> Dict[str, nn.Module]:
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules or n == ""]
    if unknown:
        listing = ", ".join(n for n in modules if n)
        raise ValueError(f"`{arg}`: {unknown} are not modules of the model. Modules: {listing}")
    return modules


def default_layer_groups(model: nn.Module, layer_names: Optional[Sequence[str]] = None, *,
                         example_input: Any = None) -> List[LayerGroup]:
    """One group per recorded layer, bottom-up, with the modules that belong to it: with the
    default layers (:func:`svcca_torch.recorder.default_layers`, the model's blocks) one group
    per block, a block's inner modules (a squeeze-excitation, an attention) never split across
    groups.

    Groups follow the order of ``layer_names``, which must be the order the forward pass
    reaches them (e.g. :attr:`ActivationRecorder.layers` after a record or
    :meth:`~svcca_torch.ActivationRecorder.order_layers`, or
    :func:`svcca_torch.recorder.forward_order`): "bottom-up" and "the last group is never
    frozen" mean that order. With ``example_input`` the names are put in that order here.

    For each layer the group is the smallest module enclosing it that contains no other
    recorded layer (``features.block1`` for the conv ``features.block1.conv``, a residual
    block for a conv inside it), or the layer itself when its parent holds other recorded
    layers; then any normalisation layers (BatchNorm, LayerNorm, ...) that directly follow
    it in module order, skipping parameter-free modules (ReLU, pooling), are added (the
    ``conv1 -> bn1`` pattern). A group that has no parameters so far (a recorded ReLU, the
    paper's post-activation layers) takes the sibling modules just before it, back to and
    including the nearest one with parameters that is not a normalisation layer and not in
    another group (``conv -> bn -> relu``), since those weights produce what it records.
    A recorded layer nested in another recorded layer belongs to the outer one's group. Parameters in no group (e.g. an unrecorded head) are never
    frozen by the policies; the last group (the output layer) is never frozen either.

    Args:
        model: any ``nn.Module``.
        layer_names: recorded layers, bottom-up; default
            :func:`svcca_torch.recorder.default_layers` (with ``example_input``: chosen on a
            traced forward of it, in forward order; else its structural rule, in registration
            order).
        example_input: one batch of model input; if given, ``layer_names`` is put in the
            order a traced forward of it reaches them (:func:`forward_order`, which falls
            back to the given order with a warning if the forward fails).
    """
    if layer_names is None:
        layer_names = default_layers(model, example_input)
    elif example_input is not None:
        layer_names = list(layer_names)
        _check_names(model, layer_names, "layer_names")
        layer_names = forward_order(model, layer_names, example_input)
    layer_names = list(layer_names)
    if not layer_names:
        raise ValueError("`layer_names` is empty; pass at least one module name.")
    modules = _check_names(model, layer_names, "layer_names")
    # drop layers nested in another recorded layer: the outer one's group covers them
    tops = [n for n in layer_names if not any(o != n and _contains(o, n) for o in layer_names)]
    roots: List[str] = []
    for n in tops:
        root, parent = n, _parent(n)
        if parent != "" and not any(o != n and _contains(parent, o) for o in tops):
            root = parent
        roots.append(root)
    order = [n for n, _ in model.named_modules()]
    position = {n: i for i, n in enumerate(order)}
    taken = set()
    for r in roots:
        taken.update(n for n in order if _contains(r, n))
    groups: List[LayerGroup] = []
    for layer, root in zip(tops, roots):
        names = [root]
        if not any(True for _ in modules[root].parameters()):
            parent = _parent(root)
            siblings = [n for n in order if _parent(n) == parent and n != ""]
            for n in reversed(siblings[: siblings.index(root)]):
                if n in taken or any(_contains(n, r) for r in roots):
                    break
                names.insert(0, n)
                taken.update(o for o in order if _contains(n, o))
                if not isinstance(modules[n], _NORM_TYPES) and any(True for _ in modules[n].parameters()):
                    break
        # normalisation layers that directly follow the group in module order
        i = position[root] + 1
        while i < len(order):
            n = order[i]
            if _contains(root, n):
                i += 1
                continue
            m = modules[n]
            if n in taken or any(_contains(n, r) for r in roots):
                break
            if isinstance(m, _NORM_TYPES):
                names.append(n)
                taken.add(n)
            elif any(True for _ in m.parameters(recurse=False)) or len(list(m.children())) > 0:
                break
            i += 1
        groups.append(LayerGroup(layer, names, [modules[n] for n in names]))
    return groups


def explicit_layer_groups(
    model: nn.Module, groups: Union[Mapping[str, Sequence[str]], Sequence[Sequence[str]]]
) -> List[LayerGroup]:
    """Groups given explicitly as module names, bottom-up.

    Args:
        model: any ``nn.Module``.
        groups: ``{group name: [module names]}`` or a list of module-name lists (each group
            then named after its first module), ordered bottom-up.
    """
    if isinstance(groups, Mapping):
        items = [(str(k), list(v)) for k, v in groups.items()]
    else:
        items = []
        for g in groups:
            g = [g] if isinstance(g, str) else list(g)
            if not g:
                raise ValueError("`groups` contains an empty group; every group needs at least one module name.")
            items.append((g[0], g))
    if not items:
        raise ValueError("`groups` is empty; give at least one group of module names.")
    names = [n for _, g in items for n in g]
    if any(not g for _, g in items):
        raise ValueError("`groups` contains an empty group; every group needs at least one module name.")
    modules = _check_names(model, names, "groups")
    return [LayerGroup(k, g, [modules[n] for n in g]) for k, g in items]


# --------------------------------------------------------------------------------------
# policies

#: A layer whose chance level (its signal against an independently initialised copy of the
#: model) is above this is not judged on its own signal: the part of the similarity scale its
#: learning can move, ``1 - chance``, is under 1%, so its signal reads ~1 whatever it learns (a
#: first conv layer over image patches: 0.991 on digits, 0.9998 on resnet18; a linear map of a
#: low-dimensional input spans that input's space whatever its weights: exactly 1). Its group
#: goes with the next judged group above it.
CHANCE_LIMIT = 0.99



def calibrated_similarity(similarity: float, chance: Optional[float]) -> float:
    """A layer's signal judged on the part that can change: ``(s - chance) / (1 - chance)``,
    clipped to ``[0, 1]``.

    ``s`` is the layer's SVCCA similarity to itself one window earlier and ``chance`` the
    same measure against an independently initialised copy of the model (what ``s`` reads
    when the two share nothing learnt). The result is 1 for an unchanged layer and 0 for one
    no closer to its earlier self than an unrelated network is, so ``>= threshold`` means
    "moved less than ``1 - threshold`` of the way from an unrelated network in one window",
    whatever the layer's chance level. ``chance=None`` (not measured): ``s`` itself.
    """
    s = float(similarity)
    if chance is None:
        return s
    c = float(chance)
    if not c < 1.0:
        raise ValueError(f"`chance` must be < 1 to calibrate against (got {chance!r}); such a layer is not judged.")
    return min(1.0, max(0.0, (s - c) / (1.0 - c)))


class FreezePolicy:
    """Base of the freeze policies: which groups (by name, bottom-up) to freeze, and when.

    A policy is pure state (no model, no tensors): :meth:`update` returns the names of the
    groups to freeze now, always the lowest still-trained ones, contiguous from the bottom.
    The last group (the output layer) is never frozen, nor more than
    ``floor(max_frozen_fraction * len(groups))`` groups.
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


class AdaptiveFreezePolicy(FreezePolicy):
    """Freeze the lowest trained group once its similarity signal has stayed at or above
    ``threshold`` for ``patience`` consecutive updates.

    The policy is agnostic to what the similarity compares; :class:`~svcca_torch.tracker.
    DynamicsTracker` feeds it each group's SVCCA similarity to the group one fixed window of
    training steps earlier, so that decisions do not depend on how often anything is captured.

    The rule the tracker applies to each layer before it gets here (calibration to chance):
    a similarity is only informative above what an unrelated network reads. Once, at the
    start, each judgeable layer's *chance level* ``c`` is measured: its signal against the
    same layer of an independently initialised copy of the model (every module's
    ``reset_parameters()``, same probe images and grid). The layer is then judged on
    :func:`calibrated_similarity`, ``s' = (s - c) / (1 - c)`` clipped to ``[0, 1]``, and a
    group on the lowest ``s'`` of its layers. So ``s' >= threshold`` means the layer moved
    less than ``1 - threshold`` of the distance to an unrelated network in one window: a
    first conv layer, which reads ~1 whatever its weights (0.991 against a random network on
    digits), no longer freezes at the first window just because its raw signal is ~1. A layer
    with ``c >`` :data:`CHANCE_LIMIT` is not judged on its own signal (the reason is in
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

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(threshold=self.threshold, patience=self.patience, streak=dict(self.streak))
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.streak = {g: int(state["streak"].get(g, 0)) for g in self.groups}


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


register_policy("adaptive", AdaptiveFreezePolicy)
register_policy("schedule", ScheduleFreezePolicy)


# --------------------------------------------------------------------------------------
# freezing


def _keep_eval_pre_hook(module: nn.Module, args: Any) -> None:
    # also catches code that sets `.training = True` directly instead of calling train()
    module.training = False


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    nn.Module.train(self, False)
    return self


def _freeze_norm(module: nn.Module) -> None:
    if getattr(module, _FROZEN_FLAG, False):
        return
    module.eval()
    # an instance attribute shadows nn.Module.train, so model.train() leaves it in eval mode
    object.__setattr__(module, "train", _frozen_train.__get__(module))
    object.__setattr__(module, _HOOK_ATTR, module.register_forward_pre_hook(_keep_eval_pre_hook))
    object.__setattr__(module, _FROZEN_FLAG, True)


def _unfreeze_norm(module: nn.Module) -> None:
    if not getattr(module, _FROZEN_FLAG, False):
        return
    module.__dict__.pop("train", None)
    getattr(module, _HOOK_ATTR).remove()
    module.__dict__.pop(_HOOK_ATTR, None)
    module.__dict__.pop(_FROZEN_FLAG, None)


def freeze_group(group: LayerGroup) -> int:
    """Freeze ``group``: stop its parameters' gradients, drop their ``.grad`` (else momentum
    and weight decay would keep moving them: optimizers skip parameters whose grad is
    ``None``), and keep its BatchNorm layers in eval mode (running statistics fixed) even
    across later ``model.train()`` calls. Frozen weights stay bit-identical afterwards.

    Returns:
        the number of parameters (elements) frozen.
    """
    n = 0
    for p in group.parameters():
        p.requires_grad_(False)
        p.grad = None
        n += p.numel()
    for m in group.modules:
        for sub in m.modules():
            if isinstance(sub, _BatchNorm):
                _freeze_norm(sub)
    return n


def unfreeze_group(group: LayerGroup) -> None:
    """Undo :func:`freeze_group` (BatchNorm layers follow ``model.train()`` again)."""
    for p in group.parameters():
        p.requires_grad_(True)
    for m in group.modules:
        for sub in m.modules():
            _unfreeze_norm(sub)


def is_frozen(group: LayerGroup) -> bool:
    """Whether every parameter of ``group`` has ``requires_grad`` False."""
    params = group.parameters()
    return bool(params) and not any(p.requires_grad for p in params)


def frozen_parameter_count(model: nn.Module) -> int:
    """Number of parameter elements of ``model`` that do not require grad."""
    return sum(p.numel() for p in model.parameters() if not p.requires_grad)


def backward_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs of one backward pass (to the parameters that require grad) on ``example_input``
    (a batch ``(N, C, H, W)`` or ``(N, features)``), as counted by
    ``torch.utils.flop_counter`` (matmuls and convolutions).

    Frozen lower groups save both their weight gradients and the input gradients that
    would only have fed them, which this measures directly. The model runs in eval mode (no
    BatchNorm statistics change), no ``.grad`` is written, and each module's train/eval
    flag is restored. Returns 0 when no parameter requires grad.
    """
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.enable_grad():
            out = first_tensor(model(example_input))
            if out is None:
                raise ValueError("`model` returned no tensor on `example_input`; its backward cannot be measured.")
            with FlopCounterMode(display=False) as counter:
                torch.autograd.grad(out.float().sum(), params, allow_unused=True)
    finally:
        for m, mode in modes:
            m.training = mode
    return int(counter.get_total_flops())
