"""Small linear-algebra building blocks shared by the kernels.

Everything works on Gram (covariance) matrices, batched over leading dimensions and
for real or complex (Hermitian) input, and never forms an explicit inverse: whitening
uses the eigendecomposition of the Gram matrix, with directions whose eigenvalue falls
below ``rtol**2 * largest`` treated as absent (dead or duplicate neurons).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

#: Default relative threshold on *singular values* (sqrt of Gram eigenvalues), per
#: dtype of the Gram matrix: directions below it are numerically absent.
DEFAULT_RTOL = {torch.float64: 1e-6, torch.complex128: 1e-6, torch.float32: 3e-3, torch.complex64: 3e-3}


def default_rtol(dtype: torch.dtype) -> float:
    return DEFAULT_RTOL.get(dtype, 3e-3)


def gram(x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``xᴴ y`` (or ``xᴴ x``), batched over leading dimensions."""
    return x.mH @ (x if y is None else y)


class Eig(NamedTuple):
    """Eigendecomposition of a Gram matrix, eigenvalues descending, clamped at 0."""

    values: torch.Tensor  # (..., d) real, descending
    vectors: torch.Tensor  # (..., d, d) columns


def eigh_desc(g: torch.Tensor) -> Eig:
    """Hermitian eigendecomposition with eigenvalues in descending order."""
    g = 0.5 * (g + g.mH)
    vals, vecs = torch.linalg.eigh(g)
    return Eig(vals.flip(-1).clamp_min(0), vecs.flip(-1))


def rank_mask(values: torch.Tensor, rtol: float) -> torch.Tensor:
    """Which eigenvalues (descending, last dim) count: ``sqrt(λ) > rtol * sqrt(λ_max)``."""
    top = values[..., :1]
    return (values > (rtol**2) * top) & (top > 0)


class Whitener(NamedTuple):
    """``w`` maps neurons to an orthonormal basis of the layer's span: ``wᴴ G w = diag(mask)``."""

    w: torch.Tensor  # (..., d, d); columns beyond the rank are zero
    mask: torch.Tensor  # (..., d) bool, kept directions
    rank: torch.Tensor  # (...) int


def whitener(g: torch.Tensor, rtol: float) -> Whitener:
    """Inverse square root of a Gram matrix restricted to its numerical range."""
    e = eigh_desc(g)
    mask = rank_mask(e.values, rtol)
    inv_sqrt = torch.where(mask, e.values.clamp_min(torch.finfo(e.values.dtype).tiny).rsqrt(), 0.0)
    w = e.vectors * inv_sqrt.unsqueeze(-2).to(e.vectors.dtype)
    return Whitener(w, mask, mask.sum(-1))


class CanonicalFromGrams(NamedTuple):
    rho: torch.Tensor  # (..., r) descending, padded with zeros past min(rank_x, rank_y)
    x_weights: torch.Tensor  # (..., d_x, r)
    y_weights: torch.Tensor  # (..., d_y, r)
    n: torch.Tensor  # (...) number of valid coefficients, min(rank_x, rank_y)


def canonical_from_grams(
    sxx: torch.Tensor, syy: torch.Tensor, sxy: torch.Tensor, rtol: float
) -> CanonicalFromGrams:
    """CCA from (centred) Gram matrices, batched and real or complex.

    With whiteners ``Wx``, ``Wy`` (``Wᴴ S W = I`` on the numerical range), the canonical
    correlations are the singular values of ``Wxᴴ Sxy Wy``; weights mapping neurons to
    canonical variates are ``Wx U`` and ``Wy V``.
    """
    wx, wy = whitener(sxx, rtol), whitener(syy, rtol)
    m = wx.w.mH @ sxy @ wy.w
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    n = torch.minimum(wx.rank, wy.rank)
    idx = torch.arange(s.shape[-1], device=s.device)
    s = torch.where(idx < n.unsqueeze(-1), s.clamp(0.0, 1.0), 0.0)
    return CanonicalFromGrams(s, wx.w @ u, wy.w @ vh.mH, n)
