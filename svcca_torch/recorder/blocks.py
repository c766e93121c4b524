"""What kind of module a module is, for the default layers: a block (by type or by class
name), a normalisation layer, a pure container; and the model's modules listed for messages."""
from __future__ import annotations

import re
from typing import Dict, Tuple, Type

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

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


def _listing(modules: Dict[str, nn.Module], limit: int = 60) -> str:
    items = [f"{n} ({type(m).__name__})" for n, m in modules.items()]
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
