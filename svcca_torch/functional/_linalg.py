"""Small linear-algebra building blocks shared by the kernels.

Everything works on Gram (covariance) matrices, batched over leading dimensions and
for real or complex (Hermitian) input, and never forms an explicit inverse: whitening
uses the eigendecomposition of the Gram matrix, with directions whose eigenvalue falls
below ``rtol**2 * largest`` treated as absent (dead or duplicate neurons).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

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


# --------------------------------------------------------------------------- layers -> Grams

#: A neuron is constant ("dead") when the root-mean-square of its centred values is at most
#: this many units of its dtype's epsilon times its mean's magnitude: rounding the mean of a
#: constant float32 column leaves residues of up to ~3 eps (measured, n = 10 to 1e5), so a
#: constant layer is recognised with a margin of 10x, and variation this close to the
#: rounding of the values carries no information.
DEAD_EPS = 32

# Gram products whose diagonal would leave [2^-100, 2^100] per datapoint are re-done on
# power-of-two rescaled columns (exact scaling, so no rounding is added).
_SAFE_LOG2 = 100


def live_mask(diag: torch.Tensor, mean: torch.Tensor, n: int, eps: float) -> torch.Tensor:
    """Neurons that vary over the datapoints, relative to their own scale.

    ``diag``: the centred Gram's diagonal (sum of squared deviations), ``mean``: the neuron
    means, on the same scale; ``eps``: the epsilon of the dtype the values were held in.
    """
    diag = diag.real.to(torch.float64)
    thresh = n * (DEAD_EPS * eps * mean.real.to(torch.float64).abs()) ** 2
    return diag > thresh


class CentredLayer(NamedTuple):
    """One layer centred and ready for Gram products.

    ``data`` ``(n, d)`` in the Gram dtype holds ``(x - mean) * col_scale``; ``gram`` is
    ``dataᵀ data`` in float64 with dead neurons' rows and columns set to zero. ``rel``
    ``(d,)`` float64 (or None for all ones) maps ``data``'s columns to ``(x - mean) * scale``:
    the layer at the global power-of-two ``scale`` (1.0 unless the values would overflow or
    underflow the Gram products), which every similarity is invariant to.
    """

    data: torch.Tensor
    mean: torch.Tensor
    gram: torch.Tensor
    rel: Optional[torch.Tensor]
    scale: float
    live: torch.Tensor


def _pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """Powers of two ``s`` with ``amax * s`` in [0.5, 1) (1 where ``amax`` is 0)."""
    _, exp = torch.frexp(amax.to(torch.float64))
    return torch.where(amax > 0, torch.ldexp(torch.ones_like(amax, dtype=torch.float64), -exp), 1.0)


def centre_layer(x: torch.Tensor, gram_dtype: torch.dtype, neuron_gram: bool = True) -> CentredLayer:
    """Centre ``x`` ``(n, d)`` and form its Gram matrix in ``gram_dtype`` (the one pass of
    products over the data), rescaled by exact powers of two when its values are so large
    or small (e.g. ~1e19 or ~1e-19) that the products would overflow or lose precision.

    ``neuron_gram=False`` (a wide layer, see :func:`prefer_datapoint_gram`): no
    ``(d, d)`` Gram is formed (``gram`` is None); the rescaling and dead-neuron decisions
    are the same, taken on the column sums of squares (the Gram's diagonal), and the
    caller works from the datapoints' ``(n, n)`` Gram (:func:`live_columns`,
    :func:`datapoint_gram`)."""
    n = x.shape[0]
    mean = x.mean(0)
    xc = (x - mean).to(gram_dtype)
    g = gram(xc) if neuron_gram else None
    diag = g.diagonal() if neuron_gram else _column_squares(xc)
    lim = n * 2.0**_SAFE_LOG2
    rel, scale = None, 1.0
    small = diag < n * 2.0**-_SAFE_LOG2  # underflowing products, or a neuron that is exactly 0
    rescale = not bool(torch.isfinite(diag).all()) or float(diag.max()) > lim
    if not rescale and bool(small.any()):
        rescale = bool((xc[:, small].abs().amax(0) > 0).any())  # only the few small columns are read
    if rescale:
        amax = xc.abs().amax(0)
        col = _pow2_scale(amax)  # exact: powers of two
        xc = xc * col.to(xc.dtype)
        if neuron_gram:
            g = gram(xc)
        else:
            diag = _column_squares(xc)
        # the largest neuron's factor, so relative factors of nonzero neurons are <= 1 and the
        # layer at this scale has its largest value in [0.5, 1): an all-zero neuron's factor
        # (1) does not count, or a tiny layer with one would stay tiny (float32 products of
        # ~1e-19 values are subnormal)
        nonzero = amax > 0
        scale = float(col[nonzero].min()) if bool(nonzero.any()) else 1.0
        rel = scale / col
    g64 = g.to(torch.float64) if neuron_gram else None
    sq = g64.diagonal() if neuron_gram else diag.to(torch.float64)
    if rel is not None:
        sq = sq * rel**2
    live = live_mask(sq, mean * scale, n, torch.finfo(x.dtype).eps)
    if neuron_gram and not bool(live.all()):
        g64 = g64 * (live[:, None] & live[None, :])
    return CentredLayer(xc, mean, g64, rel, scale, live)


def _column_squares(xc: torch.Tensor) -> torch.Tensor:
    """Each column's sum of squares in its dtype: the Gram's diagonal, which overflows or
    underflows exactly when the Gram's would."""
    return xc.square().sum(0)


# ------------------------------------------------------------------- the datapoints' side
# A layer's centred activations A (n, d) have the same nonzero squared singular values as
# eigenvalues of Aᵀ A (d, d, the neurons' Gram) and of A Aᵀ (n, n, the datapoints' Gram);
# the left singular vectors are the eigenvectors of A Aᵀ and the right ones Aᵀ U / s. When
# d > n the datapoints' side costs n² d for the product and n³ for the eigensolve, against
# n d² and d³, with memory n² + n d against d²: a (1,024 x 8,320) layer is reduced from a
# 1,024² Gram instead of an 8,320² one. The decisions are the same on both sides: dead
# neurons are zero columns of A, the rank threshold is relative to the same largest
# eigenvalue, and the rank on the correlation matrix D Aᵀ A D (D = diag(‖a_j‖)^-1) is that
# of Z Zᵀ with Z = A D (unit-norm columns), the same nonzero eigenvalues.


def prefer_datapoint_gram(n: int, d: int) -> bool:
    """Whether a layer of ``n`` datapoints and ``d`` neurons is cheaper to decompose from the
    ``(n, n)`` Gram of its datapoints than from the ``(d, d)`` Gram of its neurons: ``d > n``
    (products ``n² d`` against ``n d²``, eigensolve ``n³`` against ``d³``)."""
    return int(d) > int(n)


def live_columns(c: CentredLayer) -> torch.Tensor:
    """``(n, d)`` in ``c.data``'s dtype: the centred layer at its global scale,
    ``(x - mean) * scale``, with dead neurons' columns zero (no copy when there is nothing
    to change). Its neurons' Gram is ``c.gram`` mapped back by ``c.rel``."""
    f = c.live.to(torch.float64) if c.rel is None else c.rel * c.live
    if bool((f == 1).all()):
        return c.data
    return c.data * f.to(c.data.dtype)


def datapoint_gram(a: torch.Tensor) -> torch.Tensor:
    """``a aᵀ`` ``(n, n)``: the product in ``a``'s dtype (the one pass over the data, as the
    neurons' Gram is), returned in float64 for the eigensolve."""
    return (a @ a.mT).to(torch.float64)


def unit_columns(c: CentredLayer) -> torch.Tensor:
    """``(n, d)`` in ``c.data``'s dtype: each live neuron's centred column scaled to unit
    norm, dead ones zero. Its datapoints' Gram has the nonzero eigenvalues of the layer's
    correlation matrix (see :func:`equilibrated_whitener`); the global and per-column powers
    of two cancel. The norms are taken on ``c.data``, whose columns are either rescaled to
    [0.5, 1) at their largest or were left alone because their squares are representable."""
    sq = _column_squares(c.data).to(torch.float64)
    inv = torch.where(c.live & (sq > 0), sq.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
    return c.data * inv.to(c.data.dtype)


def datapoint_rank(c: CentredLayer, rtol: float) -> int:
    """:func:`numerical_rank` of the layer's neurons' Gram, decided on the datapoints' side:
    the rank of its correlation matrix is that of ``Z Zᵀ`` (``Z`` = :func:`unit_columns`)."""
    vals = torch.linalg.eigvalsh(datapoint_gram(unit_columns(c))).flip(-1)
    return int(rank_mask(vals, rtol).sum())


def datapoint_whitened(
    c: CentredLayer, rtol: float, weights: bool = True
) -> Tuple[torch.Tensor, Optional[torch.Tensor], int]:
    """The wide-layer counterpart of :func:`equilibrated_whitener`: the layer's whitened
    directions over the datapoints ``U`` ``(n, r)`` (float64, orthonormal: the top
    eigenvectors of ``Z Zᵀ``, ``Z`` = :func:`unit_columns`, with the rank decided on the
    correlation matrix as there), the whitening map ``W`` ``(d, r)`` float64 with
    ``A W = U`` for ``A = (x - mean) * scale`` (dead neurons' rows zero), and ``r``.

    ``Z = A D`` (``D = diag(‖a_j‖)^-1``) and ``Z Zᵀ = U Λ Uᵀ`` give ``W = D Zᵀ U Λ^-1``:
    ``A W = Z Zᵀ U Λ^-1 = U``, so ``Wᵀ Aᵀ A W = I_r``, the neuron-side whitener's property.
    ``weights=False`` skips ``W`` (None; one ``(d, n, r)`` product less).
    """
    z = unit_columns(c)
    e = eigh_desc(datapoint_gram(z))
    mask = rank_mask(e.values, rtol)
    u, lam = e.vectors[:, mask], e.values[mask]
    if not weights:
        return u, None, int(mask.sum())
    norms = _column_squares(c.data).to(torch.float64).sqrt()
    if c.rel is not None:
        norms = norms * c.rel  # ‖a_j‖ at the global scale
    dinv = torch.where(c.live & (norms > 0), 1.0 / norms.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    w = (z.mT @ u.to(z.dtype)).to(torch.float64) * dinv[:, None] / lam
    return u, w, int(mask.sum())


def unscale(g: torch.Tensor, rx: Optional[torch.Tensor], ry: Optional[torch.Tensor]) -> torch.Tensor:
    """``diag(rx) g diag(ry)`` (None = identity), float64."""
    g = g.to(torch.float64)
    if rx is not None:
        g = g * rx[:, None]
    if ry is not None:
        g = g * ry[None, :]
    return g


def equilibrated_whitener(g: torch.Tensor, rtol: float) -> Tuple[torch.Tensor, int]:
    """Whitening map ``(d, r)`` of a float64 Gram matrix with no zero diagonal entry.

    CCA is invariant to each neuron's scale, so the rank is decided on the correlation
    matrix ``C = D G D`` (``D = diag(G)^-1/2``): a neuron with small variance is not mistaken
    for an absent direction, and the Gram's rounding errors, which are relative to the
    neurons' own norms, become errors of size ~eps relative to ``C``'s unit diagonal.
    Returns ``W`` with ``Wᵀ G W = I_r`` and the rank ``r``.
    """
    d = g.diagonal().rsqrt()
    e = eigh_desc(g * d[:, None] * d[None, :])
    mask = rank_mask(e.values, rtol)
    w = d[:, None] * (e.vectors[:, mask] * e.values[mask].rsqrt())
    return w, int(mask.sum())


def numerical_rank(g: torch.Tensor, rtol: float) -> int:
    """Rank of a float64 Gram matrix decided on its correlation matrix (see
    :func:`equilibrated_whitener`); neurons with a zero diagonal count as absent."""
    diag = g.diagonal()
    live = diag > 0
    if not bool(live.any()):
        return 0
    sub = g[live][:, live] if not bool(live.all()) else g
    d = sub.diagonal().rsqrt()
    vals = torch.linalg.eigvalsh(sub * d[:, None] * d[None, :]).flip(-1)
    return int(rank_mask(vals, rtol).sum())
