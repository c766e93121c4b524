"""Capture what chosen layers compute on a fixed probe set, with forward hooks.

:class:`ActivationRecorder` works on any ``nn.Module`` (no tracing of the graph): it hooks
the chosen modules, runs the probe set in eval mode under ``no_grad``, and returns one
``(datapoints, neurons)`` tensor per layer, all describing the *same* datapoints so that a
layers x layers similarity matrix is meaningful.

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
* Dense outputs ``(N, features)`` (and any other shape, flattened to ``(N, -1)``): when
  conv layers are folded to ``h * w > 1`` common cells, each image's dense row is repeated
  for its cells, so that row ``i`` still means the same datapoint. A dense layer cannot vary
  within an image, so its similarity to a conv layer is capped by how much of that conv
  layer's variance lies between images rather than within them; comparisons among dense
  layers, or of a layer with itself over training, are unaffected. Use ``grid=1`` (global
  average pooling, ``N`` datapoints) when conv-to-dense comparisons matter more than
  datapoints. With ``rows="per_layer"`` a dense layer has ``N`` rows, one per image.

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

import fnmatch
import logging
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from .functional.conv import RESIZE_MODES, _fold, conv_datapoint_indices, resize_map
from .utils.validation import MIN_DATAPOINTS_PER_DIRECTION, check_choice, check_positive_int

logger = logging.getLogger(__name__)

LayerSpec = Union[str, Type[nn.Module]]

__all__ = [
    "ActivationRecorder",
    "LayerOrderWarning",
    "ROW_MODES",
    "batch_inputs",
    "default_layers",
    "direction_limits",
    "first_tensor",
    "forward_order",
    "is_residual_block",
    "select_layers",
    "to_model",
]

#: Module types recorded by default (outside residual blocks).
DEFAULT_TYPES: Tuple[Type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def is_residual_block(module: nn.Module) -> bool:
    """Whether ``module`` is a residual block: torchvision's ``BasicBlock``/``Bottleneck``
    or any module whose class name ends in ``Block`` or ``Bottleneck``, or that has a
    ``shortcut``/``downsample`` attribute (the usual names of the skip path)."""
    name = type(module).__name__
    if name.endswith("Block") or name.endswith("Bottleneck"):
        return True
    return hasattr(module, "shortcut") or hasattr(module, "downsample")


def default_layers(model: nn.Module) -> List[str]:
    """The layers a user expects to see for a CNN or ResNet.

    If the model declares them as a ``layer_names`` attribute (a list of module names, as
    :mod:`svcca_torch.models` do: block outputs after BatchNorm and ReLU), those. Otherwise,
    in registration order, every residual block's output plus every convolution and linear
    layer that is not inside a residual block (inside a block, a conv output is
    pre-normalisation and pre-skip, not a representation the network passes on).
    """
    declared = getattr(model, "layer_names", None)
    if isinstance(declared, (list, tuple)) and declared and all(isinstance(n, str) for n in declared):
        modules = dict(model.named_modules())
        unknown = [n for n in declared if n not in modules]
        if unknown:
            raise ValueError(f"`model.layer_names` lists {unknown}, which are not modules of the model.")
        return list(declared)
    chosen: List[str] = []
    inside: List[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if is_residual_block(module):
            chosen.append(name)
            inside.append(name)
        elif isinstance(module, DEFAULT_TYPES):
            chosen.append(name)
    return chosen


def select_layers(model: nn.Module, layers: Optional[Sequence[LayerSpec]] = None) -> List[str]:
    """Resolve ``layers`` to module names of ``model``.

    The names keep the order given: entries in the order of ``layers``, and the modules a
    pattern or type matches in registration order (each name once, where first matched).
    Registration order need not be the order of the forward pass; :func:`forward_order`
    finds that one (the recorder applies it).

    Args:
        model: any ``nn.Module``.
        layers: ``None`` for :func:`default_layers`; else a sequence of exact module names
            (``"layer1.0"``), glob patterns (``"layer*.1"``, ``"features.*"``) and/or module
            types (``nn.Conv2d``), each of which must match at least one module.

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
                "`layers` is None and the model has no convolution, linear layer or residual "
                f"block to record; pass `layers` explicitly. Modules: {_listing(modules)}"
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
    """The first tensor in a module output (tensor, tuple/list, dict, nested), else None."""
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


#: Dict keys taken as the model input of a dict batch, in this order of preference.
INPUT_KEYS: Tuple[str, ...] = ("x", "input", "inputs", "image", "images", "img", "pixel_values", "input_ids", "data")


def batch_inputs(batch: Any) -> torch.Tensor:
    """The model input of one probe batch: a tensor as it is, the first element of an
    ``(inputs, targets, ...)`` tuple/list, or from a dict the value of the first of
    :data:`INPUT_KEYS` it has (else its only tensor value)."""
    if isinstance(batch, dict):
        key = next((k for k in INPUT_KEYS if k in batch), None)
        if key is None:
            tensors = [k for k, v in batch.items() if isinstance(v, torch.Tensor)]
            if len(tensors) != 1:
                raise ValueError(
                    f"`probe` yields dict batches with keys {list(batch)}; name the model input one of "
                    f"{list(INPUT_KEYS)} (or yield (inputs, targets) tuples)."
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


def _iter_probe(probe: Any, batch_size: int) -> Iterable[torch.Tensor]:
    """Batches of model input from a tensor (split along dim 0) or an iterable of batches
    (see :func:`batch_inputs`)."""
    if isinstance(probe, torch.Tensor):
        if probe.ndim == 0 or probe.shape[0] == 0:
            raise ValueError(f"`probe` must hold at least one input along dim 0, got shape {tuple(probe.shape)}.")
        yield from probe.split(batch_size)
        return
    try:
        iterator = iter(probe)
    except TypeError:
        raise ValueError(
            f"`probe` must be a tensor of inputs or a DataLoader/iterable of batches, got {type(probe).__name__}."
        ) from None
    for batch in iterator:
        yield batch_inputs(batch)


def to_model(x: torch.Tensor, model: nn.Module, device: Optional[torch.device] = None) -> torch.Tensor:
    """``x`` moved to ``device`` (default: the model's), a floating ``x`` cast to the model's
    floating dtype (a float16/bfloat16 model gets float16/bfloat16 inputs)."""
    dtype = None
    for t in (*model.parameters(), *model.buffers()):
        if device is None:
            device = t.device
        if t.is_floating_point():
            dtype = t.dtype
            break
    return x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else None)


#: ``rows`` settings of :class:`ActivationRecorder`.
ROW_MODES: Tuple[str, ...] = ("common", "per_layer")


class LayerOrderWarning(UserWarning):
    """The forward order of the layers could not be traced; a fallback order is used."""


class _StopForward(BaseException):
    # BaseException, not Exception: a model's own `except Exception` must not swallow it
    """Raised by a recorder hook once every layer a capture needs has run."""


def _modes_and_hooks_restored(model: nn.Module, hooks: Dict[str, Callable], run: Callable[[], None]) -> None:
    """Register ``hooks`` (module name -> forward hook), run ``run()`` with ``model`` in eval
    mode under ``no_grad``, then remove the hooks and restore every module's train/eval
    flag, also if ``run`` raises."""
    modules = dict(model.named_modules())
    modes = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for name, hook in hooks.items():
            handles.append(modules[name].register_forward_hook(hook))
        model.eval()
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode


def _trace(model: nn.Module, names: Sequence[str], batch: torch.Tensor, device: Optional[torch.device],
           stop_early: bool) -> Tuple[List[str], Dict[str, int], Dict[str, Optional[Tuple[int, int]]]]:
    """One forward of ``batch``: the order in which ``names`` are first called, how often
    each was called, and each one's spatial size ``(H, W)`` (None: not a 4-d map).
    ``stop_early``: the forward ends once all have run."""
    order: List[str] = []
    calls = {n: 0 for n in names}
    sizes: Dict[str, Optional[Tuple[int, int]]] = {}

    def make(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            calls[name] += 1
            if calls[name] == 1:
                order.append(name)
                t = first_tensor(output)
                sizes[name] = (int(t.shape[2]), int(t.shape[3])) if t is not None and t.ndim == 4 else None
                if stop_early and len(order) == len(calls):
                    raise _StopForward

        return hook

    def run() -> None:
        try:
            model(to_model(batch, model, device))
        except _StopForward:
            pass

    _modes_and_hooks_restored(model, {n: make(n) for n in names}, run)
    return order, calls, sizes


def _reiterable(probe: Any) -> bool:
    """Whether iterating ``probe`` twice gives the data twice (not a one-shot iterator)."""
    if isinstance(probe, torch.Tensor):
        return True
    try:
        return iter(probe) is not probe
    except TypeError:
        return False


def _example_batch(example_input: Any) -> torch.Tensor:
    return example_input if isinstance(example_input, torch.Tensor) else batch_inputs(example_input)


def forward_order(model: nn.Module, names: Sequence[str], example_input: Any, *,
                  device: Optional[Union[str, torch.device]] = None) -> List[str]:
    """``names`` (module names of ``model``) in the order the forward pass reaches them.

    Runs ``model`` once on ``example_input`` (one batch: a tensor, an ``(inputs, targets)``
    tuple or a dict batch, see :func:`batch_inputs`) in eval mode under ``no_grad``, with a
    forward hook on each named module noting when its output is first computed (so a
    module nested in another one comes before it); the forward stops as soon as every
    named module has run. Every module's train/eval flag is restored and every hook
    removed afterwards, also on error. Nothing about the model is changed.

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
        batch = _example_batch(example_input)
        order, _, _ = _trace(model, names, batch, torch.device(device) if device is not None else None,
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


def direction_limits(acts: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """The most SVD directions each recorded layer's datapoints support: ``rows //``
    :data:`~svcca_torch.utils.validation.MIN_DATAPOINTS_PER_DIRECTION` (at least 1).

    Keeping more directions than this makes CCA report spuriously high similarity (the
    few-datapoints warning). ``acts`` is a :meth:`ActivationRecorder.record` result,
    ``{layer: (datapoints, neurons)}``; with ``rows="per_layer"`` each layer has its own
    datapoints, so its own limit. Pass a layer's limit as its ``max_directions``."""
    return {n: max(1, int(t.shape[0]) // MIN_DATAPOINTS_PER_DIRECTION) for n, t in acts.items()}


class ActivationRecorder:
    """Record chosen layers' outputs on a probe set, as ``(datapoints, neurons)`` tensors.

    Args:
        model: any ``nn.Module``. It is not modified: hooks exist only during
            :meth:`record`, and every module's own train/eval mode is restored afterwards.
        layers: which modules to record; see :func:`select_layers`. Default: every residual
            block output plus every conv/linear layer outside residual blocks
            (:func:`default_layers`); the choice is logged and available as :attr:`layers`,
            which is put in forward order by the first full :meth:`record` (or
            :meth:`order_layers`, or ``example_input``).
        grid: largest side of the spatial grid conv maps are pooled to (default 2). With
            ``rows="common"`` the grid used is the smallest of ``min(grid, H)`` x
            ``min(grid, W)`` over the recorded conv layers; with ``rows="per_layer"`` each
            layer's own. See the module docstring for the effect.
        resize: ``"avgpool"`` (adaptive average pooling) or ``"interpolate"`` (bilinear).
        max_datapoints: cap on the rows returned per layer (fixed-seed subsample of the
            (image, cell) rows); ``None`` keeps all ``N * h * w``.
        seed: seed of that subsample.
        batch_size: batch size used when the probe is a tensor.
        device: where the probe batches are sent (default: the model's device).
        rows: ``"common"`` (default: the same rows for every layer, for layers x layers
            comparisons) or ``"per_layer"`` (each conv layer on its own grid, for
            same-layer comparisons over training); :meth:`record` can override it.
        out_device: where :meth:`record` returns its tensors (default ``None``: the device
            the model ran on); :meth:`record` can override it.
        example_input: one batch of model input; if given, :attr:`layers` is put in forward
            order now (:meth:`order_layers`).

    Memory: while recording, each layer keeps ``N * C * h * w`` float32 values (the pooled
    maps) on the model's device, never the full-resolution maps of the whole probe set.
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        grid = check_positive_int(grid, "grid")
        check_choice(resize, "resize", RESIZE_MODES)
        check_choice(rows, "rows", ROW_MODES)
        if max_datapoints is not None:
            max_datapoints = check_positive_int(max_datapoints, "max_datapoints", minimum=2)
        batch_size = check_positive_int(batch_size, "batch_size")
        self.model = model
        self.layers: List[str] = select_layers(model, layers)
        #: whether :attr:`layers` is in traced forward order (else the order given).
        self.ordered = False
        self.grid = grid
        self.resize = resize
        self.max_datapoints = max_datapoints
        self.seed = seed
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else None
        self.rows = rows
        self.out_device = torch.device(out_device) if out_device is not None else None
        #: Row -> probe image index (``(datapoints,)`` long, CPU) of the last common-rows result.
        self.datapoint_index: Optional[torch.Tensor] = None
        #: ``(h, w)`` grid conv layers were folded on in the last common-rows result (None: no conv).
        self.conv_grid: Optional[Tuple[int, int]] = None
        #: Per layer, row -> probe image index (CPU long) of the last per-layer-rows result.
        self.layer_datapoint_index: Dict[str, torch.Tensor] = {}
        #: Per layer, the ``(h, w)`` grid of the last per-layer-rows result ((1, 1) for dense layers).
        self.layer_grids: Dict[str, Tuple[int, int]] = {}
        #: Wall time in seconds of the last :meth:`record` / :meth:`record_both` (None before).
        self.last_seconds: Optional[float] = None
        #: Whether the last capture ended the forward passes early (after its last needed layer).
        self.last_stopped_early = False
        # each layer's pooled grid (None: not a conv map), known once a full forward has run;
        # the common grid is the smallest over all layers, also when a capture records a subset
        self._grids: Dict[str, Optional[Tuple[int, int]]] = {}
        logger.info("ActivationRecorder records %d layers: %s", len(self.layers), ", ".join(self.layers))
        if example_input is not None:
            self.order_layers(example_input)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={self.layers}, grid={self.grid}, resize={self.resize!r}, "
            f"max_datapoints={self.max_datapoints}, seed={self.seed}, rows={self.rows!r})"
        )

    # ------------------------------------------------------------------ layer order
    def order_layers(self, probe: Any) -> List[str]:
        """Put :attr:`layers` in the order the forward pass reaches them and return it.

        One traced forward of ``probe``'s first batch (a tensor probe: its first
        ``batch_size`` inputs; or one batch, tuple or dict as a DataLoader yields), eval +
        ``no_grad``, modes restored. Call it before building anything bottom-up on
        :attr:`layers` (freeze groups) if no :meth:`record` has run yet. A forward that
        raises leaves the order given, with a :class:`LayerOrderWarning`.

        Raises:
            ValueError: a recorded layer did not run, or ran more than once (a shared
                module) in the traced forward: it cannot be recorded.
        """
        if isinstance(probe, torch.Tensor):
            batch = next(iter(_iter_probe(probe, self.batch_size)))
        else:
            try:
                first = next(iter(probe))
            except TypeError:
                raise ValueError(
                    "`probe` must be a tensor of inputs or a DataLoader/iterable of batches, "
                    f"got {type(probe).__name__}."
                ) from None
            except StopIteration:
                raise ValueError("`probe` yielded no batches; pass at least one input.") from None
            batch = batch_inputs(first)
        try:
            order, calls, sizes = _trace(self.model, self.layers, batch, self.device, stop_early=False)
        except Exception as err:
            warnings.warn(
                f"the forward order of the recorded layers could not be traced ({type(err).__name__}: {err}); "
                f"they keep the order given: {self.layers}.",
                LayerOrderWarning,
                stacklevel=2,
            )
            return list(self.layers)
        self._check_calls(calls)
        self._set_order(order)
        self._grids = {n: None if hw is None else (min(self.grid, hw[0]), min(self.grid, hw[1]))
                       for n, hw in sizes.items()}
        return list(self.layers)

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

    def _make_hook(self, name: str, store: Dict[str, List[torch.Tensor]], calls: Dict[str, int],
                   state: Dict[str, Any]) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            calls[name] += 1
            if calls[name] > 1:
                raise ValueError(
                    f"layer {name!r} ({type(module).__name__}) ran more than once in one forward pass "
                    "(a shared module): its output is ambiguous. Record a module that runs once."
                )
            t = first_tensor(output)
            if t is None:
                raise ValueError(f"layer {name!r} returned no tensor ({type(output).__name__}); it cannot be recorded.")
            t = t.detach()
            if t.ndim == 4:
                size = (min(self.grid, t.shape[2]), min(self.grid, t.shape[3]))
                kept = resize_map(t.float(), size, self.resize)
            else:
                kept = (t.flatten(1) if t.ndim > 1 else t[:, None]).float()
            if kept.data_ptr() == t.data_ptr():
                # a later in-place op (ReLU(inplace=True)) must not change what we keep
                kept = kept.clone()
            store[name].append(kept)  # stays on the model's device
            if state["first"]:
                state["order"].append(name)
            state["fired"] += 1
            if state["stop_early"] and state["fired"] == len(calls):
                raise _StopForward

        return hook

    def _run(self, probe: Any, layers: Optional[Sequence[str]]) -> Dict[str, torch.Tensor]:
        """Forward the probe batch by batch; ``{layer: pooled maps (N, C, h, w) or (N, D)}``
        on the model's device, in forward order."""
        names = self._subset(layers)
        full = len(names) == len(self.layers)
        if not full and not self.ordered and _reiterable(probe):
            # one traced batch first: the order (so this capture can stop early) and every
            # layer's grid (so the common rows are those of a full capture)
            self.order_layers(probe)
        captured: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
        calls: Dict[str, int] = {n: 0 for n in names}
        # early stop only once a full forward has shown every layer runs exactly once
        state: Dict[str, Any] = {"first": True, "order": [], "fired": 0, "stop_early": self.ordered,
                                 "stopped": False}
        self.datapoint_index, self.conv_grid = None, None
        self.layer_datapoint_index, self.layer_grids = {}, {}

        def run() -> None:
            for batch in _iter_probe(probe, self.batch_size):
                for n in calls:
                    calls[n] = 0
                state["fired"] = 0
                try:
                    self.model(to_model(batch, self.model, self.device))
                except _StopForward:
                    state["stopped"] = True
                self._check_calls(calls)
                state["first"] = False

        hooks = {n: self._make_hook(n, captured, calls, state) for n in names}
        _modes_and_hooks_restored(self.model, hooks, run)
        if state["first"]:
            raise ValueError("`probe` yielded no batches; pass at least one input.")
        order: List[str] = state["order"]
        if full and not self.ordered:
            self._set_order(order)
        for n in order:
            t = captured[n][0]
            self._grids[n] = (int(t.shape[2]), int(t.shape[3])) if t.ndim == 4 else None
        self.last_stopped_early = state["stopped"]
        out: Dict[str, torch.Tensor] = {}
        for n in order:
            out[n] = torch.cat(captured.pop(n))
        n_images = next(iter(out.values())).shape[0]
        for n, t in out.items():
            if t.shape[0] != n_images:
                raise ValueError(f"layer {n!r} returned {t.shape[0]} rows but the probe has {n_images} inputs.")
        return out

    def record(self, probe: Any, *, layers: Optional[Sequence[str]] = None, rows: Optional[str] = None,
               out_device: Optional[Union[str, torch.device]] = None) -> Dict[str, torch.Tensor]:
        """Run ``probe`` through the model and return ``{layer name: (datapoints, neurons)}``.

        Args:
            probe: a tensor of model inputs (split into ``batch_size`` batches) or a
                DataLoader/iterable yielding input tensors, ``(inputs, targets)`` batches or
                dict batches, any batch size. Use the same probe, in the same order, at
                every checkpoint.
            layers: record only these layers (names in :attr:`layers`); default all. Each
                batch's forward stops as soon as the last of them has run. If the layer
                order is not known yet (no full record or :meth:`order_layers` so far),
                one batch is traced first (not possible for a one-shot iterator probe:
                call :meth:`order_layers` first, else that capture runs whole forwards).
            rows: ``"common"`` (same rows for every layer) or ``"per_layer"`` (each conv
                layer on its own grid); default the recorder's ``rows``.
            out_device: where the result goes (default: the recorder's ``out_device``,
                else the device the model ran on).

        Returns:
            A dict ordered by the layers' execution order in the forward pass (their depth),
            each value a float32 tensor ``(datapoints, neurons)``; see the module docstring
            for how conv maps are folded. With common rows every layer has the same rows and
            :attr:`datapoint_index` gives each row's probe image; with per-layer rows,
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

    def _assemble(self, maps: Dict[str, torch.Tensor], rows: str,
                  out_device: Optional[Union[str, torch.device]]) -> Dict[str, torch.Tensor]:
        """Fold the pooled maps into ``(datapoints, neurons)``; consumes ``maps``."""
        target = torch.device(out_device) if out_device is not None else self.out_device
        n_images = next(iter(maps.values())).shape[0]
        out: Dict[str, torch.Tensor] = {}
        if rows == "common":
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
                out[n] = t.to(target).contiguous() if target is not None else t.contiguous()
            return out
        for n in list(maps):
            t = maps.pop(n)
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
            out[n] = t.to(target).contiguous() if target is not None else t.contiguous()
        return out
