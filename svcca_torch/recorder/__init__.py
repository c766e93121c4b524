"""Capture what chosen layers compute on a fixed probe set, with forward hooks.

:class:`ActivationRecorder` works on any ``nn.Module`` (no tracing of the graph): it hooks
the chosen modules, runs the probe set in eval mode under ``no_grad``, and returns one
``(datapoints, neurons)`` tensor per layer, all describing the *same* datapoints so that a
layers x layers similarity matrix is meaningful: conv maps ``(N, C, H, W)`` are pooled and
their positions folded into datapoints, token sequences ``(N, L, D)`` give a datapoint per
kept token.

One job per module (each one's docstring tells its part):

* :mod:`~svcca_torch.recorder.recorder`: :class:`ActivationRecorder` (hooks, the capture,
  where the work runs, partial captures);
* :mod:`~svcca_torch.recorder.layers`: which layers (:func:`default_layers`, the model's
  blocks; :func:`select_layers`); :mod:`~svcca_torch.recorder.blocks`: what a block is;
* :mod:`~svcca_torch.recorder.inputs`: model inputs (:class:`Inputs`, :func:`model_inputs`,
  the probe cut into batches, :func:`to_model`);
* :mod:`~svcca_torch.recorder.order`: forward-order tracing (:func:`forward_order`,
  :class:`LayerOrderWarning`, the traced forward of every module);
* :mod:`~svcca_torch.recorder.layouts`: each output's layout (:data:`LAYOUTS`), the padding
  mask, what one batch of an output keeps;
* :mod:`~svcca_torch.recorder.rows`: how layers of different shapes are brought to datapoints
  (token rows, common or per-layer rows, :func:`direction_limits`).
"""
from .blocks import BLOCK_TYPES, is_block, is_residual_block
from .inputs import MASK_NAMES, Inputs, batch_inputs, first_tensor, model_inputs, to_model
from .layers import default_layers, select_layers
from .layouts import LAYOUTS
from .order import LayerOrderWarning, forward_order
from .recorder import ActivationRecorder
from .rows import ROW_MODES, direction_limits

# also importable from here, as from the single module this package was
from .blocks import NORM_TYPES  # noqa: F401
from .inputs import INPUT_KEYS, _input_set, _iter_probe  # noqa: F401
from .layers import LayerSpec  # noqa: F401
from .order import _modes_and_hooks_restored  # noqa: F401

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
