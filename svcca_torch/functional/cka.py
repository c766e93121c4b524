"""Linear centred kernel alignment (Kornblith et al., ICML 2019)."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from ..utils.validation import check_bool, check_dtype, check_names, zero_variance_error
from ._linalg import centre_layer, datapoint_gram, gram, live_columns, prefer_datapoint_gram, unscale
from .cca import Moments, live_neurons, prepare_pair


def _hsic_debiased(tr_kl: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor, n: int) -> torch.Tensor:
    """Song et al. (2012) unbiased HSIC for linear kernels ``K = XXᵀ``, ``L = YYᵀ`` of
    *centred* features, from feature-space quantities only (no ``(n, n)`` matrix):
    ``tr_kl = tr(KL) = ‖XᵀY‖²_F`` and ``kx``/``ky`` the kernel diagonals. Centring makes
    ``K1 = 0``, so with the diagonal zeroed ``K̃1 = -kx``."""
    kl_diag = (kx * ky).sum()
    return (
        tr_kl - kl_diag + kx.sum() * ky.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl_diag
    ) / (n * (n - 3))


def linear_cka_from_moments(m: Moments, names: Tuple[str, str] = ("x", "y")) -> float:
    """Biased linear CKA ``‖Sxy‖²_F / (‖Sxx‖_F ‖Syy‖_F)`` from :class:`Moments` (float64)."""
    live_neurons(m.sxx, m.mx, m.n, names[0]), live_neurons(m.syy, m.my, m.n, names[1])
    return float(m.sxy.square().sum() / (m.sxx.norm() * m.syy.norm()))


def linear_cka(
    x: Any,
    y: Any,
    *,
    debiased: bool = False,
    dtype: Optional[torch.dtype] = None,
    names: Tuple[str, str] = ("x", "y"),
) -> float:
    """Linear CKA: ``‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)`` of the centred layers.

    Args:
        x: activations ``(datapoints, neurons_x)`` (tensor or numpy array) or ``(N, C, H, W)``.
        y: activations ``(datapoints, neurons_y)`` of the same datapoints.
        debiased: True for the unbiased HSIC estimator (Song et al. 2012), which removes the
            upward bias of CKA when neurons outnumber datapoints; needs >= 4 datapoints.
        dtype: ``torch.float32``/``torch.float64`` (or their names) for the Gram products;
            default the input's. The estimator's sums run in float64 on the
            ``(neurons, neurons)`` products, so float32 products stay accurate (docs/kernels.md).
        names: what error messages call ``x`` and ``y`` (e.g. file names).

    Returns:
        a float in [0, 1] (debiased: may dip slightly below 0 for unrelated layers).

    Symmetric, invariant to orthogonal transforms and isotropic scaling of either side,
    but not to general invertible linear maps (unlike CCA). Everything is computed from
    ``(neurons, neurons)`` products, never an ``(n, n)`` kernel matrix -- unless a layer has
    more neurons than datapoints: then from the two ``(n, n)`` kernels ``K = XXᵀ`` and
    ``L = YYᵀ`` (``‖YᵀX‖²_F = ⟨K, L⟩_F``, ``‖XᵀX‖_F = ‖K‖_F``), the cheaper side, so no
    ``(neurons, neurons)`` matrix is formed.
    """
    debiased = check_bool(debiased, "debiased")
    names = check_names(names)
    xt, yt = prepare_pair(x, y, check_dtype(dtype), names=names)
    n = xt.shape[0]
    if debiased and n < 4:
        raise ValueError(f"`debiased=True` needs at least 4 datapoints, got {n}.")
    if prefer_datapoint_gram(n, xt.shape[1]) or prefer_datapoint_gram(n, yt.shape[1]):
        return _linear_cka_kernels(xt, yt, debiased, names)
    cx, cy = centre_layer(xt, xt.dtype), centre_layer(yt, yt.dtype)
    sxx, syy = unscale(cx.gram, cx.rel, cx.rel), unscale(cy.gram, cy.rel, cy.rel)
    live_neurons(sxx, cx.mean * cx.scale, n, names[0]), live_neurons(syy, cy.mean * cy.scale, n, names[1])
    sxy = unscale(gram(cx.data, cy.data), cx.rel, cy.rel) * (cx.live[:, None] & cy.live[None, :])
    if not debiased:
        return float(sxy.square().sum() / (sxx.norm() * syy.norm()))
    kx, ky = _kernel_diagonal(cx), _kernel_diagonal(cy)
    hxy = _hsic_debiased(sxy.square().sum(), kx, ky, n)
    hxx = _hsic_debiased(sxx.square().sum(), kx, kx, n)
    hyy = _hsic_debiased(syy.square().sum(), ky, ky, n)
    return float(hxy / (hxx * hyy).sqrt())


def _linear_cka_kernels(xt: torch.Tensor, yt: torch.Tensor, debiased: bool, names: Tuple[str, str]) -> float:
    """:func:`linear_cka` from the ``(n, n)`` kernels of the centred layers (at their
    power-of-two scales, dead neurons zero): ``n² (d_x + d_y)`` products, cheaper than the
    neurons' ``n (d_x² + d_y² + d_x d_y)`` once a side is wider than ``n``."""
    n = int(xt.shape[0])
    cx, cy = centre_layer(xt, xt.dtype, neuron_gram=False), centre_layer(yt, yt.dtype, neuron_gram=False)
    for c, name, z in ((cx, names[0], xt), (cy, names[1], yt)):
        if not bool(c.live.any()):
            raise zero_variance_error(name, int(z.shape[1]))
    k, l = datapoint_gram(live_columns(cx)), datapoint_gram(live_columns(cy))
    kl, kk, ll = (k * l).sum(), k.square().sum(), l.square().sum()
    if not debiased:
        return float(kl / (kk * ll).sqrt())
    kx, ky = k.diagonal(), l.diagonal()
    return float(_hsic_debiased(kl, kx, ky, n) / (_hsic_debiased(kk, kx, kx, n) * _hsic_debiased(ll, ky, ky, n)).sqrt())


def _kernel_diagonal(c) -> torch.Tensor:
    """``‖x_i - mean‖²`` per datapoint, at the layer's (power-of-two) scale, in float64."""
    rel = c.live.to(torch.float64) if c.rel is None else c.rel * c.live
    if bool((rel == 1).all()):
        return torch.linalg.vector_norm(c.data, dim=1).to(torch.float64).square()  # one pass
    return c.data.square() @ rel.square().to(c.data.dtype)
