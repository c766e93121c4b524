"""Linear centred kernel alignment (Kornblith et al., ICML 2019)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ._linalg import gram
from .cca import prepare_pair


def _hsic_debiased(tr_kl: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor, n: int) -> torch.Tensor:
    """Song et al. (2012) unbiased HSIC for linear kernels ``K = XXᵀ``, ``L = YYᵀ`` of
    *centred* features, from feature-space quantities only (no ``(n, n)`` matrix):
    ``tr_kl = tr(KL) = ‖XᵀY‖²_F`` and ``kx``/``ky`` the kernel diagonals. Centring makes
    ``K1 = 0``, so with the diagonal zeroed ``K̃1 = -kx``."""
    kl_diag = (kx * ky).sum()
    return (
        tr_kl - kl_diag + kx.sum() * ky.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl_diag
    ) / (n * (n - 3))


def linear_cka(
    x: Any,
    y: Any,
    *,
    debiased: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> float:
    """Linear CKA: ``‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)`` of the centred layers.

    Args:
        x: activations ``(datapoints, neurons_x)`` (tensor or numpy array) or ``(N, C, H, W)``.
        y: activations ``(datapoints, neurons_y)`` of the same datapoints.
        debiased: use the unbiased HSIC estimator (Song et al. 2012), which removes the
            upward bias of CKA when neurons outnumber datapoints; needs >= 4 datapoints.
        dtype: compute dtype (default: the input's for plain CKA, float64 when debiased,
            where the estimator subtracts nearly equal terms).

    Returns:
        a float in [0, 1] (debiased: may dip slightly below 0 for unrelated layers).

    Symmetric, invariant to orthogonal transforms and isotropic scaling of either side,
    but not to general invertible linear maps (unlike CCA). Everything is computed from
    ``(neurons, neurons)`` products, never an ``(n, n)`` kernel matrix.
    """
    xt, yt = prepare_pair(x, y, dtype)
    n = xt.shape[0]
    if debiased:
        if n < 4:
            raise ValueError(f"`debiased=True` needs at least 4 datapoints, got {n}.")
        cdt = dtype or torch.float64
        xc, yc = (xt - xt.mean(0)).to(cdt), (yt - yt.mean(0)).to(cdt)
        kx, ky = (xc * xc).sum(1), (yc * yc).sum(1)
        hxy = _hsic_debiased(gram(xc, yc).square().sum(), kx, ky, n)
        hxx = _hsic_debiased(gram(xc).square().sum(), kx, kx, n)
        hyy = _hsic_debiased(gram(yc).square().sum(), ky, ky, n)
        denom = (hxx * hyy).sqrt()
    else:
        xc, yc = xt - xt.mean(0), yt - yt.mean(0)
        hxy = gram(xc, yc).double().square().sum()
        denom = gram(xc).double().norm() * gram(yc).double().norm()
    if float(denom) <= 0:
        raise ValueError("`x` or `y` has zero variance: every neuron is constant over the datapoints.")
    return float(hxy / denom)
