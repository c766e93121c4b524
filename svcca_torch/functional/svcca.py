"""SVCCA: SVD-reduce each layer to its top directions, then CCA between the reductions."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Tuple, Union

import torch

from ..utils.validation import (
    check_activations,
    check_dtype,
    check_keep,
    check_keep_rule,
    check_names,
    check_optional_positive_int,
    check_same_datapoints,
    warn_if_few_datapoints,
    warn_keep_capped,
    zero_variance_error,
)
from ._linalg import (
    CentredLayer,
    Eig,
    centre_layer,
    datapoint_gram,
    datapoint_rank,
    default_rtol,
    eigh_desc,
    gram,
    live_columns,
    numerical_rank,
    prefer_datapoint_gram,
    rank_mask,
)
from .cca import CCAResult, Moments, Side, canonical_correlations, centred_side, live_neurons, moments, prepare_pair

KEEP_RULES = ("singular_values", "variance")


@dataclass(eq=False)
class ReducedBasis:
    """A layer reduced to its top-k singular directions over the probe datapoints.

    Attributes:
        basis: ``(datapoints, k)`` orthonormal columns: the top left singular vectors of
            the centred activations ``(datapoints, neurons)``.
        singular_values: ``(k,)`` descending; ``basis * singular_values`` is the centred
            layer projected onto its top-k directions.
        components: ``(neurons, k)`` right singular vectors (neuron-space directions), or
            ``None`` when not kept.
        mean: ``(neurons,)`` neuron means over the datapoints, or ``None``.
        n_neurons: the layer's width before reduction.
    """

    basis: torch.Tensor
    singular_values: torch.Tensor
    n_neurons: int
    components: Optional[torch.Tensor] = None
    mean: Optional[torch.Tensor] = None

    @property
    def k(self) -> int:
        return int(self.basis.shape[1])

    @property
    def n_datapoints(self) -> int:
        return int(self.basis.shape[0])

    def to(self, *args: Any, **kwargs: Any) -> "ReducedBasis":
        """Move/cast every tensor, like :meth:`torch.Tensor.to`."""
        move = lambda t: None if t is None else t.to(*args, **kwargs)  # noqa: E731
        return replace(
            self,
            basis=move(self.basis),
            singular_values=move(self.singular_values),
            components=move(self.components),
            mean=move(self.mean),
        )


def n_directions(
    singular_values: torch.Tensor, keep: Union[int, float], keep_rule: str = "singular_values"
) -> int:
    """How many top directions ``keep`` selects from descending ``singular_values``.

    ``keep`` an int: that many (capped at the number available). ``keep`` a float in
    (0, 1]: the smallest k whose cumulative share reaches ``keep``, where the share is of
    the sum of singular values (``keep_rule="singular_values"``, the google/svcca tutorial
    rule) or of their squares, the explained variance (``keep_rule="variance"``).
    """
    s = singular_values
    keep = check_keep(keep)
    if isinstance(keep, int):
        return max(1, min(keep, int(s.numel())))
    w = s.double() if keep_rule == "singular_values" else s.double() ** 2
    total = float(w.sum())
    if total <= 0:
        return 1
    share = torch.cumsum(w, 0) / total
    # tolerance: a float cumsum of a fraction that is exactly `keep` must not spill over
    k = int(torch.searchsorted(share, torch.tensor(keep - 1e-12, dtype=share.dtype)).item()) + 1
    return max(1, min(k, int(s.numel())))


def _kept(e: Eig, keep, keep_rule: str, max_directions: Optional[int], rtol: float,
          correlation_rank: Callable[[], int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(s_k, vectors_k) of the kept directions of a float64 Gram's eigendecomposition ``e``
    (either side's: the nonzero eigenvalues are the same); ``correlation_rank()`` gives the
    rank decided on the layer's correlation matrix."""
    rank = int(rank_mask(e.values, rtol).sum())
    s = e.values[:rank].sqrt()
    k = n_directions(s, keep, keep_rule) if rank else 0
    if rank and k == rank:
        # Every direction above the threshold is kept: count them on the correlation matrix
        # instead, so that neurons of small scale are not cut by a threshold relative to the
        # largest neuron (the Gram's rounding is relative to each neuron's own norm).
        rank = min(max(rank, correlation_rank()), int(e.values.shape[0]))
        s = e.values[:rank].clamp_min(torch.finfo(torch.float64).tiny).sqrt()
        k = n_directions(s, keep, keep_rule)
    if max_directions is not None:
        k = min(k, int(max_directions))
    return s[:k], e.vectors[:, :k]


def top_directions(sxx: torch.Tensor, keep, keep_rule: str, max_directions: Optional[int], rtol: float):
    """Eigendecompose a centred Gram matrix in float64; return (s_k, V_k) of the kept directions."""
    g = sxx.to(torch.float64)
    return _kept(eigh_desc(g), keep, keep_rule, max_directions, rtol, lambda: numerical_rank(g, rtol))


def top_datapoint_directions(c: CentredLayer, keep, keep_rule: str, max_directions: Optional[int], rtol: float):
    """A wide layer's kept directions from its datapoints' ``(n, n)`` Gram (see
    :func:`_linalg.prefer_datapoint_gram`): (s_k, U_k), float64, ``U_k`` ``(n, k)`` the
    top left singular vectors of the centred layer at its global scale, the same
    decisions as :func:`top_directions` on the neurons' Gram."""
    e = eigh_desc(datapoint_gram(live_columns(c)))
    return _kept(e, keep, keep_rule, max_directions, rtol, lambda: datapoint_rank(c, rtol))


def right_vectors(c: CentredLayer, u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``Aᵀ U / s`` ``(d, k)`` in ``c.data``'s dtype (``A = (x - mean) * scale``, dead
    neurons zero): the right singular vectors belonging to the left ones ``U``, one
    ``(d, n, k)`` product in the data's dtype."""
    p = c.data.mT @ u.to(c.data.dtype)
    f = c.live.to(torch.float64) if c.rel is None else c.rel * c.live
    if not bool((f == 1).all()):
        p = p * f.to(p.dtype)[:, None]
    return p / s.to(p.dtype)


def _capped(keep, width: int, name: str) -> list:
    return [(name, width)] if isinstance(keep, int) and keep > width else []


def svd_reduce(
    x: Any,
    keep: Union[int, float] = 0.99,
    *,
    keep_rule: str = "singular_values",
    max_directions: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    name: str = "x",
) -> ReducedBasis:
    """Reduce a layer to the top singular directions of its centred activations.

    Args:
        x: activations ``(datapoints, neurons)``, tensor or numpy array.
        keep: int, a fixed number of directions; float in (0, 1], the fraction of the
            singular-value sum (``keep_rule="singular_values"``) or of the variance
            (``keep_rule="variance"``) to retain. See :func:`n_directions`. An int above
            the layer's neurons keeps all of them, with a warning.
        max_directions: an upper bound on k (bounds memory of stored bases); None or an int >= 1.
        dtype: ``torch.float32``/``torch.float64`` (or their names) for the products
            (default: the input's; float16/bfloat16 computed in float32).
        name: how error messages call ``x`` (e.g. ``"xs[2]"``).

    Returns:
        :class:`ReducedBasis` with an orthonormal ``(datapoints, k)`` basis, in the
        compute dtype and on ``x``'s device.

    The directions come from the float64 eigendecomposition of the smaller Gram matrix.
    With at most as many neurons as datapoints, the ``(neurons, neurons)`` one gives the
    neuron-space directions, and the basis is then re-orthonormalised (a float64-factored
    Cholesky-QR step) so that its columns are orthonormal to working precision. A wider
    layer (neurons > datapoints, e.g. a flattened token layer) is decomposed from the
    ``(datapoints, datapoints)`` Gram instead: its eigenvectors are the basis, and the
    components are ``Aᵀ U / s``, re-orthonormalised the same way. Either way the cost is
    ``O(n d min(n, d))`` and no ``(max(n, d), max(n, d))`` matrix is formed; dead neurons,
    the power-of-two rescaling and the rank decisions are the same on both sides. Values of
    any magnitude work (the products are rescaled by powers of two when needed); a layer
    whose neurons are all constant is an error.
    """
    keep, keep_rule = check_keep_rule(keep, keep_rule)
    max_directions = check_optional_positive_int(max_directions, "max_directions")
    if not isinstance(name, str):
        raise ValueError(f"`name` must be a string, got {name!r}.")
    xt = check_activations(x, name, dtype=check_dtype(dtype))
    wide = prefer_datapoint_gram(*xt.shape)
    c = centre_layer(xt, xt.dtype, neuron_gram=not wide)
    if not bool(c.live.any()):
        raise zero_variance_error(name, int(xt.shape[1]), xt.dtype)
    warn_keep_capped(keep, _capped(keep, int(xt.shape[1]), name))
    rtol = default_rtol(xt.dtype)
    if wide:
        s, u = top_datapoint_directions(c, keep, keep_rule, max_directions, rtol)
        if s.numel() == 0:
            raise zero_variance_error(name, int(xt.shape[1]), xt.dtype)
        v = _orthonormalise(right_vectors(c, u, s))
        basis = u
    else:
        s, v = top_directions(c.gram if c.rel is None else c.gram * c.rel[:, None] * c.rel[None, :],
                              keep, keep_rule, max_directions, rtol)
        if s.numel() == 0:
            raise zero_variance_error(name, int(xt.shape[1]), xt.dtype)
        basis = _orthonormal_projection(c.data, v if c.rel is None else v * c.rel[:, None], s)
    return ReducedBasis(
        basis=basis.to(xt.dtype),
        singular_values=(s / c.scale).to(xt.dtype),
        n_neurons=int(xt.shape[1]),
        components=v.to(xt.dtype),
        mean=c.mean,
    )


def _orthonormal_projection(xc: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``xc @ v / s`` made orthonormal to working precision by one Cholesky-QR step.

    The columns are already orthonormal up to rounding amplified by the condition of the
    kept directions; one step with a float64 Cholesky factor of their (small) Gram matrix
    restores orthonormality in the working dtype at the cost of two ``(n, k, k)`` products.
    """
    return _orthonormalise((xc @ v.to(xc.dtype)) / s.to(xc.dtype))


def _orthonormalise(u: torch.Tensor) -> torch.Tensor:
    """Columns nearly orthonormal made orthonormal to working precision: one Cholesky-QR
    step (the ``(k, k)`` Gram in ``u``'s dtype, factored in float64), Householder QR when
    that Gram is numerically singular."""
    chol, info = torch.linalg.cholesky_ex(gram(u).to(torch.float64))
    if int(info) != 0:  # numerically singular: fall back to Householder QR
        return torch.linalg.qr(u).Q
    return torch.linalg.solve_triangular(chol.to(u.dtype), u.mT, upper=False).mT


@dataclass(eq=False)
class SVCCAResult(CCAResult):
    """:class:`CCAResult` of the reduced layers, plus how many directions each side kept."""

    k_x: int = 0
    k_y: int = 0


def svcca(
    x: Any,
    y: Any,
    keep: Union[int, float] = 0.99,
    *,
    keep_rule: str = "singular_values",
    dtype: Optional[torch.dtype] = None,
    names: Tuple[str, str] = ("x", "y"),
) -> SVCCAResult:
    """Singular Vector CCA (Raghu et al. 2017) of two layers on the same datapoints.

    Args:
        x: activations ``(datapoints, neurons_x)`` (tensor or numpy array), ``(N, C, H, W)``
            conv maps, or a :class:`ReducedBasis` from :func:`svd_reduce`.
        y: the same for the other layer; same datapoints in the same order.
        keep: int, keep that many top singular directions of each centred layer (all of a
            narrower layer's, with a warning); float in (0, 1], keep the smallest k whose
            cumulative sum of singular values reaches that fraction
            (``keep_rule="singular_values"``, google/svcca's rule), or whose cumulative sum
            of squared singular values does (``keep_rule="variance"``).
        dtype: ``torch.float32``/``torch.float64`` (or their names) for the Gram products;
            default the input's (float32 stays float32, accurate to ~1e-6 here because only
            large directions are kept; the small eigenproblems always run in float64).
        names: what error messages call ``x`` and ``y`` (e.g. file names).

    Returns:
        :class:`SVCCAResult`: ``.mean`` is the SVCCA similarity, ``.coefficients`` the
        ``min(k_x, k_y)`` canonical correlations, ``.k_x``/``.k_y`` the kept directions,
        weights map each layer's (centred) neurons to canonical variates.

    Symmetric in ``x`` and ``y``; invariant to neuron permutation, to the scale of the
    values, and to invertible linear maps only up to the SVD truncation (exactly, when
    ``keep`` keeps all directions). A layer with more neurons than datapoints is reduced
    from its datapoints' ``(n, n)`` Gram (as :func:`svd_reduce` does), and the pair's
    ``(neurons, neurons)`` Grams are then not formed.
    """
    keep, keep_rule = check_keep_rule(keep, keep_rule)
    names = check_names(names)
    dtype = check_dtype(dtype)
    if isinstance(x, ReducedBasis) or isinstance(y, ReducedBasis):
        return _svcca_from_bases(x, y, keep, keep_rule, dtype, names)
    xt, yt = prepare_pair(x, y, dtype, names=names)
    warn_keep_capped(keep, _capped(keep, int(xt.shape[1]), names[0]) + _capped(keep, int(yt.shape[1]), names[1]))
    n = int(xt.shape[0])
    if prefer_datapoint_gram(n, xt.shape[1]) or prefer_datapoint_gram(n, yt.shape[1]):
        res = _svcca_by_sides(xt, yt, keep, keep_rule, names)
    else:
        res = svcca_from_moments(moments(xt, yt, xt.dtype), keep, keep_rule, names=names)
    res._x, res._y = xt, yt
    return res


def reduced_side(z: torch.Tensor, name: str, keep, keep_rule: str, rtol: float) -> Tuple[Side, torch.Tensor]:
    """A layer's kept singular directions as a :class:`cca.Side` (``w`` = ``V_k / s_k``),
    from the smaller of its two Grams, and their singular values (at its scale)."""
    wide, c = centred_side(z, name)
    d = int(z.shape[1])
    if wide:
        s, u = top_datapoint_directions(c, keep, keep_rule, None, rtol)
        if s.numel() == 0:
            raise zero_variance_error(name, d)
        return Side(u, right_vectors(c, u, s).to(torch.float64) / s, c.mean, c.scale), s
    g = c.gram if c.rel is None else c.gram * c.rel[:, None] * c.rel[None, :]
    s, v = top_directions(g, keep, keep_rule, None, rtol)
    if s.numel() == 0:
        raise zero_variance_error(name, d)
    w = v / s
    right = w if c.rel is None else w * c.rel[:, None]
    return Side((c.data @ right.to(c.data.dtype)).to(torch.float64), w, c.mean, c.scale), s


def _svcca_by_sides(xt: torch.Tensor, yt: torch.Tensor, keep, keep_rule: str, names: Tuple[str, str]) -> SVCCAResult:
    """:func:`svcca` when a side is wider than the datapoints: each side reduced on its own,
    the CCA of the reductions the singular values of ``Uxᵀ Uy`` (which is
    ``(Vx/sx)ᵀ Sxy (Vy/sy)`` of :func:`svcca_from_moments` without the cross Gram)."""
    a, b = names
    rtol = default_rtol(xt.dtype)
    (sx, _), (sy, _) = reduced_side(xt, a, keep, keep_rule, rtol), reduced_side(yt, b, keep, keep_rule, rtol)
    kx, ky = int(sx.data.shape[1]), int(sy.data.shape[1])
    warn_if_few_datapoints(int(xt.shape[0]), max(kx, ky), f"{a} and {b}", stacklevel=4)
    cross = sx.data.mT @ sy.data
    root = (int(xt.shape[0]) - 1) ** 0.5
    return SVCCAResult(
        coefficients=canonical_correlations(cross),
        x_mean=sx.mean,
        y_mean=sy.mean,
        _whitened=(sx.w, cross, sy.w, root * sx.scale, root * sy.scale),
        k_x=kx,
        k_y=ky,
    )


def svcca_from_moments(
    m: Moments,
    keep: Union[int, float] = 0.99,
    keep_rule: str = "singular_values",
    names: Tuple[str, str] = ("x", "y"),
) -> SVCCAResult:
    """SVCCA from :class:`Moments`: the top directions of each side come from the float64
    eigendecomposition of its Gram matrix; the CCA of the reduced sides is the SVD of
    ``(Vx/sx)ᵀ Sxy (Vy/sy)``, a ``(k_x, k_y)`` matrix."""
    keep, keep_rule = check_keep_rule(keep, keep_rule)
    a, b = names
    live_neurons(m.sxx, m.mx, m.n, a), live_neurons(m.syy, m.my, m.n, b)
    rtol = default_rtol(m.gram_dtype)
    sx, vx = top_directions(m.sxx, keep, keep_rule, None, rtol)
    sy, vy = top_directions(m.syy, keep, keep_rule, None, rtol)
    for s, name, g in ((sx, a, m.sxx), (sy, b, m.syy)):
        if s.numel() == 0:
            raise zero_variance_error(name, int(g.shape[0]))
    warn_if_few_datapoints(m.n, max(len(sx), len(sy)), f"{a} and {b}", stacklevel=4)
    wx, wy = vx / sx, vy / sy
    cross = wx.mT @ m.sxy.to(torch.float64) @ wy
    root = (m.n - 1) ** 0.5
    return SVCCAResult(
        coefficients=canonical_correlations(cross),
        x_mean=m.mx / m.scale_x,
        y_mean=m.my / m.scale_y,
        _whitened=(wx, cross, wy, root * m.scale_x, root * m.scale_y),
        k_x=len(sx),
        k_y=len(sy),
    )


def _as_basis(z: Any, name: str, keep, keep_rule: str, dtype) -> ReducedBasis:
    if isinstance(z, ReducedBasis):
        if isinstance(keep, int) and keep < z.k:  # a fixed k below what was stored: truncate
            return replace(z, basis=z.basis[:, :keep], singular_values=z.singular_values[:keep])
        return z
    return svd_reduce(z, keep, keep_rule=keep_rule, dtype=dtype, name=name)


def _svcca_from_bases(x: Any, y: Any, keep, keep_rule: str, dtype, names: Tuple[str, str]) -> SVCCAResult:
    """SVCCA when one side or both are already reduced: singular values of ``Uxᵀ Uy``."""
    bx, by = _as_basis(x, names[0], keep, keep_rule, dtype), _as_basis(y, names[1], keep, keep_rule, dtype)
    check_same_datapoints(bx.basis, by.basis, names)
    m = bx.basis.to(torch.float64).mT @ by.basis.to(torch.float64)
    warn_if_few_datapoints(bx.n_datapoints, max(bx.k, by.k), f"{names[0]} and {names[1]}")
    eye = lambda k: torch.eye(k, dtype=torch.float64, device=m.device)  # noqa: E731
    # weights on the basis coordinates (the neurons are not known from a basis alone)
    return SVCCAResult(
        coefficients=canonical_correlations(m),
        x_mean=torch.zeros(bx.k, dtype=torch.float64, device=m.device),
        y_mean=torch.zeros(by.k, dtype=torch.float64, device=m.device),
        _whitened=(eye(bx.k), m, eye(by.k), 1.0, 1.0),
        _x=bx.basis.to(torch.float64) * (bx.n_datapoints - 1) ** 0.5,
        _y=by.basis.to(torch.float64) * (by.n_datapoints - 1) ** 0.5,
        k_x=bx.k,
        k_y=by.k,
    )
