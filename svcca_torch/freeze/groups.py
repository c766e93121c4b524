"""Layer groups and the freezing itself (plain PyTorch, no Lightning).

A :class:`LayerGroup` is the modules frozen together, built around a recorded layer
(:func:`default_layer_groups`, bottom-up in forward order) or given explicitly
(:func:`explicit_layer_groups`). :func:`freeze_group` sets ``requires_grad=False`` and
``grad=None`` on its parameters and keeps its normalisation layers in eval mode, so a frozen
group stays bit-identical; :func:`backward_flops` measures what freezing saves.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..recorder import NORM_TYPES, Inputs, default_layers, first_tensor, forward_order, to_model

__all__ = ["LayerGroup", "default_layer_groups", "explicit_layer_groups", "freeze_group", "unfreeze_group",
           "is_frozen", "frozen_parameter_count", "backward_flops", "probe_backward_flops"]

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


def contains(ancestor: str, name: str) -> bool:
    """Whether module ``name`` is ``ancestor`` or inside it (``""`` is the model)."""
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
    tops = [n for n in layer_names if not any(o != n and contains(o, n) for o in layer_names)]
    roots: List[str] = []
    for n in tops:
        root, parent = n, _parent(n)
        if parent != "" and not any(o != n and contains(parent, o) for o in tops):
            root = parent
        roots.append(root)
    order = [n for n, _ in model.named_modules()]
    position = {n: i for i, n in enumerate(order)}
    taken = set()
    for r in roots:
        taken.update(n for n in order if contains(r, n))
    groups: List[LayerGroup] = []
    for layer, root in zip(tops, roots):
        names = [root]
        if not any(True for _ in modules[root].parameters()):
            parent = _parent(root)
            siblings = [n for n in order if _parent(n) == parent and n != ""]
            for n in reversed(siblings[: siblings.index(root)]):
                if n in taken or any(contains(n, r) for r in roots):
                    break
                names.insert(0, n)
                taken.update(o for o in order if contains(n, o))
                if not isinstance(modules[n], _NORM_TYPES) and any(True for _ in modules[n].parameters()):
                    break
        # normalisation layers that directly follow the group in module order
        i = position[root] + 1
        while i < len(order):
            n = order[i]
            if contains(root, n):
                i += 1
                continue
            m = modules[n]
            if n in taken or any(contains(n, r) for r in roots):
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



# ----------------------------------------------------------------------------- freezing


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


def probe_backward_flops(model: nn.Module, example: Any, groups: Sequence[LayerGroup], *,
                         all_trainable: bool = False) -> int:
    """FLOPs of one backward pass on ``example`` (one probe input: a tensor or
    :class:`~svcca_torch.recorder.Inputs`; eval mode, grad enabled); ``all_trainable``: as if
    no group were frozen. PyTorch's fused attention fast path is off meanwhile:
    ``nn.TransformerEncoder`` decides on it from its first layer alone, so with that layer
    frozen and a padding mask it would hand a nested tensor to a trainable layer above, which
    refuses it outside the fast path (training forwards never take it)."""
    x = to_model(example, model)
    net, arg = (model, x) if isinstance(x, torch.Tensor) else (_Bound(model, x), None)
    frozen = [p for g in groups for p in g.parameters() if not p.requires_grad] if all_trainable else []
    for p in frozen:
        p.requires_grad_(True)
    try:
        with _mha_fastpath_off():
            return backward_flops(net, arg)
    finally:
        for p in frozen:
            p.requires_grad_(False)


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
