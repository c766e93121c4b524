"""Canonical correlation analysis between two layers."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..utils.validation import (
    check_activations,
    check_dtype,
    check_names,
    check_rtol,
    check_same_datapoints,
    warn_if_few_datapoints,
    zero_variance_error,
)
from ._linalg import (
    CentredLayer,
    centre_layer,
    datapoint_whitened,
    default_rtol,
    equilibrated_whitener,
    gram,
    live_mask,
    prefer_datapoint_gram,
    unscale,
)


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
    # (wx, m, wy, scale_x, scale_y): whitening maps and whitened cross matrix, for lazy weights
    _whitened: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]] = field(
        default=None, repr=False
    )
    _x: Optional[torch.Tensor] = field(default=None, repr=False)
    _y: Optional[torch.Tensor] = field(default=None, repr=False)

    def _resolve_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._weights is None:
            wx, m, wy, sx, sy = self._whitened
            u, _, vh = torch.linalg.svd(m, full_matrices=False)
            r = self.coefficients.numel()
            self._weights = ((wx @ u[:, :r]) * sx, (wy @ vh.mT[:, :r]) * sy)
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
    if m.shape[-1] == 0 or m.shape[-2] == 0:
        return m.new_zeros(m.shape[:-2] + (0,))
    small = m @ m.mT if m.shape[-2] <= m.shape[-1] else m.mT @ m
    return torch.linalg.eigvalsh(small).flip(-1).clamp(0.0, 1.0).sqrt()


def mean_canonical_correlations(blocks: Sequence[torch.Tensor], chunk_bytes: int = 64 << 20,
                                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Mean canonical correlation of each whitened cross block (e.g. ``Uᵢᵀ Uⱼ`` of two
    orthonormal bases), as a float64 CPU tensor.

    A ``(k_i, k_j)`` block's correlations are the square roots of the eigenvalues of the
    smaller of ``B Bᵀ`` and ``Bᵀ B`` (``r x r``, ``r = min(k_i, k_j)``); blocks of equal
    ``r`` share batched symmetric eigensolves of at most ``chunk_bytes`` each (padding every
    block to the largest size would solve 235 x 235 problems for 29 x 29 ones). The solve
    runs in the blocks' dtype: float32 eigenvalues of ``B Bᵀ`` are off by ~1e-7 absolutely,
    ~1e-6 on the mean (docs/kernels.md); float64 blocks are exact. ``dtype`` casts each block first
    (e.g. float64 for float32 blocks: only the small ``r x r`` work is then in float64).
    """
    if dtype is not None:
        blocks = [b.to(dtype) for b in blocks]
    out = torch.empty(len(blocks), dtype=torch.float64)
    by_size: Dict[int, List[int]] = {}
    for t, b in enumerate(blocks):
        by_size.setdefault(min(int(b.shape[0]), int(b.shape[1])), []).append(t)
    for r, idx in by_size.items():
        if r == 0:
            out[idx] = 0.0
            continue
        step = max(1, chunk_bytes // (r * r * blocks[idx[0]].element_size()))
        for c in range(0, len(idx), step):
            part = idx[c : c + step]
            small = torch.stack([blocks[t] @ blocks[t].mT if blocks[t].shape[0] <= blocks[t].shape[1]
                                 else blocks[t].mT @ blocks[t] for t in part])
            vals = torch.linalg.eigvalsh(small).to(torch.float64).clamp(0.0, 1.0).sqrt()
            out[part] = vals.mean(-1).cpu()
    return out


def prepare_pair(
    x: Any,
    y: Any,
    dtype: Optional[torch.dtype],
    min_datapoints: int = 2,
    names: Tuple[str, str] = ("x", "y"),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two ``(datapoints, neurons)`` layers, reducing ``(N, C, H, W)`` conv maps."""
    a, b = check_names(names)
    dtype = check_dtype(dtype)
    xt = check_activations(x, a, dtype=dtype, allow_conv=True, min_datapoints=min_datapoints)
    yt = check_activations(y, b, dtype=dtype, allow_conv=True, min_datapoints=min_datapoints)
    if xt.ndim == 4 or yt.ndim == 4:
        from .conv import conv_pair_to_datapoints

        check_same_datapoints(xt, yt, (a, b))
        xt, yt = conv_pair_to_datapoints(xt, yt, mode="auto")
    check_same_datapoints(xt, yt, (a, b))
    if xt.dtype != yt.dtype:
        common = torch.promote_types(xt.dtype, yt.dtype)
        xt, yt = xt.to(common), yt.to(common)
    return xt, yt


class Moments(NamedTuple):
    """Sufficient statistics of two layers for CCA, SVCCA, PWCCA and linear CKA.

    ``n`` datapoints; neuron means ``mx`` ``(neurons_x,)``, ``my``; centred Gram matrices
    ``sxx = XcᵀXc``, ``syy``, ``sxy`` in float64. They describe ``x * scale_x`` and
    ``y * scale_y``: powers of two, 1.0 unless the values were so large or small that the
    products had to be rescaled (every similarity is invariant to them; weights, means and
    singular values are mapped back). ``gram_dtype`` is the dtype the products were formed
    in, which sets the default rank threshold. The functional kernels compute them from the
    activations in one pass; the stateful metrics accumulate them over batches (float64).
    """

    n: int
    mx: torch.Tensor
    my: torch.Tensor
    sxx: torch.Tensor
    syy: torch.Tensor
    sxy: torch.Tensor
    scale_x: float = 1.0
    scale_y: float = 1.0
    gram_dtype: torch.dtype = torch.float64


def moments(x: torch.Tensor, y: torch.Tensor, gram_dtype: torch.dtype) -> Moments:
    """:class:`Moments` of ``(datapoints, neurons)`` layers, Gram products formed in
    ``gram_dtype`` (the only pass over the data), stored in float64.

    Neurons that are constant up to the rounding of their values get zero rows and columns.
    """
    cx, cy = centre_layer(x, gram_dtype), centre_layer(y, gram_dtype)
    sxy = unscale(gram(cx.data, cy.data), cx.rel, cy.rel)
    sxy = sxy * (cx.live[:, None] & cy.live[None, :])
    sxx, syy = unscale(cx.gram, cx.rel, cx.rel), unscale(cy.gram, cy.rel, cy.rel)
    return Moments(
        int(x.shape[0]), cx.mean * cx.scale, cy.mean * cy.scale,
        sxx, syy, sxy, cx.scale, cy.scale, gram_dtype,
    )


def live_neurons(g: torch.Tensor, mean: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """Neurons of a layer that vary (see :func:`_linalg.live_mask`); a zero-variance error
    naming the layer when none does. Moments hold float64 values, hence float64's epsilon."""
    live = live_mask(g.diagonal(), mean, n, torch.finfo(torch.float64).eps)
    if not bool(live.any()):
        raise zero_variance_error(name, int(g.shape[0]))
    return live


def sub_matrix(g: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``g[rows][:, cols]`` for boolean masks, without a copy when both select everything."""
    if bool(rows.all()) and bool(cols.all()):
        return g
    return g[rows][:, cols]


def _embed(w: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Rows of ``w`` (live neurons) placed in a zero ``(neurons, r)`` matrix."""
    if bool(live.all()):
        return w
    out = w.new_zeros(live.shape[0], w.shape[1])
    out[live] = w
    return out


def cca_from_moments(
    m: Moments, rtol: Optional[float] = None, names: Tuple[str, str] = ("x", "y")
) -> CCAResult:
    """CCA from :class:`Moments` (no variates: the activations are not known here).

    Zero-variance neurons are dropped; each side is whitened through the eigendecomposition
    of its correlation matrix (see :func:`_linalg.equilibrated_whitener`), whose directions
    below ``rtol`` (default: by the dtype the Grams were formed in) count as absent; the
    canonical correlations are the singular values of the whitened cross matrix.
    """
    rtol = check_rtol(rtol)
    rtol = default_rtol(m.gram_dtype) if rtol is None else rtol
    a, b = names
    lx, ly = live_neurons(m.sxx, m.mx, m.n, a), live_neurons(m.syy, m.my, m.n, b)
    wx, rx = equilibrated_whitener(sub_matrix(m.sxx, lx, lx), rtol)
    wy, ry = equilibrated_whitener(sub_matrix(m.syy, ly, ly), rtol)
    warn_if_few_datapoints(m.n, max(rx, ry), f"{a} and {b}", stacklevel=4)
    cross = wx.mT @ sub_matrix(m.sxy, lx, ly) @ wy
    r = min(rx, ry)
    root = (m.n - 1) ** 0.5
    return CCAResult(
        coefficients=canonical_correlations(cross)[:r],
        x_mean=m.mx / m.scale_x,
        y_mean=m.my / m.scale_y,
        _whitened=(_embed(wx, lx), cross, _embed(wy, ly), root * m.scale_x, root * m.scale_y),
    )


def cca(
    x: Any,
    y: Any,
    *,
    dtype: Optional[torch.dtype] = None,
    rtol: Optional[float] = None,
    names: Tuple[str, str] = ("x", "y"),
) -> CCAResult:
    """Canonical correlation analysis of two layers on the same datapoints.

    Args:
        x: activations ``(datapoints, neurons_x)`` (tensor or numpy array), or
            ``(N, C, H, W)`` conv maps (reduced with :func:`conv_pair_to_datapoints`).
        y: activations ``(datapoints, neurons_y)`` of the same datapoints.
        dtype: ``torch.float32`` or ``torch.float64`` (or their names) for the Gram products;
            default the input's (float16/bfloat16 computed in float32). The small
            ``(neurons, neurons)`` eigenproblems always run in float64.
        rtol: a number in (0, 1): directions of a side's correlation matrix with singular
            value below ``rtol * largest`` count as absent (dead or duplicate neurons);
            default 3e-3 for float32 products, 1e-6 for float64 (see docs/kernels.md).
        names: what error messages call ``x`` and ``y`` (e.g. file names).

    Returns:
        :class:`CCAResult`; ``.mean`` is the mean canonical correlation.

    The result is symmetric in ``x`` and ``y`` and invariant to invertible linear maps of
    either side, and to the scale of the values. Nothing is inverted explicitly: both
    sides are whitened through the eigendecomposition of their Gram matrices. A layer with
    more neurons than datapoints is whitened from its datapoints' ``(n, n)`` Gram instead
    of its neurons' (same rank decision, on its correlation matrix), so no
    ``(neurons, neurons)`` matrix is formed for it. A layer with no variance is an error.
    """
    xt, yt = prepare_pair(x, y, dtype, names=names)
    rtol = check_rtol(rtol)
    names = check_names(names)
    n = int(xt.shape[0])
    if prefer_datapoint_gram(n, xt.shape[1]) or prefer_datapoint_gram(n, yt.shape[1]):
        res = _cca_by_sides(xt, yt, rtol, names)
    else:
        res = cca_from_moments(moments(xt, yt, xt.dtype), rtol, names=names)
    res._x, res._y = xt, yt
    return res


class Side(NamedTuple):
    """One layer prepared on its own for CCA or SVCCA, when it is not worth forming the
    pair's :class:`Moments` (a layer wider than its datapoints).

    ``data`` ``(n, r)``: orthonormal directions over the datapoints (whitened, or the kept
    singular directions); ``w`` ``(d, r)`` float64 with ``A w = data`` for the centred
    layer at its power-of-two scale ``A = (x - mean) * scale`` (dead neurons' rows zero);
    ``mean`` ``(d,)`` at the given scale."""

    data: torch.Tensor
    w: torch.Tensor
    mean: torch.Tensor
    scale: float


def centred_side(z: torch.Tensor, name: str) -> Tuple[bool, CentredLayer]:
    """``(wide, centred layer)``: whether ``z`` ``(datapoints, neurons)`` is prepared from its
    datapoints' Gram (:func:`_linalg.prefer_datapoint_gram`), and the layer centred for that
    side; a ``ZeroVarianceError`` naming ``name`` when no neuron varies."""
    n, d = (int(v) for v in z.shape)
    wide = prefer_datapoint_gram(n, d)
    c = centre_layer(z, z.dtype, neuron_gram=not wide)
    if not bool(c.live.any()):
        raise zero_variance_error(name, d)
    return wide, c


def whitened_side(z: torch.Tensor, name: str, rtol: float) -> Side:
    """:class:`Side` of CCA: the layer whitened through the eigendecomposition of its
    correlation matrix, from the smaller of its two Grams (see
    :func:`_linalg.prefer_datapoint_gram`)."""
    wide, c = centred_side(z, name)
    if wide:
        u, w, _ = datapoint_whitened(c, rtol)
        return Side(u, w, c.mean, c.scale)
    g = unscale(c.gram, c.rel, c.rel)
    live = live_neurons(g, c.mean * c.scale, int(z.shape[0]), name)
    w, _ = equilibrated_whitener(sub_matrix(g, live, live), rtol)
    w = _embed(w, live)
    right = w if c.rel is None else w * c.rel[:, None]
    return Side((c.data @ right.to(c.data.dtype)).to(torch.float64), w, c.mean, c.scale)


def _cca_by_sides(xt: torch.Tensor, yt: torch.Tensor, rtol: Optional[float], names: Tuple[str, str]) -> CCAResult:
    """:func:`cca` when a side is wider than the datapoints: each side whitened on its own
    (its directions over the datapoints ``U``), the canonical correlations the singular
    values of ``Uxᵀ Uy``, which is ``Wxᵀ Sxy Wy`` of :func:`cca_from_moments` without the
    ``(neurons_x, neurons_y)`` cross Gram."""
    rtol = default_rtol(xt.dtype) if rtol is None else rtol
    a, b = names
    sx, sy = whitened_side(xt, a, rtol), whitened_side(yt, b, rtol)
    rx, ry = int(sx.data.shape[1]), int(sy.data.shape[1])
    warn_if_few_datapoints(int(xt.shape[0]), max(rx, ry), f"{a} and {b}", stacklevel=4)
    cross = sx.data.mT @ sy.data
    root = (int(xt.shape[0]) - 1) ** 0.5
    return CCAResult(
        coefficients=canonical_correlations(cross)[: min(rx, ry)],
        x_mean=sx.mean,
        y_mean=sy.mean,
        _whitened=(sx.w, cross, sy.w, root * sx.scale, root * sy.scale),
    )
