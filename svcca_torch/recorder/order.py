"""Forward-order tracing: which modules a forward runs, in which order, with what outputs.

Layers are ordered by the order the forward pass reaches them (their depth), not by the
order the modules were registered: :func:`forward_order` finds it with one traced forward
of an example batch (hooks noting each module's first call, eval + ``no_grad``, modes
restored). The recorder orders :attr:`ActivationRecorder.layers` at its first full
:meth:`~ActivationRecorder.record` (its own forward is the trace) or earlier with
:meth:`~ActivationRecorder.order_layers` / ``example_input=`` (needed before the first
capture by anything built bottom-up on the layers, e.g.
:func:`svcca_torch.freeze.default_layer_groups`). If the traced forward fails, the given
order (registration order for the default layers) is kept, with a :class:`LayerOrderWarning`.

The hooks of a traced forward (and of a recording) are registered and removed with every
module's train/eval flag restored (:func:`_modes_and_hooks_restored`).
"""
from __future__ import annotations

import collections
import itertools
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .blocks import _has_params, _listing
from .inputs import Inputs, first_tensor, model_inputs, to_model


class LayerOrderWarning(UserWarning):
    """The forward order of the layers could not be traced; a fallback order is used."""


class _StopForward(BaseException):
    # BaseException, not Exception: a model's own `except Exception` must not swallow it
    """Raised by a recorder hook once every layer a capture needs has run."""


def _modes_and_hooks_restored(model: nn.Module, hooks: Dict[str, Callable], run: Callable[[], None], *,
                              pre_hooks: Optional[Dict[str, Callable]] = None, grad: bool = False) -> None:
    """Register ``hooks`` (module name -> forward hook) and ``pre_hooks`` (forward pre-hooks),
    run ``run()`` with ``model`` in eval mode under ``no_grad`` (``grad=True``: with gradients
    enabled), then remove the hooks and restore every module's train/eval flag, also if
    ``run`` raises."""
    modules = dict(model.named_modules())
    modes = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for name, hook in (pre_hooks or {}).items():
            handles.append(modules[name].register_forward_pre_hook(hook))
        for name, hook in hooks.items():
            handles.append(modules[name].register_forward_hook(hook))
        model.eval()
        with torch.set_grad_enabled(grad):
            run()
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode


def _unpadded(output: Any) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(The tensor a layer's output is recorded from, its token lengths or None): a nested
    tensor (the fused transformer path with a padding mask) is padded, a ``PackedSequence``
    unpacked (batch first), each with the lengths of its sequences."""
    if isinstance(output, PackedSequence):
        data, lengths = pad_packed_sequence(output, batch_first=True)
        return data, lengths
    t = first_tensor(output)
    if t is not None and getattr(t, "is_nested", False):
        lengths = torch.tensor([int(c.shape[0]) for c in t.unbind()])
        return torch.nested.to_padded_tensor(t, 0.0), lengths
    return t, None


class _Survey:
    """What one eval-mode forward of a few inputs ran: per module name its calls, the rank of
    its first call's return, its output shape, and the last parametric leaf that returned
    inside its first call (for the channels-last check)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls: Dict[str, int] = collections.Counter()
        self.exits: Dict[str, int] = {}
        self.enters: Dict[str, int] = {}
        self.shapes: Dict[str, Optional[Tuple[int, ...]]] = {}
        self.leaf_shapes: Dict[str, Tuple[int, ...]] = {}
        self.last_leaf: Dict[str, Optional[str]] = {}
        self.names: List[str] = []
        # per parametric leaf: whether it works on the last axis (a linear layer, a plain LayerNorm)
        self.last_axis: Dict[str, bool] = {}

    def ran(self, name: str) -> bool:
        """The module or one inside it ran."""
        if self.calls.get(name):
            return True
        prefix = name + "."
        return any(n.startswith(prefix) for n in self.calls)

    def usable(self, name: str) -> bool:
        """It ran exactly once and its output has one row per input (dim 0, or dim 1 of a 3-d
        output: sequence first)."""
        shape = self.shapes.get(name)
        if self.calls.get(name) != 1 or not shape:
            return False
        return shape[0] == self.n or (len(shape) == 3 and shape[1] == self.n)

    def exit_rank(self, name: str) -> int:
        return self.exits.get(name, len(self.exits))

    def channels_last(self, name: str) -> bool:
        """A 4-d output that is the output of a linear layer or a plain LayerNorm run last
        inside the module (features on the last axis: Swin's blocks, patch merging, stem)."""
        leaf = self.last_leaf.get(name)
        shape = self.shapes.get(name)
        if leaf is None or shape is None or len(shape) != 4:
            return False
        return self.leaf_shapes.get(leaf) == shape and self.last_axis.get(leaf, False)


def _survey(model: nn.Module, inputs: Inputs) -> _Survey:
    """One eval-mode ``no_grad`` forward of ``inputs`` with hooks on every module (modes and
    hooks restored): see :class:`_Survey`."""
    survey = _Survey(inputs.rows)
    modules = dict(model.named_modules())
    leaves = {n for n, m in modules.items() if n and not any(True for _ in m.children())}
    survey.last_axis = {n: type(modules[n]) is nn.LayerNorm or isinstance(modules[n], nn.Linear) for n in leaves}
    clock = itertools.count()
    open_calls: List[str] = []

    def pre(name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            survey.calls[name] += 1
            if survey.calls[name] == 1:
                survey.enters[name] = next(clock)
                open_calls.append(name)
        return hook

    def post(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name in survey.exits or name not in survey.enters:
                return
            survey.exits[name] = len(survey.exits)
            if name in open_calls:
                open_calls.remove(name)
            t, _ = _unpadded(output)
            survey.shapes[name] = tuple(int(s) for s in t.shape) if t is not None else None
            if name in leaves and _has_params(module) and t is not None:
                survey.leaf_shapes[name] = tuple(int(s) for s in t.shape)
                for o in (*open_calls, name):  # every module still running holds this leaf
                    survey.last_leaf[o] = name
        return hook

    named = {n: n for n in modules if n}
    _modes_and_hooks_restored(model, {n: post(n) for n in named}, lambda: inputs.call(model),
                              pre_hooks={n: pre(n) for n in named})
    survey.calls = {n: c for n, c in survey.calls.items() if c}
    survey.names = sorted(survey.exits, key=survey.exits.__getitem__)
    return survey

def _trace(model: nn.Module, names: Sequence[str], batch: Any, device: Optional[torch.device],
           stop_early: bool) -> Tuple[List[str], Dict[str, int], Dict[str, Optional[Tuple[int, ...]]]]:
    """One forward of ``batch`` (a tensor or :class:`Inputs`): the order in which ``names``
    are first called, how often each was called, and each one's output shape (None: no
    tensor). ``stop_early``: the forward ends once all have run."""
    order: List[str] = []
    calls = {n: 0 for n in names}
    shapes: Dict[str, Optional[Tuple[int, ...]]] = {}

    def make(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            calls[name] += 1
            if calls[name] == 1:
                order.append(name)
                t, _ = _unpadded(output)
                shapes[name] = tuple(int(s) for s in t.shape) if t is not None else None
                if stop_early and len(order) == len(calls):
                    raise _StopForward

        return hook

    inputs = to_model(model_inputs(batch, model), model, device)

    def run() -> None:
        try:
            inputs.call(model)
        except _StopForward:
            pass

    _modes_and_hooks_restored(model, {n: make(n) for n in names}, run)
    return order, calls, shapes

def forward_order(model: nn.Module, names: Sequence[str], example_input: Any, *,
                  device: Optional[Union[str, torch.device]] = None) -> List[str]:
    """``names`` (module names of ``model``) in the order the forward pass reaches them.

    Runs ``model`` once on ``example_input`` (one batch: a tensor, an ``(inputs, targets)``
    tuple, a dict batch or a tuple/dict of several inputs, see :func:`model_inputs`) in eval
    mode under ``no_grad``, with a forward hook on each named module noting when its output
    is first computed (so a module nested in another one comes before it); the forward stops
    as soon as every named module has run. Every module's train/eval flag is restored and
    every hook removed afterwards, also on error. Nothing about the model is changed.

    Falls back, with a :class:`LayerOrderWarning`, to the order given (registration order
    for :func:`default_layers`) when the traced forward raises; modules the forward never
    reaches are placed after the others, in the given order, with the same warning.

    Args:
        model: any ``nn.Module``.
        names: module names of ``model`` (e.g. from :func:`select_layers`).
        example_input: one batch of model input (a few inputs are enough).
        device: where the input is sent (default: the model's device).

    Returns:
        the names, bottom-up (input side first).
    """
    names = list(dict.fromkeys(names))
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules or n == ""]
    if unknown:
        raise ValueError(f"`names`: {unknown} are not modules of the model. Modules: {_listing(modules)}")
    if not names:
        return []
    try:
        order, _, _ = _trace(model, names, example_input, torch.device(device) if device is not None else None,
                             stop_early=True)
    except Exception as err:  # any failure of the user's forward: fall back, say so
        warnings.warn(
            f"the forward order of layers {names} could not be traced ({type(err).__name__}: {err}); "
            "they keep the order given (registration order for default layers), which may differ from the "
            "order the forward pass reaches them. Pass a valid example input, or list the layers input-side first.",
            LayerOrderWarning,
            stacklevel=2,
        )
        return names
    missing = [n for n in names if n not in order]
    if missing:
        warnings.warn(
            f"layers {missing} did not run in the traced forward pass; they are placed after the others "
            f"in the order given.",
            LayerOrderWarning,
            stacklevel=2,
        )
    return order + missing


def _check_calls(calls: Dict[str, int]) -> None:
    """Each recorded layer ran exactly once in the forward (``calls``: layer -> calls), else a
    ValueError naming it."""
    missing = [n for n, c in calls.items() if c == 0]
    if missing:
        raise ValueError(
            f"layers {missing} did not run in the forward pass, so they have no output "
            "to record; remove them from `layers`."
        )
    shared = [n for n, c in calls.items() if c > 1]
    if shared:
        raise ValueError(
            f"layer {shared[0]!r} ran more than once in one forward pass (a shared module): its output "
            "is ambiguous. Record a module that runs once."
        )
