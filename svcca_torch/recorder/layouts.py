"""Layouts: how each recorded layer's output is read, and what one batch of it keeps.

A layer's layout (:data:`LAYOUTS`) is named in ``layouts=`` or found from its output (a 3-d
output is sequence first when its dim 1, not dim 0, is the batch size; a channels-last map
when the traced forward shows it); the batch's padding mask marks which tokens are real.
From one batch's output the recorder keeps a pooled map, a dense row per input or the token
rows (:class:`~svcca_torch.recorder.rows._Tokens`).
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping, Optional, Set, Tuple

import torch
from torch import nn

from ..functional.conv import resize_map
from ..utils.validation import check_choice
from .blocks import _listing
from .inputs import MASK_NAMES, Inputs, _forward_signature, _signature_text
from .order import _unpadded
from .rows import _token_rows

#: Output layouts a layer can be named with (``layouts=``): conv maps ``"NCHW"`` (PyTorch's) or
#: ``"NHWC"`` (channels last, as Swin's blocks return), token sequences ``"NLD"`` (batch first)
#: or ``"LND"`` (sequence first, ``batch_first=False``), ``"ND"`` (anything else: one row per
#: input, flattened).
LAYOUTS: Tuple[str, ...] = ("NCHW", "NHWC", "NLD", "LND", "ND")


def check_layouts(layouts: Optional[Mapping[str, str]], model: nn.Module) -> Dict[str, str]:
    """``layouts=`` of :class:`~svcca_torch.recorder.ActivationRecorder` checked: each a module
    of ``model`` named with one of :data:`LAYOUTS`; a new dict."""
    modules = dict(model.named_modules())
    layouts = dict(layouts or {})
    for name, layout in layouts.items():
        if name not in modules or not name:
            raise ValueError(f"`layouts`: {name!r} is not a module of the model. Modules: {_listing(modules)}")
        check_choice(layout, f"layouts[{name!r}]", LAYOUTS)
    return layouts


def check_padding_mask(padding_mask: Any) -> None:
    """``padding_mask=`` of :class:`~svcca_torch.recorder.ActivationRecorder` checked."""
    if not (padding_mask is None or padding_mask is False or isinstance(padding_mask, (str, int))
            or callable(padding_mask)) or padding_mask is True:
        raise ValueError(
            "`padding_mask` must be None (found by name), False (none), the name or position of the probe input "
            f"holding the mask, or a callable returning it; got {padding_mask!r}."
        )


def _channels_first_1d(module: nn.Module) -> bool:
    """A module whose 3-d output is ``(N, C, L)`` (a 1-d convolution's), not tokens: it is or
    holds a 1-d convolution and nothing that works on ``(N, L, D)`` sequences."""
    convs = (nn.Conv1d, nn.ConvTranspose1d)
    mods = list(module.modules())
    if not any(isinstance(m, convs) for m in mods):
        return False
    return not any(isinstance(m, (nn.Linear, nn.Embedding, nn.RNNBase, nn.MultiheadAttention, nn.LayerNorm))
                   for m in mods)


def find_layout(layouts: Dict[str, str], given: Set[str], name: str, module: nn.Module, shape: Tuple[int, ...],
                n: int, *, strict: bool) -> Optional[str]:
    """The layout of layer ``name``'s output of ``shape`` on a batch of ``n`` inputs (see
    :data:`LAYOUTS`), remembered in ``layouts`` once found (``given``: the layers named in
    ``layouts=``). ``strict``: an output that cannot be told apart (both leading dims equal the
    batch size) or has no batch dimension is an error; else None (a traced batch of two inputs
    decides nothing)."""
    layout = layouts.get(name)
    if layout is not None:
        if strict:
            check_layout(name, layout, shape, n, name in given)
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
        check_layout(name, layout, shape, n, name in given)
    layouts[name] = layout
    return layout


def check_layout(name: str, layout: str, shape: Tuple[int, ...], n: int, named: bool) -> None:
    """A ValueError unless ``shape`` (on a batch of ``n`` inputs) fits ``layout`` (``named``: as
    named in ``layouts=``)."""
    nd = {"NCHW": 4, "NHWC": 4, "NLD": 3, "LND": 3}.get(layout)
    batch_dim = 1 if layout == "LND" else 0
    ok = (nd is None or len(shape) == nd) and len(shape) > batch_dim and shape[batch_dim] == n
    if not ok:
        given = " (as named in `layouts`)" if named else ""
        raise ValueError(
            f"layer {name!r} returns {tuple(shape)} on a batch of {n} inputs, which is not layout {layout!r}"
            f"{given}: its {'dim 1' if batch_dim else 'dim 0'} must be the batch size"
            + (f" and it must have {nd} dimensions" if nd else "") + ". Name its layout with `layouts=` ("
            + ", ".join(LAYOUTS) + ")."
        )


def batch_padding(spec: Any, model: nn.Module, x: Inputs, n: int) -> Optional[torch.Tensor]:
    """The batch's padding mask ``(n, L)``, True for padding (``spec``: the recorder's ``padding_mask``)."""
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
        sig = _forward_signature(model)
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


def keep_output(name: str, module: nn.Module, output: Any, n: int, pad: Optional[torch.Tensor], *,
                layouts: Dict[str, str], given: Set[str], grid: int, resize: str, max_tokens: int) -> Any:
    """What is kept of one batch's output of layer ``name``: a pooled map ``(n, C, h, w)``,
    a dense ``(n, D)`` or :class:`~svcca_torch.recorder.rows._Tokens` (``n`` inputs, ``pad``
    their padding mask)."""
    t, lengths = _unpadded(output)
    if t is None:
        raise ValueError(f"layer {name!r} returned no tensor ({type(output).__name__}); it cannot be recorded.")
    t = t.detach()
    layout = find_layout(layouts, given, name, module, tuple(t.shape), n, strict=True)
    if layout in ("NCHW", "NHWC"):
        if layout == "NHWC":
            t = t.permute(0, 3, 1, 2)
        size = (min(grid, t.shape[2]), min(grid, t.shape[3]))
        kept = resize_map(t.float(), size, resize)
    elif layout in ("NLD", "LND"):
        if layout == "LND":
            t = t.transpose(0, 1)
        valid = None
        if lengths is not None:
            valid = torch.arange(t.shape[1])[None] < lengths[:, None]
        else:
            if pad is not None and pad.shape[1] == t.shape[1]:
                valid = ~pad
        return _token_rows(t.float(), valid, max_tokens)
    else:
        kept = (t.flatten(1) if t.ndim > 1 else t[:, None]).float()
    if kept.data_ptr() == t.data_ptr():
        # a later in-place op (ReLU(inplace=True)) must not change what we keep
        kept = kept.clone()
    return kept
