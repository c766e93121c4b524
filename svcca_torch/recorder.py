"""Capture what chosen layers compute on a fixed probe set, with forward hooks.

:class:`ActivationRecorder` works on any ``nn.Module`` (no tracing of the graph): it hooks
the chosen modules, runs the probe set in eval mode under ``no_grad``, and returns one
``(datapoints, neurons)`` tensor per layer, all describing the *same* datapoints so that a
layers x layers similarity matrix is meaningful.

Which layers
------------
By default the model's blocks (residual, inverted-residual, dense, inception, transformer
layers, ViT encoder blocks, LSTM/GRU layers) and the weight layers outside them (stem,
embeddings, classifier, output layer), as far as they run in an eval-mode forward of the
probe: :func:`default_layers` states the rule, ``docs/default_layers.md`` lists what it picks
for torchvision's models and ``nn.Transformer*``. The recorder applies it on the probe's
first batch (:meth:`~ActivationRecorder.order_layers`, or its first record).

Model inputs
------------
A probe is a tensor ``(N, ...)``; or one set of several inputs, a tuple of tensors (called
``model(*inputs)``) or a dict of tensors (``model(**inputs)``), all with the same first
dimension ``N`` and sliced alike into batches; or a DataLoader/iterable of batches, each read
by :func:`model_inputs`. A batch that does not fit the forward's parameters is an error
naming them.

Layer order
-----------
Layers are ordered by the order the forward pass reaches them (their depth), not by the
order the modules were registered: :func:`forward_order` finds it with one traced forward
of an example batch (hooks noting each module's first call, eval + ``no_grad``, modes
restored). The recorder orders :attr:`ActivationRecorder.layers` at its first full
:meth:`~ActivationRecorder.record` (its own forward is the trace) or earlier with
:meth:`~ActivationRecorder.order_layers` / ``example_input=`` (needed before the first
capture by anything built bottom-up on the layers, e.g.
:func:`svcca_torch.freeze.default_layer_groups`). If the traced forward fails, the given
order (registration order for the default layers) is kept, with a :class:`LayerOrderWarning`.

Where the work runs
-------------------
Probe batches go to the model's device; the hooks pool each batch's maps there and keep
only the pooled maps (no per-batch copy to the CPU); the fold and subsample also run there,
and :meth:`~ActivationRecorder.record` returns float32 tensors on that device
(``out_device="cpu"`` for the CPU). Peak device memory is one batch's forward plus the
pooled maps of the whole probe (``N * C * h * w`` float32 per layer).

How layers of different shapes are brought to datapoints
--------------------------------------------------------
* Conv maps ``(N, C, H, W)``: while the probe runs, each batch's map is average-pooled
  (or bilinearly resized, ``resize="interpolate"``) to at most ``grid x grid``.
  With ``rows="common"`` (default) every conv layer is then brought to the *smallest* of
  those grids over all the recorder's layers (so a net whose last map is 1x1 ends on 1x1,
  also in a capture of a subset of the layers: a layer's rows do not depend on which other
  layers a capture records), and its positions are folded
  into datapoints with :func:`svcca_torch.conv_to_datapoints`: ``(N * h * w, C)``, row
  ``i`` of every layer is the same (image, grid cell), as layers x layers heatmaps need.
  With ``rows="per_layer"`` each conv layer keeps its own grid (up to ``grid``), so a deep
  1x1 map does not reduce every other layer to one datapoint per image; rows then match
  only within a layer (over checkpoints: same-layer comparisons such as similarity to the
  previous or the final capture), and :attr:`ActivationRecorder.layer_datapoint_index`
  gives each layer's row -> image map.
  With ``max_datapoints`` the rows are subsampled (per layer) with a fixed ``seed``; the
  subsample depends only on ``(N, h, w, max_datapoints, seed)``, so the same rows are kept
  at every checkpoint.
  Effect: pooling to a coarse grid keeps each channel's response per image region and
  drops finer spatial detail; SVCCA between conv layers then compares region-level
  features (the paper's own approach for maps of different sizes is to resize them).
* Token sequences ``(N, L, D)`` (transformer layers, embeddings, an LSTM's output sequence;
  sequence first ``(L, N, D)`` found when dim 1, not dim 0, is the batch size, an ambiguous
  output an error that says to name it in ``layouts``): L tokens of D neurons, each token a
  datapoint as conv positions are. While the probe runs, each input keeps ``max_tokens``
  (default ``grid * grid``) of its real tokens, evenly spaced and the first one included (a
  padding mask, a nested-tensor or ``PackedSequence`` output's lengths exclude padding), so
  the same tokens at every capture and in every layer of that length. With ``rows="common"``
  token layers that hold the same tokens share rows (input, token) and dense layers are
  repeated per token; when token layers hold different tokens, or conv maps are recorded too,
  no position is common to all layers and every layer gives one row per input (conv maps
  averaged over their grid, sequences over their real tokens). With ``rows="per_layer"`` each
  token layer has its own (input, token) rows. ``max_datapoints`` subsamples them as it does
  conv cells. Channels-last maps ``(N, H, W, C)`` (Swin) are treated as conv maps once found
  (a linear layer or LayerNorm runs last in the module) or named ``"NHWC"``.
* Dense outputs ``(N, features)`` (and any other shape, flattened to ``(N, -1)``): when
  conv layers are folded to ``h * w > 1`` common cells, each image's dense row is repeated
  for its cells, so that row ``i`` still means the same datapoint. A dense layer cannot vary
  within an image, so its similarity to a conv layer is capped by how much of that conv
  layer's variance lies between images rather than within them; comparisons among dense
  layers, or of a layer with itself over training, are unaffected. Use ``grid=1`` (global
  average pooling, ``N`` datapoints) when conv-to-dense comparisons matter more than
  datapoints. With ``rows="per_layer"`` a dense layer has ``N`` rows, one per image.
  :func:`direction_limits` counts a repeated row once (distinct datapoints).

:attr:`ActivationRecorder.datapoint_index` maps each returned row to its probe image, so
labels can be lined up with the rows (``labels[recorder.datapoint_index]``).

Partial captures
----------------
``record(probe, layers=subset)`` hooks only ``subset`` and, once the layer order is known,
ends each batch's forward as soon as the last of them has run (the rest of the network is
not computed): a capture of the lowest layers costs only the bottom of the network.
:attr:`ActivationRecorder.last_seconds` is the wall time of the last capture.
"""
from __future__ import annotations

import collections
import fnmatch
import hashlib
import inspect
import itertools
import logging
import re
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .functional.conv import RESIZE_MODES, _fold, conv_datapoint_indices, resize_map
from .utils.validation import MIN_DATAPOINTS_PER_DIRECTION, check_choice, check_positive_int

logger = logging.getLogger(__name__)

LayerSpec = Union[str, Type[nn.Module]]

__all__ = [
    "ActivationRecorder",
    "BLOCK_TYPES",
    "Inputs",
    "LAYOUTS",
    "LayerOrderWarning",
    "MASK_NAMES",
    "ROW_MODES",
    "batch_inputs",
    "default_layers",
    "direction_limits",
    "first_tensor",
    "forward_order",
    "is_block",
    "is_residual_block",
    "model_inputs",
    "select_layers",
    "to_model",
]

# ---------------------------------------------------------------------------------- the default layers

#: Module types that are blocks whatever their class is called: transformer layers, attention
#: (whose ``out_proj`` is used through the functional attention, never called), recurrent layers.
BLOCK_TYPES: Tuple[Type[nn.Module], ...] = (
    nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention, nn.RNNBase)

#: Class names (leading underscores dropped) of blocks: residual, inverted-residual, MBConv,
#: dense, transformer-layer and inception modules (torchvision's, timm's and Hugging Face's
#: naming). ``Inception3``, the whole network, does not match.
_BLOCK_NAME = re.compile(r"(Block|Bottleneck|InvertedResidual|MBConv|Layer|Residual)$|^Inception(Aux|[A-Z])?$")

#: Normalisation layers: never a default layer of their own (their group is the layer before them).
NORM_TYPES: Tuple[Type[nn.Module], ...] = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm,
                                           nn.LocalResponseNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
#: Parametric leaves that are not weight layers of their own (kept with the layer before them).
_NOT_WEIGHT_LAYERS: Tuple[Type[nn.Module], ...] = NORM_TYPES + (nn.PReLU,)
#: Containers whose forward is a chain by construction (or that have none).
_PURE_CONTAINERS: Tuple[Type[nn.Module], ...] = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def is_residual_block(module: nn.Module) -> bool:
    """Whether ``module`` is a residual block: torchvision's ``BasicBlock``/``Bottleneck``
    or any module whose class name ends in ``Block`` or ``Bottleneck``, or that has a
    ``shortcut``/``downsample`` attribute (the usual names of the skip path)."""
    name = type(module).__name__
    if name.endswith("Block") or name.endswith("Bottleneck"):
        return True
    return hasattr(module, "shortcut") or hasattr(module, "downsample")


def is_block(module: nn.Module) -> bool:
    """Whether ``module`` is a block by what it is: one of :data:`BLOCK_TYPES`, a class named
    like a block (``...Block``, ``...Bottleneck``, ``...InvertedResidual``, ``...MBConv``,
    ``...Layer``, ``...Residual``, ``Inception``, ``InceptionA``-``E``, ``InceptionAux``, with or
    without leading underscores), or a module with a ``shortcut``/``downsample`` attribute.
    (:func:`default_layers` also finds unnamed blocks from the traced forward: see there.)"""
    if isinstance(module, BLOCK_TYPES):
        return True
    if _BLOCK_NAME.search(type(module).__name__.lstrip("_")):
        return True
    return hasattr(module, "shortcut") or hasattr(module, "downsample")


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


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


def _listing(modules: Dict[str, nn.Module], limit: int = 60) -> str:
    items = [f"{n} ({type(m).__name__})" for n, m in modules.items()]
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def first_tensor(output: Any) -> Optional[torch.Tensor]:
    """The first tensor in a module output (tensor, tuple/list, dict, nested), else None.
    A ``PackedSequence`` gives its padded data (batch first), so an ``nn.LSTM`` fed one gives
    its output sequence."""
    if isinstance(output, PackedSequence):
        return pad_packed_sequence(output, batch_first=True)[0]
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            t = first_tensor(item)
            if t is not None:
                return t
    if isinstance(output, dict):
        for item in output.values():
            t = first_tensor(item)
            if t is not None:
                return t
    return None


# ---------------------------------------------------------------------------------- model inputs

#: Dict keys taken as the model input of a dict batch, in this order of preference.
INPUT_KEYS: Tuple[str, ...] = ("x", "input", "inputs", "image", "images", "img", "pixel_values", "input_ids", "data")

#: Names of forward parameters taken as a padding mask ``(N, L)`` of the probe's sequences
#: (see :class:`ActivationRecorder`'s ``padding_mask``).
MASK_NAMES: Tuple[str, ...] = ("attention_mask", "padding_mask", "key_padding_mask", "src_key_padding_mask", "mask")


class Inputs:
    """One batch of model inputs, called as ``model(*args, **kwargs)``.

    Tensors with at least one dimension (in ``args`` and ``kwargs``) are the per-input
    values and share their first dimension (:attr:`rows`); anything else is passed as it is
    to every batch. :func:`model_inputs` builds one from a probe batch."""

    __slots__ = ("args", "kwargs")

    def __init__(self, args: Sequence[Any] = (), kwargs: Optional[Mapping[str, Any]] = None) -> None:
        self.args: Tuple[Any, ...] = tuple(args)
        self.kwargs: Dict[str, Any] = dict(kwargs or {})

    def _items(self) -> List[Tuple[str, Any]]:
        return [(f"input {i}", a) for i, a in enumerate(self.args)] + [(repr(k), v) for k, v in self.kwargs.items()]

    def tensors(self) -> List[torch.Tensor]:
        """The per-input tensors (at least one dimension), positional first."""
        return [v for _, v in self._items() if isinstance(v, torch.Tensor) and v.ndim > 0]

    @property
    def rows(self) -> int:
        """How many inputs the batch holds (the tensors' common first dimension)."""
        items = [(k, v) for k, v in self._items() if isinstance(v, torch.Tensor) and v.ndim > 0]
        if not items:
            raise ValueError(f"`probe` batch {self.describe()} holds no tensor with a batch dimension.")
        sizes = {int(v.shape[0]) for _, v in items}
        if len(sizes) > 1:
            raise ValueError(
                f"`probe`: the model inputs of one batch must share their first dimension (one row per probe input); "
                f"got {self.describe()}."
            )
        return sizes.pop()

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Inputs":
        """``fn`` applied to every per-input tensor."""
        def f(v: Any) -> Any:
            return fn(v) if isinstance(v, torch.Tensor) and v.ndim > 0 else v
        return Inputs([f(a) for a in self.args], {k: f(v) for k, v in self.kwargs.items()})

    def slice(self, start: int, stop: Optional[int] = None) -> "Inputs":
        """Inputs ``start:stop`` of the batch."""
        return self.map(lambda t: t[start:stop])

    def call(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)

    def first(self) -> Optional[torch.Tensor]:
        return first_tensor([*self.args, *self.kwargs.values()])

    def describe(self) -> str:
        def one(v: Any) -> str:
            if isinstance(v, torch.Tensor):
                return f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
            return type(v).__name__
        return "(" + ", ".join(f"{k}: {one(v)}" for k, v in self._items()) + ")"

    def __repr__(self) -> str:
        return f"Inputs{self.describe()}"


def _forward_signature(model: Optional[nn.Module]) -> Optional[inspect.Signature]:
    """The signature of ``model.forward`` (through wrappers whose forward is ``(*args,
    **kwargs)``: ``.module`` of DDP, ``._orig_mod`` of ``torch.compile``), else None."""
    seen = 0
    while model is not None and seen < 4:
        try:
            sig = inspect.signature(model.forward)
        except (TypeError, ValueError):
            return None
        kinds = {p.kind for p in sig.parameters.values()}
        if kinds and kinds <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
            inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
            if isinstance(inner, nn.Module):
                model, seen = inner, seen + 1
                continue
            return None
        return sig
    return None


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _positional_counts(sig: Optional[inspect.Signature]) -> Tuple[int, float]:
    """(required positional parameters, most positional arguments) of a forward."""
    if sig is None:
        return 1, float("inf")
    params = list(sig.parameters.values())
    required = sum(1 for p in params if p.kind in _POSITIONAL and p.default is inspect.Parameter.empty)
    most = float("inf") if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params) else \
        sum(1 for p in params if p.kind in _POSITIONAL)
    return required, most


def _dict_kwargs(batch: Mapping[str, Any], sig: Optional[inspect.Signature]) -> Optional[Dict[str, Any]]:
    """The entries of a dict batch that name parameters of the forward, when they cover every
    required one (then the forward takes them as keywords), else None."""
    if sig is None:
        return None
    params = [p for p in sig.parameters.values() if p.kind in (*_POSITIONAL, inspect.Parameter.KEYWORD_ONLY)]
    names = {p.name for p in params}
    required = {p.name for p in params if p.default is inspect.Parameter.empty}
    keys = [k for k in batch if k in names]
    if keys and required <= set(keys):
        return {k: batch[k] for k in keys}
    return None


def _same_rows(values: Sequence[Any]) -> bool:
    sizes = {int(v.shape[0]) for v in values if isinstance(v, torch.Tensor) and v.ndim > 0}
    return len(sizes) == 1 and all(isinstance(v, torch.Tensor) and v.ndim > 0 for v in values)


def model_inputs(batch: Any, model: Optional[nn.Module] = None) -> Inputs:
    """How one probe batch is passed to ``model``: :class:`Inputs` ``(args, kwargs)``.

    * a tensor: the one input, ``model(x)``;
    * a dict: its entries that name parameters of ``model.forward``, when they cover every
      required one, as keywords (``model(**inputs)``: ``{"input_ids": ..., "attention_mask":
      ..., "labels": ...}`` for ``forward(input_ids, attention_mask=None)`` passes the first
      two); else the value of the first of :data:`INPUT_KEYS` it has (else its only tensor);
    * a tuple/list: when the forward requires ``k >= 2`` positional inputs, its first ``k``
      elements (``(ids, mask, labels)`` for ``forward(ids, mask)``); else ``(inputs,
      targets, ...)``: its first element (itself a tensor, tuple or dict as above).
    Without ``model`` only the single-input readings apply."""
    if isinstance(batch, Inputs):
        return batch
    if isinstance(batch, torch.Tensor):
        return Inputs((batch,))
    sig = _forward_signature(model) if model is not None else None
    if isinstance(batch, Mapping):
        kwargs = _dict_kwargs(batch, sig)
        if kwargs is not None:
            return Inputs((), kwargs)
        required = [p.name for p in (sig.parameters.values() if sig is not None else ())
                    if p.kind in (*_POSITIONAL, inspect.Parameter.KEYWORD_ONLY) and p.default is inspect.Parameter.empty]
        if len(required) >= 2:
            raise ValueError(
                f"`probe`: a dict batch is passed by keyword to the model's forward{_signature_text(sig)}, which requires "
                f"{[k for k in required if k not in batch]} too; the batch has keys {list(batch)}. Name its entries "
                "as the forward's parameters."
            )
        return Inputs((batch_inputs(batch),))
    if isinstance(batch, (tuple, list)) and batch:
        required, _ = _positional_counts(sig)
        if required >= 2 and len(batch) >= required and all(isinstance(b, torch.Tensor) for b in batch[:required]):
            return Inputs(batch[:required])
        if isinstance(batch[0], (tuple, list, Mapping)):
            return model_inputs(batch[0], model)
    return Inputs((batch_inputs(batch),))


def batch_inputs(batch: Any) -> torch.Tensor:
    """The (single) model input of one probe batch: a tensor as it is, the first element of an
    ``(inputs, targets, ...)`` tuple/list, or from a dict the value of the first of
    :data:`INPUT_KEYS` it has (else its only tensor value). :func:`model_inputs` also reads
    batches of several inputs."""
    if isinstance(batch, Mapping):
        key = next((k for k in INPUT_KEYS if k in batch), None)
        if key is None:
            tensors = [k for k, v in batch.items() if isinstance(v, torch.Tensor)]
            if len(tensors) != 1:
                raise ValueError(
                    f"`probe` yields dict batches with keys {list(batch)}; name the model input one of "
                    f"{list(INPUT_KEYS)}, or name them as the parameters of the model's forward (they are then "
                    "passed as keywords), or yield (inputs, targets) tuples."
                )
            key = tensors[0]
        batch = batch[key]
    elif isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise ValueError(
            f"`probe` batches must be tensors, (inputs, targets) tuples or dicts; got {type(batch).__name__}."
        )
    return batch


def _input_set(probe: Any, model: Optional[nn.Module]) -> Optional[Inputs]:
    """A probe that is itself one set of model inputs (to be cut into batches): a tuple/list of
    tensors with the same first dimension that the forward takes positionally (it requires
    two or more, or it is a tuple and the forward takes that many), or a dict of tensors; None
    for an iterable of batches."""
    if isinstance(probe, Inputs):
        return probe
    sig = _forward_signature(model) if model is not None else None
    if isinstance(probe, Mapping):
        if not probe:
            raise ValueError("`probe` is an empty dict: pass the model inputs as {name: tensor (N, ...)}.")
        inputs = model_inputs(probe, model)
        inputs.rows  # noqa: B018  (same first dimension, else a ValueError naming the shapes)
        return inputs
    if isinstance(probe, (tuple, list)) and len(probe) >= 2 and all(isinstance(t, torch.Tensor) for t in probe):
        required, most = _positional_counts(sig)
        if len(probe) <= most and (required >= 2 or (isinstance(probe, tuple) and most >= len(probe))):
            inputs = Inputs(probe)
            if not _same_rows(probe):
                raise ValueError(
                    f"`probe`: a {type(probe).__name__} of tensors is read as the model's {len(probe)} positional "
                    f"inputs (its forward takes them), and they must share their first dimension (one row per "
                    f"probe input); got {inputs.describe()}."
                )
            return inputs
    return None


def _iter_probe(probe: Any, batch_size: int, model: Optional[nn.Module] = None) -> Iterator[Inputs]:
    """Batches of model inputs (:class:`Inputs`) from a tensor (split along dim 0), one set of
    inputs (a tuple/list/dict of tensors, see :func:`_input_set`, sliced along dim 0) or an
    iterable of batches (each read by :func:`model_inputs`)."""
    if isinstance(probe, torch.Tensor):
        if probe.ndim == 0 or probe.shape[0] == 0:
            raise ValueError(f"`probe` must hold at least one input along dim 0, got shape {tuple(probe.shape)}.")
        for t in probe.split(batch_size):
            yield Inputs((t,))
        return
    whole = _input_set(probe, model)
    if whole is not None:
        n = whole.rows
        if n == 0:
            raise ValueError(f"`probe` holds no inputs: {whole.describe()}.")
        for start in range(0, n, batch_size):
            yield whole.slice(start, start + batch_size)
        return
    try:
        iterator = iter(probe)
    except TypeError:
        raise ValueError(
            f"`probe` must be a tensor of inputs, a tuple/dict of input tensors or a DataLoader/iterable of "
            f"batches, got {type(probe).__name__}."
        ) from None
    for batch in iterator:
        yield model_inputs(batch, model)


def _first_batch(probe: Any, batch_size: int, model: Optional[nn.Module]) -> Inputs:
    try:
        return next(iter(_iter_probe(probe, batch_size, model)))
    except StopIteration:
        raise ValueError("`probe` yielded no batches; pass at least one input.") from None


def to_model(x: Any, model: nn.Module, device: Optional[torch.device] = None) -> Any:
    """``x`` (a tensor or :class:`Inputs`) moved to ``device`` (default: the model's), floating
    tensors cast to the model's floating dtype (a float16/bfloat16 model gets float16/bfloat16
    inputs); integer and boolean tensors (token ids, masks) keep their dtype."""
    dtype = None
    for t in (*model.parameters(), *model.buffers()):
        if device is None:
            device = t.device
        if t.is_floating_point():
            dtype = t.dtype
            break

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

    return x.map(move) if isinstance(x, Inputs) else move(x)


def _signature_text(sig: inspect.Signature) -> str:
    """``(ids, mask=..., *args, **kwargs)``: the parameters without annotations."""
    parts = []
    for p in sig.parameters.values():
        prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(p.kind, "")
        parts.append(prefix + p.name + ("=..." if p.default is not inspect.Parameter.empty else ""))
    return "(" + ", ".join(parts) + ")"


def _check_call(model: nn.Module, inputs: Inputs) -> None:
    """A clear error, before the forward, when the batch does not fit ``model.forward``'s
    parameters (instead of the forward's own TypeError)."""
    sig = _forward_signature(model)
    if sig is None:
        return
    try:
        sig.bind(*inputs.args, **inputs.kwargs)
    except TypeError as err:
        raise ValueError(
            f"the model's forward{_signature_text(sig)} cannot take the probe batch {inputs.describe()} ({err}). A forward with "
            "several inputs takes a probe that is a tuple of tensors (positional) or a dict of tensors (keywords, "
            "named as the forward's parameters), all with the same first dimension, or a DataLoader yielding such "
            "batches; a tuple batch (a, b, ...) is (inputs, targets) unless the forward requires two or more "
            "positional inputs."
        ) from None


#: ``rows`` settings of :class:`ActivationRecorder`.
ROW_MODES: Tuple[str, ...] = ("common", "per_layer")

#: Output layouts a layer can be named with (``layouts=``): conv maps ``"NCHW"`` (PyTorch's) or
#: ``"NHWC"`` (channels last, as Swin's blocks return), token sequences ``"NLD"`` (batch first)
#: or ``"LND"`` (sequence first, ``batch_first=False``), ``"ND"`` (anything else: one row per
#: input, flattened).
LAYOUTS: Tuple[str, ...] = ("NCHW", "NHWC", "NLD", "LND", "ND")


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


def _reiterable(probe: Any) -> bool:
    """Whether iterating ``probe`` twice gives the data twice (not a one-shot iterator)."""
    if isinstance(probe, (torch.Tensor, Mapping)):
        return True
    try:
        return iter(probe) is not probe
    except TypeError:
        return False


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


def _distinct_rows(t: torch.Tensor) -> int:
    """Rows of ``t`` (datapoints first) not equal to the row before them: the datapoints a
    recording holds when a layer's rows are repeated (a dense layer's row for each of its
    input's conv cells or tokens, in common rows)."""
    if t.ndim != 2 or t.shape[0] < 2:
        return int(t.shape[0])
    return 1 + int((t[1:] != t[:-1]).any(1).sum())


def direction_limits(acts: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """The most SVD directions each recorded layer's datapoints support: distinct
    datapoints ``//`` :data:`~svcca_torch.utils.validation.MIN_DATAPOINTS_PER_DIRECTION`
    (at least 1).

    Keeping more directions than this makes CCA report spuriously high similarity (the
    few-datapoints warning). ``acts`` is a :meth:`ActivationRecorder.record` result,
    ``{layer: (datapoints, neurons)}``; with ``rows="per_layer"`` each layer has its own
    datapoints, so its own limit. A row equal to the row before it (a dense layer's row
    repeated for each conv cell or token of its input in common rows) is not counted again.
    Pass a layer's limit as its ``max_directions``."""
    return {n: max(1, _distinct_rows(t) // MIN_DATAPOINTS_PER_DIRECTION) for n, t in acts.items()}


class _Tokens:
    """A token layer's kept rows: ``x`` ``(N, T, D)`` (T token slots per input), ``pos``
    ``(N, T)`` the token position each slot holds (-1: an empty slot, the input has fewer
    real tokens), ``mean`` ``(N, D)`` the mean of each input's real tokens."""

    __slots__ = ("x", "pos", "mean")

    def __init__(self, x: torch.Tensor, pos: torch.Tensor, mean: torch.Tensor) -> None:
        self.x, self.pos, self.mean = x, pos, mean

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.x.shape)

    def signature(self) -> str:
        """Digest of the kept positions: token layers with equal ones hold the same tokens."""
        p = self.pos.cpu().contiguous()
        return hashlib.sha1(str(tuple(p.shape)).encode() + p.numpy().tobytes()).hexdigest()


def _token_rows(t: torch.Tensor, valid: Optional[torch.Tensor], slots: int) -> _Tokens:
    """At most ``slots`` tokens of each input of ``t`` ``(n, L, D)``, evenly spaced over its
    real tokens (``valid`` ``(n, L)``: True for a real token; None: all are), first token
    included: a fixed choice, the same at every capture and in every layer of that length."""
    n, length, d = t.shape
    device = t.device
    if valid is None:
        v = torch.full((n,), length, dtype=torch.long, device=device)
    else:
        valid = valid.to(device=device, dtype=torch.bool)
        v = valid.sum(1)
    k = v.clamp(max=slots)
    j = torch.arange(slots, device=device)
    ok = j[None] < k[:, None]
    rank = (j[None] * v[:, None]) // k.clamp(min=1)[:, None]
    if valid is None:
        pos = rank
    else:
        pos = torch.searchsorted(valid.long().cumsum(1), rank + 1)
    pos = torch.where(ok, pos.clamp(max=max(length - 1, 0)), torch.full_like(pos, -1))
    x = t.gather(1, pos.clamp(min=0)[..., None].expand(n, slots, d)) * ok[..., None]
    if valid is None:
        mean = t.mean(1)
    else:
        mean = (t * valid[..., None]).sum(1) / v.clamp(min=1)[:, None]
    return _Tokens(x, pos, mean)


def _channels_first_1d(module: nn.Module) -> bool:
    """A module whose 3-d output is ``(N, C, L)`` (a 1-d convolution's), not tokens: it is or
    holds a 1-d convolution and nothing that works on ``(N, L, D)`` sequences."""
    convs = (nn.Conv1d, nn.ConvTranspose1d)
    mods = list(module.modules())
    if not any(isinstance(m, convs) for m in mods):
        return False
    return not any(isinstance(m, (nn.Linear, nn.Embedding, nn.RNNBase, nn.MultiheadAttention, nn.LayerNorm))
                   for m in mods)


class ActivationRecorder:
    """Record chosen layers' outputs on a probe set, as ``(datapoints, neurons)`` tensors.

    Args:
        model: any ``nn.Module``. It is not modified: hooks exist only during
            :meth:`record`, and every module's own train/eval mode is restored afterwards.
        layers: which modules to record; see :func:`select_layers`. Default: the model's
            blocks and the weight layers outside them, as far as they run in an eval-mode
            forward of the probe (:func:`default_layers`, applied at the first
            :meth:`order_layers` or :meth:`record`, or ``example_input``); the choice is
            logged and available as :attr:`layers`, in forward order once traced.
        grid: largest side of the spatial grid conv maps are pooled to (default 2). With
            ``rows="common"`` the grid used is the smallest of ``min(grid, H)`` x
            ``min(grid, W)`` over the recorded conv layers; with ``rows="per_layer"`` each
            layer's own. See the module docstring for the effect.
        resize: ``"avgpool"`` (adaptive average pooling) or ``"interpolate"`` (bilinear).
        max_datapoints: cap on the rows returned per layer (fixed-seed subsample of the
            (input, cell or token) rows); ``None`` keeps all.
        seed: seed of that subsample.
        batch_size: batch size used when the probe is a tensor or a tuple/dict of tensors.
        device: where the probe batches are sent (default: the model's device).
        rows: ``"common"`` (default: the same rows for every layer, for layers x layers
            comparisons) or ``"per_layer"`` (each layer its own cells or tokens, for
            same-layer comparisons over training); :meth:`record` can override it.
        out_device: where :meth:`record` returns its tensors (default ``None``: the device
            the model ran on); :meth:`record` can override it.
        example_input: one batch of model input; if given, :attr:`layers` is chosen (default
            layers) and put in forward order now (:meth:`order_layers`).
        max_tokens: token positions kept per input of a sequence layer (default ``grid *
            grid``, as many as conv cells), evenly spaced over its real tokens.
        layouts: ``{layer: layout}`` for outputs whose layout is not found on its own, from
            :data:`LAYOUTS`: ``"LND"`` for a sequence-first layer whose sequence length equals
            the batch size, ``"NHWC"`` for a channels-last map the traced forward does not
            reveal, ``"ND"`` to flatten.
        padding_mask: which probe input marks padding tokens, ``(N, L)``: the name of a forward
            parameter (or dict key), a position in the inputs, or a callable taking the
            batch's inputs as the forward does and returning the mask; ``None`` (default): the
            forward parameter named as one of :data:`MASK_NAMES`, if any; ``False``: none. A
            boolean mask marks padding with True (PyTorch's ``key_padding_mask``), any other
            marks real tokens with nonzero values (Hugging Face's ``attention_mask``).
            Outputs of that sequence length keep only real tokens; nested-tensor outputs (the
            fused ``nn.TransformerEncoder`` path) and ``PackedSequence`` outputs carry their
            own lengths.

    Memory: while recording, each layer keeps ``N * C * h * w`` float32 values (the pooled
    maps; tokens: ``N * (max_tokens + 1) * D``) on the model's device, never the
    full-resolution maps or sequences of the whole probe set.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Optional[Sequence[LayerSpec]] = None,
        *,
        grid: int = 2,
        resize: str = "avgpool",
        max_datapoints: Optional[int] = None,
        seed: int = 0,
        batch_size: int = 256,
        device: Optional[Union[str, torch.device]] = None,
        rows: str = "common",
        out_device: Optional[Union[str, torch.device]] = None,
        example_input: Any = None,
        max_tokens: Optional[int] = None,
        layouts: Optional[Mapping[str, str]] = None,
        padding_mask: Union[None, bool, str, int, Callable[..., torch.Tensor]] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        grid = check_positive_int(grid, "grid")
        check_choice(resize, "resize", RESIZE_MODES)
        check_choice(rows, "rows", ROW_MODES)
        if max_datapoints is not None:
            max_datapoints = check_positive_int(max_datapoints, "max_datapoints", minimum=2)
        batch_size = check_positive_int(batch_size, "batch_size")
        self.max_tokens = grid * grid if max_tokens is None else check_positive_int(max_tokens, "max_tokens")
        modules = dict(model.named_modules())
        layouts = dict(layouts or {})
        for name, layout in layouts.items():
            if name not in modules or not name:
                raise ValueError(f"`layouts`: {name!r} is not a module of the model. Modules: {_listing(modules)}")
            check_choice(layout, f"layouts[{name!r}]", LAYOUTS)
        if not (padding_mask is None or padding_mask is False or isinstance(padding_mask, (str, int))
                or callable(padding_mask)) or padding_mask is True:
            raise ValueError(
                "`padding_mask` must be None (found by name), False (none), the name or position of the probe input "
                f"holding the mask, or a callable returning it; got {padding_mask!r}."
            )
        self.model = model
        self.layers: List[str] = select_layers(model, layers)
        #: whether :attr:`layers` is in traced forward order (else the order given).
        self.ordered = False
        # default layers are chosen on a traced forward of the probe (what runs, what merges)
        self._resolved = layers is not None or _declared(model) is not None
        self.grid = grid
        self.resize = resize
        self.max_datapoints = max_datapoints
        self.seed = seed
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else None
        self.rows = rows
        self.out_device = torch.device(out_device) if out_device is not None else None
        self.padding_mask = padding_mask
        #: Each recorded layer's output layout (:data:`LAYOUTS`): as given in ``layouts=``, else as
        #: found (a 3-d output is sequence first when its dim 1, not dim 0, is the batch size).
        self.layouts: Dict[str, str] = layouts
        self._given_layouts = set(layouts)
        #: Row -> probe input index (``(datapoints,)`` long, CPU) of the last common-rows result.
        self.datapoint_index: Optional[torch.Tensor] = None
        #: ``(h, w)`` grid conv layers were folded on in the last common-rows result (None: no conv
        #: map on its own grid; ``(1, T)`` when the rows are T token slots of every input).
        self.conv_grid: Optional[Tuple[int, int]] = None
        #: Per layer, row -> probe input index (CPU long) of the last per-layer-rows result.
        self.layer_datapoint_index: Dict[str, torch.Tensor] = {}
        #: Per layer, the ``(h, w)`` grid of the last per-layer-rows result ((1, 1) for dense
        #: layers, ``(1, max_tokens)`` token slots for sequence layers).
        self.layer_grids: Dict[str, Tuple[int, int]] = {}
        #: Wall time in seconds of the last :meth:`record` / :meth:`record_both` (None before).
        self.last_seconds: Optional[float] = None
        #: Whether the last capture ended the forward passes early (after its last needed layer).
        self.last_stopped_early = False
        # each layer's pooled grid (None: not a conv map), known once a full forward has run;
        # the common grid is the smallest over all layers, also when a capture records a subset
        self._grids: Dict[str, Optional[Tuple[int, int]]] = {}
        # token layers: digest of the kept token positions (None: a token layer, positions unknown yet),
        # and the positions of each digest (a capture of dense layers alone still gets the token rows)
        self._token_sigs: Dict[str, Optional[str]] = {}
        self._token_pos: Dict[str, torch.Tensor] = {}
        logger.info("ActivationRecorder records %d layers: %s", len(self.layers), ", ".join(self.layers))
        if example_input is not None:
            self.order_layers(example_input)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={self.layers}, grid={self.grid}, resize={self.resize!r}, "
            f"max_datapoints={self.max_datapoints}, seed={self.seed}, rows={self.rows!r}, "
            f"max_tokens={self.max_tokens}, layouts={self.layouts})"
        )

    # ------------------------------------------------------------------ layer choice and order
    def order_layers(self, probe: Any) -> List[str]:
        """Choose the default layers (if :attr:`layers` was not given), put :attr:`layers` in
        the order the forward pass reaches them and return it.

        One traced forward of ``probe``'s first batch (a tensor probe: its first
        ``batch_size`` inputs; or one batch, tuple or dict as a DataLoader yields), eval +
        ``no_grad``, modes restored, with hooks on every module: the default layers are
        those :func:`default_layers` finds in it (plus one forward with gradients enabled
        when unnamed modules need checking for skip connections). Call it before building
        anything bottom-up on :attr:`layers` (freeze groups) if no :meth:`record` has run yet.
        A forward that raises leaves the layers and order given, with a
        :class:`LayerOrderWarning`.

        Raises:
            ValueError: a recorded layer did not run, or ran more than once (a shared
                module) in the traced forward: it cannot be recorded; or the batch does
                not fit the model's forward (its parameters are named).
        """
        batch = to_model(_first_batch(probe, self.batch_size, self.model), self.model, self.device)
        _check_call(self.model, batch)
        try:
            survey = _survey(self.model, batch)
            if not self._resolved:
                merge = _merging(self.model, batch, survey) if self._may_merge(survey) else set()
                chosen = _choose(self.model, ran=survey.ran, usable=survey.usable, merges=merge.__contains__)
                if chosen:
                    self.layers = sorted(chosen, key=survey.exit_rank)
                    logger.info("ActivationRecorder: default layers (traced): %s", ", ".join(self.layers))
        except Exception as err:
            self._resolved = True
            warnings.warn(
                f"the forward order of the recorded layers could not be traced ({type(err).__name__}: {err}); "
                f"they keep the order given: {self.layers}.",
                LayerOrderWarning,
                stacklevel=2,
            )
            return list(self.layers)
        self._resolved = True
        unknown = [n for n in self.layouts if n not in self.layers]
        if unknown:
            raise ValueError(f"`layouts` names {unknown}, which are not recorded; recorded layers: {self.layers}.")
        self._check_calls({n: survey.calls.get(n, 0) for n in self.layers})
        self._set_order([n for n in survey.names if n in set(self.layers)])
        modules = dict(self.model.named_modules())
        for n in self.layers:
            shape = survey.shapes.get(n)
            if shape is None:
                continue
            if n not in self.layouts and len(shape) == 4 and survey.channels_last(n):
                self.layouts[n] = "NHWC"
            layout = self._layout(n, modules[n], shape, survey.n, strict=False)
            if layout in ("NCHW", "NHWC"):
                h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
                self._grids[n] = (min(self.grid, h), min(self.grid, w))
            elif layout is not None:
                self._grids[n] = None
                if layout in ("NLD", "LND"):
                    self._token_sigs.setdefault(n, None)
        return list(self.layers)

    def _may_merge(self, survey: _Survey) -> bool:
        """Whether some unnamed module could be a block (worth a forward with gradients)."""
        modules = dict(self.model.named_modules())
        return any(n and not is_block(m) and not isinstance(m, _PURE_CONTAINERS) and any(True for _ in m.children())
                   and survey.calls.get(n) == 1 for n, m in modules.items())

    def _check_calls(self, calls: Dict[str, int]) -> None:
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

    def _set_order(self, order: List[str]) -> None:
        if order != self.layers:
            logger.info("ActivationRecorder: layers in forward order: %s", ", ".join(order))
        self.layers = list(order)
        self.ordered = True

    def _resolve(self, probe: Any) -> Any:
        """Choose the default layers on the probe's first batch if not done yet; the probe to
        iterate (a one-shot iterator with its first batch put back)."""
        if self._resolved:
            return probe
        if _reiterable(probe) or _input_set(probe, self.model) is not None:
            self.order_layers(probe)
            return probe
        iterator = iter(probe)
        try:
            first = next(iterator)
        except StopIteration:
            raise ValueError("`probe` yielded no batches; pass at least one input.") from None
        self.order_layers([first])
        return itertools.chain([first], iterator)

    # ------------------------------------------------------------------ layouts
    def _layout(self, name: str, module: nn.Module, shape: Tuple[int, ...], n: int, *, strict: bool) -> Optional[str]:
        """The layout of layer ``name``'s output of ``shape`` on a batch of ``n`` inputs (see
        :data:`LAYOUTS`), remembered once found. ``strict``: an output that cannot be told
        apart (both leading dims equal the batch size) or has no batch dimension is an error;
        else None (a traced batch of two inputs decides nothing)."""
        layout = self.layouts.get(name)
        if layout is not None:
            if strict:
                self._check_layout(name, layout, shape, n)
            return layout
        nd = len(shape)
        if nd == 4:
            layout = "NCHW"
        elif nd == 3 and not _channels_first_1d(module):
            first, second = shape[0] == n, shape[1] == n
            if first and second:
                if not strict:
                    return None
                raise ValueError(
                    f"layer {name!r} returns {tuple(shape)} on a batch of {n} inputs: both of its first two dimensions "
                    f"equal the batch size, so whether it is batch first (N, L, D) or sequence first (L, N, D) cannot "
                    f"be told. Name it: ActivationRecorder(..., layouts={{{name!r}: 'NLD'}}) (or 'LND' for sequence "
                    "first), or use a batch size different from the sequence length."
                )
            if not first and not second:
                if not strict:
                    return None
                raise ValueError(
                    f"layer {name!r} returns {tuple(shape)} on a batch of {n} inputs: neither of its first two "
                    "dimensions is the batch size, so it has no row per probe input; record another layer."
                )
            layout = "NLD" if first else "LND"
        else:
            layout = "ND"
        if strict:
            self._check_layout(name, layout, shape, n)
        self.layouts[name] = layout
        return layout

    def _check_layout(self, name: str, layout: str, shape: Tuple[int, ...], n: int) -> None:
        nd = {"NCHW": 4, "NHWC": 4, "NLD": 3, "LND": 3}.get(layout)
        batch_dim = 1 if layout == "LND" else 0
        ok = (nd is None or len(shape) == nd) and len(shape) > batch_dim and shape[batch_dim] == n
        if not ok:
            given = " (as named in `layouts`)" if name in self._given_layouts else ""
            raise ValueError(
                f"layer {name!r} returns {tuple(shape)} on a batch of {n} inputs, which is not layout {layout!r}"
                f"{given}: its {'dim 1' if batch_dim else 'dim 0'} must be the batch size"
                + (f" and it must have {nd} dimensions" if nd else "") + ". Name its layout with `layouts=` ("
                + ", ".join(LAYOUTS) + ")."
            )

    def _padding(self, x: Inputs, n: int) -> Optional[torch.Tensor]:
        """The batch's padding mask ``(n, L)``, True for padding (see ``padding_mask``)."""
        spec = self.padding_mask
        if spec is False:
            return None
        if callable(spec) and not isinstance(spec, (str, int)):
            mask = spec(*x.args, **x.kwargs)
        elif isinstance(spec, int):
            mask = x.args[spec] if -len(x.args) <= spec < len(x.args) else None
            if mask is None:
                raise ValueError(f"`padding_mask`={spec}: the probe batch {x.describe()} has no input {spec}.")
        else:
            values: Dict[str, Any] = {}
            sig = _forward_signature(self.model)
            if sig is not None:
                try:
                    bound = sig.bind_partial(*x.args, **x.kwargs).arguments
                except TypeError:
                    bound = {}
                for k, v in bound.items():
                    if isinstance(v, dict) and sig.parameters[k].kind is inspect.Parameter.VAR_KEYWORD:
                        values.update(v)
                    else:
                        values[k] = v
            values.update(x.kwargs)
            if isinstance(spec, str):
                if spec not in values:
                    raise ValueError(
                        f"`padding_mask`={spec!r} names no input of the probe batch {x.describe()} (the model's forward"
                        f"{_signature_text(sig) if sig is not None else ' has no readable signature'})."
                    )
                mask = values[spec]
            else:
                mask = next((values[k] for k in MASK_NAMES if isinstance(values.get(k), torch.Tensor)
                             and values[k].ndim == 2 and values[k].shape[0] == n), None)
                if mask is None:
                    return None
        if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[0] != n:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"`padding_mask` must be an (N, L) = ({n}, L) tensor of the batch; got {got}.")
        return mask if mask.dtype == torch.bool else mask == 0

    # ------------------------------------------------------------------ capture
    def _subset(self, layers: Optional[Sequence[str]]) -> List[str]:
        if layers is None:
            return list(self.layers)
        if isinstance(layers, str):
            layers = [layers]
        unknown = [n for n in layers if n not in self.layers]
        if unknown:
            raise ValueError(
                f"`layers`: {unknown} are not recorded by this recorder; choose among {self.layers}."
            )
        if not layers:
            raise ValueError("`layers` is empty; name at least one recorded layer (or None for all).")
        wanted = set(layers)
        return [n for n in self.layers if n in wanted]

    def _keep(self, name: str, module: nn.Module, output: Any, state: Dict[str, Any]) -> Any:
        """What is kept of one batch's output of layer ``name``: a pooled map ``(n, C, h, w)``,
        a dense ``(n, D)`` or :class:`_Tokens`."""
        t, lengths = _unpadded(output)
        if t is None:
            raise ValueError(f"layer {name!r} returned no tensor ({type(output).__name__}); it cannot be recorded.")
        t = t.detach()
        n = state["n"]
        layout = self._layout(name, module, tuple(t.shape), n, strict=True)
        if layout in ("NCHW", "NHWC"):
            if layout == "NHWC":
                t = t.permute(0, 3, 1, 2)
            size = (min(self.grid, t.shape[2]), min(self.grid, t.shape[3]))
            kept = resize_map(t.float(), size, self.resize)
        elif layout in ("NLD", "LND"):
            if layout == "LND":
                t = t.transpose(0, 1)
            valid = None
            if lengths is not None:
                valid = torch.arange(t.shape[1])[None] < lengths[:, None]
            else:
                pad = state["pad"]
                if pad is not None and pad.shape[1] == t.shape[1]:
                    valid = ~pad
            return _token_rows(t.float(), valid, self.max_tokens)
        else:
            kept = (t.flatten(1) if t.ndim > 1 else t[:, None]).float()
        if kept.data_ptr() == t.data_ptr():
            # a later in-place op (ReLU(inplace=True)) must not change what we keep
            kept = kept.clone()
        return kept

    def _make_hook(self, name: str, store: Dict[str, List[Any]], calls: Dict[str, int],
                   state: Dict[str, Any]) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            calls[name] += 1
            if calls[name] > 1:
                raise ValueError(
                    f"layer {name!r} ({type(module).__name__}) ran more than once in one forward pass "
                    "(a shared module): its output is ambiguous. Record a module that runs once."
                )
            store[name].append(self._keep(name, module, output, state))  # stays on the model's device
            if state["first"]:
                state["order"].append(name)
            state["fired"] += 1
            if state["stop_early"] and state["fired"] == len(calls):
                raise _StopForward

        return hook

    def _run(self, probe: Any, layers: Optional[Sequence[str]]) -> Dict[str, Any]:
        """Forward the probe batch by batch; ``{layer: pooled maps (N, C, h, w), dense (N, D)
        or _Tokens}`` on the model's device, in forward order."""
        probe = self._resolve(probe)
        names = self._subset(layers)
        full = len(names) == len(self.layers)
        if not full and not self.ordered and _reiterable(probe):
            # one traced batch first: the order (so this capture can stop early) and every
            # layer's grid (so the common rows are those of a full capture)
            self.order_layers(probe)
        captured: Dict[str, List[Any]] = {n: [] for n in names}
        calls: Dict[str, int] = {n: 0 for n in names}
        # early stop only once a full forward has shown every layer runs exactly once
        state: Dict[str, Any] = {"first": True, "order": [], "fired": 0, "stop_early": self.ordered,
                                 "stopped": False, "n": 0, "pad": None, "total": 0}
        self.datapoint_index, self.conv_grid = None, None
        self.layer_datapoint_index, self.layer_grids = {}, {}

        def run() -> None:
            for batch in _iter_probe(probe, self.batch_size, self.model):
                x = to_model(batch, self.model, self.device)
                if state["first"]:
                    _check_call(self.model, x)
                for n in calls:
                    calls[n] = 0
                state["fired"] = 0
                state["n"] = x.rows
                state["pad"] = self._padding(x, state["n"])
                try:
                    x.call(self.model)
                except _StopForward:
                    state["stopped"] = True
                self._check_calls(calls)
                state["total"] += state["n"]
                state["first"] = False

        hooks = {n: self._make_hook(n, captured, calls, state) for n in names}
        _modes_and_hooks_restored(self.model, hooks, run)
        if state["first"]:
            raise ValueError("`probe` yielded no batches; pass at least one input.")
        order: List[str] = state["order"]
        if full and not self.ordered:
            self._set_order(order)
        self.last_stopped_early = state["stopped"]
        out: Dict[str, Any] = {}
        for n in order:
            pieces = captured.pop(n)
            kinds = {type(p) for p in pieces} | {p.ndim for p in pieces if isinstance(p, torch.Tensor)}
            if len(kinds) > 2 or (len(kinds) == 2 and _Tokens in kinds):
                raise ValueError(f"layer {n!r} returned outputs of different kinds in different batches: "
                                 f"{[p.shape for p in pieces]}.")
            if isinstance(pieces[0], _Tokens):
                t: Any = _Tokens(torch.cat([p.x for p in pieces]), torch.cat([p.pos for p in pieces]),
                                 torch.cat([p.mean for p in pieces]))
                self._grids[n] = None
                self._token_sigs[n] = t.signature()
                self._token_pos[self._token_sigs[n]] = t.pos.cpu()
            else:
                t = torch.cat(pieces)
                self._grids[n] = (int(t.shape[2]), int(t.shape[3])) if t.ndim == 4 else None
                self._token_sigs.pop(n, None)
            if t.shape[0] != state["total"]:
                raise ValueError(f"layer {n!r} returned {t.shape[0]} rows but the probe has {state['total']} inputs.")
            out[n] = t
        return out

    def record(self, probe: Any, *, layers: Optional[Sequence[str]] = None, rows: Optional[str] = None,
               out_device: Optional[Union[str, torch.device]] = None) -> Dict[str, torch.Tensor]:
        """Run ``probe`` through the model and return ``{layer name: (datapoints, neurons)}``.

        Args:
            probe: a tensor of model inputs (split into ``batch_size`` batches); one set of
                several inputs, a tuple of tensors (positional, for a forward that takes them)
                or a dict of tensors (keywords named as the forward's parameters), all with the
                same first dimension (sliced alike); or a DataLoader/iterable yielding input
                tensors, ``(inputs, targets)`` batches or dict batches (see
                :func:`model_inputs`), any batch size. Use the same probe, in the same order,
                at every checkpoint.
            layers: record only these layers (names in :attr:`layers`); default all. Each
                batch's forward stops as soon as the last of them has run. If the layer
                order is not known yet (no full record or :meth:`order_layers` so far),
                one batch is traced first (not possible for a one-shot iterator probe:
                call :meth:`order_layers` first, else that capture runs whole forwards).
            rows: ``"common"`` (same rows for every layer) or ``"per_layer"`` (each layer
                its own cells or tokens); default the recorder's ``rows``.
            out_device: where the result goes (default: the recorder's ``out_device``,
                else the device the model ran on).

        Returns:
            A dict ordered by the layers' execution order in the forward pass (their depth),
            each value a float32 tensor ``(datapoints, neurons)``; see the module docstring
            for how conv maps ``(N, C, H, W)`` and token sequences ``(N, L, D)`` become
            datapoints. With common rows every layer has the same rows and
            :attr:`datapoint_index` gives each row's probe input; with per-layer rows,
            :attr:`layer_datapoint_index` and :attr:`layer_grids` do, per layer.
            :attr:`last_seconds` is this call's wall time.

        The model runs in eval mode under ``torch.no_grad``; afterwards every module's own
        train/eval flag is restored and every hook removed, also if the forward raises.
        """
        rows = self.rows if rows is None else check_choice(rows, "rows", ROW_MODES)
        t0 = time.perf_counter()
        maps = self._run(probe, layers)
        out = self._assemble(maps, rows, out_device)
        self._stop_clock(out, t0)
        return out

    def record_both(self, probe: Any, *, layers: Optional[Sequence[str]] = None,
                    out_device: Optional[Union[str, torch.device]] = None
                    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """``(common-rows result, per-layer-rows result)`` of :meth:`record` from one pass
        over the probe (for a capture that feeds both a layers x layers heatmap and
        same-layer comparisons). Sets :attr:`datapoint_index`, :attr:`conv_grid`,
        :attr:`layer_datapoint_index` and :attr:`layer_grids`."""
        t0 = time.perf_counter()
        maps = self._run(probe, layers)
        per_layer = self._assemble(dict(maps), "per_layer", out_device)
        common = self._assemble(maps, "common", out_device)
        self._stop_clock(common, t0)
        return common, per_layer

    def _stop_clock(self, out: Dict[str, torch.Tensor], t0: float) -> None:
        devices = {t.device for t in out.values() if t.device.type == "cuda"}
        for d in devices:  # kernels are asynchronous: count them in the wall time
            torch.cuda.synchronize(d)
        self.last_seconds = time.perf_counter() - t0

    def _fold_map(self, t: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """:func:`svcca_torch.conv_to_datapoints` of a pooled float32 map ``(N, C, h, w)``
        without its input check: the map is valid by construction, and a NaN/Inf in it is
        reported by whatever compares the layer, which knows its name (a tracker: the step
        too), instead of here as an anonymous ``x``."""
        if size is not None:
            t = resize_map(t, size, self.resize)
        n, _, h, w = t.shape
        return _fold(t, conv_datapoint_indices(n, (h, w), max_datapoints=self.max_datapoints, seed=self.seed))

    def _subsample(self, rows: torch.Tensor) -> torch.Tensor:
        """The fixed-seed ``max_datapoints`` subsample of candidate row ids (sorted, CPU)."""
        kept = conv_datapoint_indices(int(rows.shape[0]), (1, 1), max_datapoints=self.max_datapoints, seed=self.seed)
        return rows if kept is None else rows[kept]

    def _common_mode(self, maps: Dict[str, Any]) -> str:
        """How the common rows are formed: ``"conv"`` (conv cells, today's fold; also when
        nothing has positions), ``"tokens"`` (token slots shared by every token layer) or
        ``"input"`` (one row per input: conv maps and token sequences both recorded, or token
        layers holding different tokens)."""
        known = all(n in self._grids for n in self.layers)
        relevant = [n for n in self.layers if n in maps or (known and n in self._grids)]
        tokens = [n for n in relevant if n in self._token_sigs]
        if not tokens:
            return "conv"
        convs = [n for n in relevant if self._grids.get(n) is not None]
        sigs = {self._token_sigs[n] for n in tokens} - {None}
        here = [maps[n].pos for n in maps if isinstance(maps[n], _Tokens)]
        same = all(p.shape == here[0].shape and torch.equal(p, here[0]) for p in here[1:])
        if convs or len(sigs) > 1 or not same:
            return "input"
        if not here:  # dense layers alone: the token rows of an earlier capture of this probe, if any
            n_images = next(iter(maps.values())).shape[0]
            pos = self._token_pos.get(next(iter(sigs))) if sigs else None
            if pos is None or pos.shape[0] != n_images:
                return "input"
        return "tokens"

    def _assemble(self, maps: Dict[str, Any], rows: str,
                  out_device: Optional[Union[str, torch.device]]) -> Dict[str, torch.Tensor]:
        """Fold the kept outputs into ``(datapoints, neurons)``; consumes ``maps``."""
        target = torch.device(out_device) if out_device is not None else self.out_device
        n_images = next(iter(maps.values())).shape[0]
        out: Dict[str, torch.Tensor] = {}

        def put(n: str, t: torch.Tensor) -> None:
            out[n] = t.to(target).contiguous() if target is not None else t.contiguous()

        if rows == "common":
            mode = self._common_mode(maps)
            if mode == "tokens":
                pos = next((m.pos for m in maps.values() if isinstance(m, _Tokens)), None)
                if pos is None:  # dense layers alone: the token rows of the earlier full capture
                    known = {self._token_sigs[n] for n in self.layers if self._token_sigs.get(n)}
                    pos = self._token_pos[known.pop()]
                slots = int(pos.shape[1])
                ids = self._subsample((pos >= 0).flatten().nonzero()[:, 0].cpu())
                index = ids // slots
                self.datapoint_index = index
                self.conv_grid = (1, slots) if bool((pos >= 0).all()) else None
                for n in list(maps):
                    t = maps.pop(n)
                    if isinstance(t, _Tokens):
                        t = t.x.reshape(-1, t.x.shape[2])[ids.to(t.x.device)]
                    else:
                        t = t[index.to(t.device)]
                    put(n, t)
                return out
            if mode == "input":
                index = self._subsample(torch.arange(n_images))
                self.datapoint_index = index
                self.conv_grid = (1, 1)
                for n in list(maps):
                    t = maps.pop(n)
                    if isinstance(t, _Tokens):
                        t = t.mean
                    elif t.ndim == 4:
                        t = resize_map(t, (1, 1), self.resize).flatten(1)
                    put(n, t[index.to(t.device)])
                return out
            known = all(n in self._grids for n in self.layers)
            convs = [g for n, g in self._grids.items() if g is not None and (n in maps or known)]
            if convs:
                h, w = min(g[0] for g in convs), min(g[1] for g in convs)
                self.conv_grid = (h, w)
            else:
                h = w = 1
                self.conv_grid = None
            kept = conv_datapoint_indices(n_images, (h, w), max_datapoints=self.max_datapoints, seed=self.seed)
            if kept is None:
                kept = torch.arange(n_images * h * w)
            index = kept // (h * w)
            self.datapoint_index = index
            for n in list(maps):
                t = maps.pop(n)
                if t.ndim == 4:
                    t = self._fold_map(t, (h, w))
                else:
                    t = t[index.to(t.device)]
                put(n, t)
            return out
        for n in list(maps):
            t = maps.pop(n)
            if isinstance(t, _Tokens):
                slots = int(t.pos.shape[1])
                ids = self._subsample((t.pos >= 0).flatten().nonzero()[:, 0].cpu())
                self.layer_grids[n] = (1, slots)
                self.layer_datapoint_index[n] = ids // slots
                put(n, t.x.reshape(-1, t.x.shape[2])[ids.to(t.x.device)])
                continue
            h, w = (int(t.shape[2]), int(t.shape[3])) if t.ndim == 4 else (1, 1)
            kept = conv_datapoint_indices(n_images, (h, w), max_datapoints=self.max_datapoints, seed=self.seed)
            if t.ndim == 4:
                t = self._fold_map(t)
            elif kept is not None:
                t = t[kept.to(t.device)]
            if kept is None:
                kept = torch.arange(n_images * h * w)
            self.layer_grids[n] = (h, w)
            self.layer_datapoint_index[n] = kept // (h * w)
            put(n, t)
        return out
