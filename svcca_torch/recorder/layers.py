"""Which layers are recorded: the default layers (the model's blocks) and the layers asked for.

By default the model's blocks (residual, inverted-residual, dense, inception, transformer
layers, ViT encoder blocks, LSTM/GRU layers) and the weight layers outside them (stem,
embeddings, classifier, output layer), as far as they run in an eval-mode forward of the
probe: :func:`default_layers` states the rule, ``docs/default_layers.md`` lists what it picks
for torchvision's models and ``nn.Transformer*``. The recorder applies it on the probe's
first batch (:meth:`~ActivationRecorder.order_layers`, or its first record).
"""
from __future__ import annotations

import collections
import fnmatch
import logging
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Type, Union

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .blocks import _NOT_WEIGHT_LAYERS, _PURE_CONTAINERS, _has_params, _listing, is_block
from .inputs import Inputs, _check_call, first_tensor, model_inputs, to_model
from .order import LayerOrderWarning, _modes_and_hooks_restored, _survey, _Survey

logger = logging.getLogger(__name__)

LayerSpec = Union[str, Type[nn.Module]]


def _choose(model: nn.Module, *, ran: Optional[Callable[[str], bool]] = None,
            usable: Optional[Callable[[str], bool]] = None,
            merges: Optional[Callable[[str], bool]] = None) -> List[str]:
    """The default layers by the rule of :func:`default_layers`, in registration order.

    ``ran(name)``: the module (or one inside it) ran in the traced forward; ``usable(name)``:
    it ran exactly once and its output has one row per probe input; ``merges(name)``: its
    forward uses a tensor twice (skip, branches, gating). ``None``: not known (the structural
    rule: no traced forward)."""
    modules = dict(model.named_modules())

    def children(name: str) -> List[str]:
        return [f"{name}.{c}" if name else c for c, _ in modules[name].named_children()]

    # blocks bottom-up: a named block; or an unnamed module that merges and holds fewer than
    # two blocks (a block with one squeeze-excitation inside is one block; an encoder of
    # several layers is not one)
    inner: Dict[str, int] = {}  # outermost blocks inside a module

    def blocks_in(name: str) -> int:
        if name in inner:
            return inner[name]
        count = 0
        for c in children(name):
            if ran is not None and not ran(c):
                continue
            count += 1 if is_block_(c) else blocks_in(c)
        inner[name] = count
        return count

    decided: Dict[str, bool] = {}

    def is_block_(name: str) -> bool:
        if name not in decided:
            m = modules[name]
            decided[name] = is_block(m) or (
                merges is not None and not isinstance(m, _PURE_CONTAINERS) and bool(children(name))
                and _has_params(m) and blocks_in(name) < 2 and merges(name))
        return decided[name]

    chosen: List[str] = []

    def visit(name: str) -> None:
        for c in children(name):
            m = modules[c]
            if (ran is not None and not ran(c)) or not _has_params(m):
                continue
            leaf = not any(True for _ in m.children())
            if leaf and isinstance(m, _NOT_WEIGHT_LAYERS):
                continue
            if leaf or is_block_(c):
                if usable is None or usable(c):
                    chosen.append(c)
                    continue
            if not leaf:
                visit(c)

    visit("")
    return chosen


def default_layers(model: nn.Module, example_input: Any = None, *,
                   device: Optional[Union[str, torch.device]] = None) -> List[str]:
    """The model's blocks: what :class:`ActivationRecorder` records and
    :func:`svcca_torch.freeze.default_layer_groups` groups by default, for any architecture.

    If the model declares them as a ``layer_names`` attribute (a list of module names, as
    :mod:`svcca_torch.models` do: block outputs after BatchNorm and ReLU), those. Otherwise
    the rule, walking the module tree from the top (the model itself is never one layer):

    * a **block** is recorded whole and not entered: a module of :data:`BLOCK_TYPES`
      (``nn.TransformerEncoderLayer``/``DecoderLayer``, ``nn.MultiheadAttention``, ``nn.LSTM``/
      ``GRU``/``RNN``), a class named like a block (:func:`is_block`: residual ``BasicBlock``/
      ``Bottleneck``, ``InvertedResidual``, ``MBConv``/``FusedMBConv``, ``_DenseBlock``,
      ``Inception*``, ViT's ``EncoderBlock``, ``CNBlock``, ``SwinTransformerBlock``, ...), or,
      with ``example_input``, an unnamed module whose traced forward uses a tensor more than
      once (a skip connection, parallel branches, gating such as squeeze-excitation: SqueezeNet's
      ``Fire``) and that holds fewer than two blocks;
    * outside blocks, every **weight layer** is recorded: a module without submodules that
      has parameters (convolution, linear, ``nn.Embedding``, ...), except normalisation layers
      and ``nn.PReLU`` (their freeze group is the layer before them); so the stem convolution,
      the classifier's linear layers and the output layer;
    * other modules (containers such as ``nn.Sequential``, conv-norm-activation units, an
      encoder holding several blocks) are entered; parameter-free modules are skipped.

    With ``example_input`` (one batch of model input, e.g. two probe inputs) the rule is
    applied to what one eval-mode forward of it actually runs (hooks on every module, eval +
    ``no_grad``, modes restored; a second forward with gradients enabled shows which unnamed
    modules merge): modules that do not run (GoogLeNet's auxiliary heads in eval mode, the
    layers inside a fused transformer fast path), run more than once (shared modules: the rule
    looks inside them instead) or whose output has no dimension of the batch size (a positional
    embedding) are left out, and the result is in forward order. Without it the structural rule
    (registration order, no forward) is returned; :class:`ActivationRecorder` applies the traced
    rule at its first :meth:`~ActivationRecorder.order_layers` or :meth:`~ActivationRecorder.record`.

    ``docs/default_layers.md`` lists what this picks for torchvision's classification models
    and ``nn.Transformer*`` (``python -m svcca_torch.experiments.default_layers_table``).
    """
    declared = _declared(model)
    if declared is not None:
        modules = dict(model.named_modules())
        unknown = [n for n in declared if n not in modules]
        if unknown:
            raise ValueError(f"`model.layer_names` lists {unknown}, which are not modules of the model.")
        return list(declared)
    if example_input is None:
        return _choose(model)
    inputs = to_model(model_inputs(example_input, model), model, torch.device(device) if device is not None else None)
    _check_call(model, inputs)
    try:
        survey = _survey(model, inputs)
    except Exception as err:  # any failure of the user's forward: the structural rule, say so
        warnings.warn(
            f"the default layers could not be traced ({type(err).__name__}: {err}); they are chosen without a "
            "forward, in registration order. Pass a valid example input.", LayerOrderWarning, stacklevel=2)
        return _choose(model)
    merge = _merging(model, inputs, survey)
    chosen = _choose(model, ran=survey.ran, usable=survey.usable, merges=merge.__contains__)
    return sorted(chosen, key=survey.exit_rank)


def _declared(model: nn.Module) -> Optional[List[str]]:
    """The model's own ``layer_names`` (a non-empty list of strings), else None."""
    declared = getattr(model, "layer_names", None)
    if isinstance(declared, (list, tuple)) and declared and all(isinstance(n, str) for n in declared):
        return list(declared)
    return None


def select_layers(model: nn.Module, layers: Optional[Sequence[LayerSpec]] = None) -> List[str]:
    """Resolve ``layers`` to module names of ``model``.

    The names keep the order given: entries in the order of ``layers``, and the modules a
    pattern or type matches in registration order (each name once, where first matched).
    Registration order need not be the order of the forward pass; :func:`forward_order`
    finds that one (the recorder applies it).

    Args:
        model: any ``nn.Module``.
        layers: ``None`` for :func:`default_layers` (its structural rule: no forward); else
            a sequence of exact module names (``"layer1.0"``), glob patterns (``"layer*.1"``,
            ``"features.*"``) and/or module types (``nn.Conv2d``), each of which must match at
            least one module.

    Raises:
        ValueError: a name or pattern or type matches nothing; the message lists the
            names that exist.
    """
    modules = dict(model.named_modules())
    modules.pop("", None)
    if layers is None:
        names = default_layers(model)
        if not names:
            raise ValueError(
                "`layers` is None and the model has no block or weight layer to record; pass `layers` "
                f"explicitly. Modules: {_listing(modules)}"
            )
        return names
    if isinstance(layers, (str, type)):
        layers = [layers]
    chosen: Dict[str, None] = {}  # insertion-ordered set
    for spec in layers:
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            hits = [n for n, m in modules.items() if isinstance(m, spec)]
            what = f"module type {spec.__name__}"
        elif isinstance(spec, str):
            hits = [spec] if spec in modules else fnmatch.filter(modules, spec)
            what = f"name {spec!r}"
        else:
            raise ValueError(
                f"`layers` entries must be module names, glob patterns or nn.Module types; got {spec!r}."
            )
        if not hits:
            raise ValueError(f"`layers`: {what} matches no module of the model. Modules: {_listing(modules)}")
        chosen.update(dict.fromkeys(hits))
    return list(chosen)


def _may_merge(model: nn.Module, survey: _Survey) -> bool:
    """Whether some unnamed module could be a block (worth a forward with gradients)."""
    modules = dict(model.named_modules())
    return any(n and not is_block(m) and not isinstance(m, _PURE_CONTAINERS) and any(True for _ in m.children())
               and survey.calls.get(n) == 1 for n, m in modules.items())


def _merging(model: nn.Module, inputs: Inputs, survey: _Survey) -> set:
    """Names of the unnamed modules (not a block by :func:`is_block`, not an ``nn.Sequential``)
    whose forward uses a tensor more than once: a skip connection, parallel branches, gating.
    Found from the autograd graph of one eval-mode forward with gradients enabled (floating
    inputs made to require grad); empty when that forward fails."""
    modules = dict(model.named_modules())
    candidates = [n for n in survey.calls if n and survey.calls[n] == 1 and not is_block(modules[n])
                  and not isinstance(modules[n], _PURE_CONTAINERS) and any(True for _ in modules[n].children())
                  and _has_params(modules[n])]
    if not candidates:
        return set()
    starts: Dict[str, List[Any]] = {}
    ends: Dict[str, Any] = {}
    keep: List[Any] = []

    def pre(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            if name in starts:
                return
            ts = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            starts[name] = [t.grad_fn if t.grad_fn is not None else t for t in ts if t.requires_grad]
            keep.extend(ts)
        return hook

    def post(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            t = first_tensor(output) if not isinstance(output, PackedSequence) else output.data
            if name not in ends and t is not None and t.grad_fn is not None:
                ends[name] = t.grad_fn
                keep.append(t)
        return hook

    def run() -> None:
        x = inputs.map(lambda t: t.detach().clone().requires_grad_(True) * 1 if t.is_floating_point() else t)
        keep.append(x)
        x.call(model)

    handles = []
    try:
        mods = {n: modules[n] for n in candidates}
        for n, m in mods.items():
            handles.append(m.register_forward_pre_hook(pre(n), with_kwargs=True))
        _modes_and_hooks_restored(model, {n: post(n) for n in candidates}, run, grad=True)
    except Exception as err:  # the choice then falls back to named blocks
        logger.info("default layers: the forward with gradients failed (%s: %s); unnamed blocks are not sought",
                    type(err).__name__, err)
        return set()
    finally:
        for h in handles:
            h.remove()
    out = set()
    for name in candidates:
        if name in ends and _fans_out(ends[name], starts.get(name, [])):
            out.add(name)
    return out


def _fans_out(end: Any, starts: Sequence[Any]) -> bool:
    """Whether the autograd graph from ``end`` back to the module's inputs (``starts``: their
    grad_fn nodes, or leaf tensors) uses some tensor more than once (parameters excepted)."""
    stop = {id(s) for s in starts if not isinstance(s, torch.Tensor)}
    leaves = {id(s) for s in starts if isinstance(s, torch.Tensor)}
    uses: Dict[int, int] = collections.Counter()
    seen = set()
    stack = [end]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in stop:
            continue
        for nxt, _ in getattr(node, "next_functions", ()):
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:  # AccumulateGrad: a parameter (not counted) or a leaf input (counted)
                if id(var) in leaves:
                    uses[id(nxt)] += 1
                continue
            uses[id(nxt)] += 1
            stack.append(nxt)
        if len(seen) > 200_000:  # a graph this large is not one block's
            return False
    return any(c > 1 for c in uses.values())
