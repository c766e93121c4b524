"""Capture what chosen layers compute on a fixed probe set, with forward hooks.

:class:`ActivationRecorder` works on any ``nn.Module`` (no tracing): it hooks the chosen
modules, runs the probe set in eval mode under ``no_grad``, and returns one
``(datapoints, neurons)`` tensor per layer, all describing the *same* datapoints so that a
layers x layers similarity matrix is meaningful.

How layers of different shapes are brought to common datapoints
-----------------------------------------------------------------
* Conv maps ``(N, C, H, W)``: while the probe runs, each batch's map is average-pooled
  (or bilinearly resized, ``resize="interpolate"``) to at most ``grid x grid``; at the end
  every conv layer is brought to the *smallest* of those grids (so a net whose last map is
  1x1 ends on 1x1), and its positions are folded into datapoints with
  :func:`svcca_torch.conv_to_datapoints`: ``(N * h * w, C)``, row ``i`` of every layer is
  the same (image, grid cell). With ``max_datapoints`` the rows are subsampled with a
  fixed ``seed``; the subsample depends only on ``(N, h, w, max_datapoints, seed)``, so the
  same rows are kept at every checkpoint.
  Effect: pooling to a coarse grid keeps each channel's response per image region and
  drops finer spatial detail; SVCCA between conv layers then compares region-level
  features (the paper's own approach for maps of different sizes is to resize them).
* Dense outputs ``(N, features)`` (and any other shape, flattened to ``(N, -1)``): when
  conv layers are folded to ``h * w > 1`` cells, each image's dense row is repeated for its
  cells, so that row ``i`` still means the same datapoint. A dense layer cannot vary within
  an image, so its similarity to a conv layer is capped by how much of that conv layer's
  variance lies between images rather than within them; comparisons among dense layers,
  or of a layer with itself over training, are unaffected. Use ``grid=1`` (global average
  pooling, ``N`` datapoints) when conv-to-dense comparisons matter more than datapoints.

:attr:`ActivationRecorder.datapoint_index` maps each returned row to its probe image, so
labels can be lined up with the rows (``labels[recorder.datapoint_index]``).
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from .functional.conv import RESIZE_MODES, conv_datapoint_indices, conv_to_datapoints, resize_map
from .utils.validation import check_choice, check_positive_int

logger = logging.getLogger(__name__)

LayerSpec = Union[str, Type[nn.Module]]

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
    """Resolve ``layers`` to module names of ``model``, in registration order.

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
    wanted = set()
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
        wanted.update(hits)
    return [n for n in modules if n in wanted]


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


class ActivationRecorder:
    """Record chosen layers' outputs on a probe set, as ``(datapoints, neurons)`` tensors.

    Args:
        model: any ``nn.Module``. It is not modified: hooks exist only during
            :meth:`record`, and every module's own train/eval mode is restored afterwards.
        layers: which modules to record; see :func:`select_layers`. Default: every residual
            block output plus every conv/linear layer outside residual blocks
            (:func:`default_layers`); the choice is logged and available as :attr:`layers`.
        grid: largest side of the common spatial grid conv maps are pooled to (default 2);
            the grid used is the smallest of ``min(grid, H)`` x ``min(grid, W)`` over the
            recorded conv layers. See the module docstring for the effect.
        resize: ``"avgpool"`` (adaptive average pooling) or ``"interpolate"`` (bilinear).
        max_datapoints: cap on the rows returned per layer (fixed-seed subsample of the
            (image, cell) rows); ``None`` keeps all ``N * h * w``.
        seed: seed of that subsample.
        batch_size: batch size used when the probe is a tensor.
        device: where the probe batches are sent (default: the model's device).

    Memory: while recording, each layer keeps ``N * C * h * w`` float32 values on the CPU
    (the pooled maps), never the full-resolution maps of the whole probe set.
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        grid = check_positive_int(grid, "grid")
        check_choice(resize, "resize", RESIZE_MODES)
        if max_datapoints is not None:
            max_datapoints = check_positive_int(max_datapoints, "max_datapoints", minimum=2)
        batch_size = check_positive_int(batch_size, "batch_size")
        self.model = model
        self.layers: List[str] = select_layers(model, layers)
        self.grid = grid
        self.resize = resize
        self.max_datapoints = max_datapoints
        self.seed = seed
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else None
        #: Row -> probe image index of the last :meth:`record` (``(datapoints,)`` long).
        self.datapoint_index: Optional[torch.Tensor] = None
        #: ``(h, w)`` grid conv layers were folded on in the last :meth:`record` (None: no conv).
        self.conv_grid: Optional[Tuple[int, int]] = None
        self._order: List[str] = []
        logger.info("ActivationRecorder records %d layers: %s", len(self.layers), ", ".join(self.layers))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={self.layers}, grid={self.grid}, resize={self.resize!r}, "
            f"max_datapoints={self.max_datapoints}, seed={self.seed})"
        )

    def _make_hook(self, name: str, store: Dict[str, List[torch.Tensor]], calls: Dict[str, int]) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            calls[name] += 1
            if name not in self._order:
                self._order.append(name)
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
                t = resize_map(t.float(), size, self.resize)
            elif t.ndim != 2:
                t = t.flatten(1) if t.ndim > 1 else t[:, None]
            # copy=True: a later in-place op (ReLU(inplace=True)) must not change what we keep
            store[name].append(t.to(device="cpu", dtype=torch.float32, copy=True))

        return hook

    def record(self, probe: Any) -> Dict[str, torch.Tensor]:
        """Run ``probe`` through the model and return ``{layer name: (datapoints, neurons)}``.

        Args:
            probe: a tensor of model inputs (split into ``batch_size`` batches) or a
                DataLoader/iterable yielding input tensors or ``(inputs, targets)`` batches,
                any batch size. Use the same probe, in the same order, at every checkpoint.

        Returns:
            A dict ordered by the layers' execution order in the forward pass (their depth),
            each value a float32 CPU tensor ``(datapoints, neurons)`` with the same rows for
            every layer; see the module docstring for how conv maps are folded.
            :attr:`datapoint_index` gives each row's probe image.

        The model runs in eval mode under ``torch.no_grad``; afterwards every module's own
        train/eval flag is restored and every hook removed, also if the forward raises.
        """
        modules = dict(self.model.named_modules())
        captured: Dict[str, List[torch.Tensor]] = {n: [] for n in self.layers}
        calls: Dict[str, int] = {n: 0 for n in self.layers}
        self._order: List[str] = []
        modes = [(m, m.training) for m in self.model.modules()]
        handles = []
        try:
            for name in self.layers:
                handles.append(modules[name].register_forward_hook(self._make_hook(name, captured, calls)))
            self.model.eval()
            with torch.no_grad():
                for batch in _iter_probe(probe, self.batch_size):
                    for n in calls:
                        calls[n] = 0
                    self.model(to_model(batch, self.model, self.device))
                    missing = [n for n in self.layers if calls[n] == 0]
                    if missing:
                        raise ValueError(
                            f"layers {missing} did not run in the forward pass, so they have no output "
                            "to record; remove them from `layers`."
                        )
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes:
                m.training = mode
        if not self._order:
            raise ValueError("`probe` yielded no batches; pass at least one input.")
        return self._assemble(captured, list(self._order))

    def _assemble(self, captured: Dict[str, List[torch.Tensor]], order: List[str]) -> Dict[str, torch.Tensor]:
        full = {n: torch.cat(captured[n]) for n in order}
        captured.clear()
        n_images = next(iter(full.values())).shape[0]
        convs = [n for n in order if full[n].ndim == 4]
        if convs:
            h = min(full[n].shape[2] for n in convs)
            w = min(full[n].shape[3] for n in convs)
            self.conv_grid = (h, w)
        else:
            h = w = 1
            self.conv_grid = None
        # the image of every kept row, from the same deterministic fold/subsample
        rows = conv_datapoint_indices(n_images, (h, w), max_datapoints=self.max_datapoints, seed=self.seed)
        if rows is None:
            rows = torch.arange(n_images * h * w)
        index = rows // (h * w)
        self.datapoint_index = index
        out: Dict[str, torch.Tensor] = {}
        for n in order:
            t = full.pop(n)
            if t.shape[0] != n_images:
                raise ValueError(f"layer {n!r} returned {t.shape[0]} rows but the probe has {n_images} inputs.")
            if t.ndim == 4:
                t = conv_to_datapoints(t, size=(h, w), resize=self.resize, max_datapoints=self.max_datapoints,
                                       seed=self.seed)
            else:
                t = t[index]
            out[n] = t.contiguous()
        return out

