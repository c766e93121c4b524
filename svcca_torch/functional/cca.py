"""Canonical correlation analysis between two layers."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple, Optional, Tuple

import torch

from ..utils.validation import check_activations, check_same_datapoints, warn_if_few_datapoints
from ._linalg import canonical_from_grams, default_rtol, gram


@dataclass(eq=False)
class CCAResult:
    """Canonical correlations of two layers and their canonical directions.

    Attributes:
        coefficients: canonical correlations, 1-D, descending, in [0, 1]; one per
            canonical pair, ``min(rank_x, rank_y)`` of them (SVCCA: ``min(k_x, k_y)``).
        x_weights: ``(neurons_x, r)`` map from ``x``'s neurons (centred) to its canonical
            variates; ``y_weights`` likewise. Variates have unit variance over datapoints.
            Computed on first access when the kernel only needed the coefficients.
        x_mean, y_mean: neuron means subtracted before applying the weights.
    """

    coefficients: torch.Tensor
    x_mean: torch.Tensor
    y_mean: torch.Tensor
    _weights: Optional[Tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)
    # (wx, m, wy, scale): whitening maps and whitened cross matrix, for lazy weights
    _whitened: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = field(default=None, repr=False)
    _x: Optional[torch.Tensor] = field(default=None, repr=False)
    _y: Optional[torch.Tensor] = field(default=None, repr=False)

    def _resolve_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._weights is None:
            wx, m, wy, scale = self._whitened
            u, _, vh = torch.linalg.svd(m, full_matrices=False)
            r = self.coefficients.numel()
            self._weights = ((wx @ u[:, :r]) * scale, (wy @ vh.mT[:, :r]) * scale)
        return self._weights

    @property
    def x_weights(self) -> torch.Tensor:
        """``(neurons_x, r)``: ``x``'s (centred) neurons to its canonical variates."""
        return self._resolve_weights()[0]

    @property
    def y_weights(self) -> torch.Tensor:
        """``(neurons_y, r)``: ``y``'s (centred) neurons to its canonical variates."""
        return self._resolve_weights()[1]

    @property
    def mean(self) -> float:
        """Mean canonical correlation: the similarity of the two layers."""
        return float(self.coefficients.mean()) if self.coefficients.numel() else 0.0

    def _variates(self, data: Optional[torch.Tensor], mean: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if data is None:
            raise ValueError("canonical variates need the activations; this result was built without them")
        w = w.to(data.dtype)
        return data @ w - (mean.to(data.dtype) @ w)

    @cached_property
    def x_variates(self) -> torch.Tensor:
        """``(datapoints, r)``: ``x``'s canonical variates (computed on first access)."""
        return self._variates(self._x, self.x_mean, self.x_weights)

    @cached_property
    def y_variates(self) -> torch.Tensor:
        """``(datapoints, r)``: ``y``'s canonical variates (computed on first access)."""
        return self._variates(self._y, self.y_mean, self.y_weights)

    def __float__(self) -> float:
        return self.mean


def canonical_correlations(m: torch.Tensor) -> torch.Tensor:
    """Singular values of a whitened cross matrix, descending, in [0, 1].

    Squared, they are the eigenvalues of the smaller of ``MMᵀ`` and ``MᵀM``; a symmetric
    eigen-solver gets them several times faster than an SVD, with absolute error ~1e-16
    on ``ρ²`` in float64 (the singular vectors are computed only if weights are asked for).
    """
    small = m @ m.mT if m.shape[-2] <= m.shape[-1] else m.mT @ m
    return torch.linalg.eigvalsh(small).flip(-1).clamp(0.0, 1.0).sqrt()


def prepare_pair(
    x: Any, y: Any, dtype: Optional[torch.dtype], min_datapoints: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two ``(datapoints, neurons)`` layers, reducing ``(N, C, H, W)`` conv maps."""
    xt = check_activations(x, "x", dtype=dtype, allow_conv=True, min_datapoints=min_datapoints)
    yt = check_activations(y, "y", dtype=dtype, allow_conv=True, min_datapoints=min_datapoints)
    if xt.ndim == 4 or yt.ndim == 4:
        from .conv import conv_pair_to_datapoints

        xt, yt = conv_pair_to_datapoints(xt, yt, mode="auto")
    check_same_datapoints(xt, yt)
    if xt.dtype != yt.dtype:
        common = torch.promote_types(xt.dtype, yt.dtype)
        xt, yt = xt.to(common), yt.to(common)
    return xt, yt


class Moments(NamedTuple):
    """Sufficient statistics of two layers for CCA, SVCCA, PWCCA and linear CKA.

    ``n`` datapoints; neuron means ``mx`` ``(neurons_x,)``, ``my``; centred Gram matrices
    ``sxx = XcᵀXc``, ``syy``, ``sxy``. The functional kernels compute them from the
    activations in one pass; the stateful metrics accumulate them over batches.
    """

    n: int
    mx: torch.Tensor
    my: torch.Tensor
    sxx: torch.Tensor
    syy: torch.Tensor
    sxy: torch.Tensor


def moments(x: torch.Tensor, y: torch.Tensor, gram_dtype: torch.dtype) -> Moments:
    """:class:`Moments` of ``(datapoints, neurons)`` layers, Grams formed in ``gram_dtype``."""
    mx, my = x.mean(0), y.mean(0)
    xc, yc = (x - mx).to(gram_dtype), (y - my).to(gram_dtype)
    return Moments(int(x.shape[0]), mx, my, gram(xc), gram(yc), gram(xc, yc))


def cca_from_moments(m: Moments, rtol: Optional[float] = None) -> CCAResult:
    """CCA from :class:`Moments` (no variates: the activations are not known here)."""
    rtol = default_rtol(m.sxx.dtype) if rtol is None else rtol
    res = canonical_from_grams(m.sxx, m.syy, m.sxy, rtol)
    r = int(res.n)
    warn_if_few_datapoints(m.n, max(r, 1), "x and y", stacklevel=4)
    scale = (m.n - 1) ** 0.5
    return CCAResult(
        coefficients=res.rho[:r],
        x_mean=m.mx,
        y_mean=m.my,
        _weights=(res.x_weights[:, :r] * scale, res.y_weights[:, :r] * scale),
    )


def cca(
    x: Any,
    y: Any,
    *,
    dtype: Optional[torch.dtype] = None,
    rtol: Optional[float] = None,
) -> CCAResult:
    """Canonical correlation analysis of two layers on the same datapoints.

    Args:
        x: activations ``(datapoints, neurons_x)`` (tensor or numpy array), or
            ``(N, C, H, W)`` conv maps (reduced with :func:`conv_pair_to_datapoints`).
        y: activations ``(datapoints, neurons_y)`` of the same datapoints.
        dtype: dtype to compute in. The Gram matrices are formed in float64 by default
            (plain CCA needs it to tell rank-deficient directions from real ones).
        rtol: singular values below ``rtol * largest`` count as absent (dead or duplicate
            neurons); default 1e-6 in float64.

    Returns:
        :class:`CCAResult`; ``.mean`` is the mean canonical correlation.

    The result is symmetric in ``x`` and ``y`` and invariant to invertible linear maps of
    either side. Nothing is inverted explicitly: both sides are whitened through the
    eigendecomposition of their Gram matrices.
    """
    xt, yt = prepare_pair(x, y, dtype)
    gdt = dtype or (torch.complex128 if xt.is_complex() else torch.float64)
    res = cca_from_moments(moments(xt, yt, gdt), rtol)
    res._x, res._y = xt, yt
    return res
