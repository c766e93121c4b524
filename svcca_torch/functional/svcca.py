"""SVCCA: SVD-reduce each layer to its top directions, then CCA between the reductions."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Union

import torch

from ..utils.validation import (
    check_activations,
    check_choice,
    check_keep,
    check_same_datapoints,
    warn_if_few_datapoints,
    zero_variance_error,
)
from ._linalg import default_rtol, eigh_desc, gram, rank_mask
from .cca import CCAResult, Moments, canonical_correlations, moments, prepare_pair

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


def _gram_dtype(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    return dtype or x.dtype


def top_directions(sxx: torch.Tensor, keep, keep_rule: str, max_directions: Optional[int], rtol: float):
    """Eigendecompose a centred Gram matrix in float64; return (s_k, V_k) of the kept directions."""
    e = eigh_desc(sxx.to(torch.float64))
    rank = int(rank_mask(e.values, rtol).sum())
    s = e.values[:rank].sqrt()
    k = n_directions(s, keep, keep_rule) if rank else 0
    if max_directions is not None:
        k = min(k, int(max_directions))
    return s[:k], e.vectors[:, :k]


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
            (``keep_rule="variance"``) to retain. See :func:`n_directions`.
        max_directions: an upper bound on k (bounds memory of stored bases).
        dtype: compute dtype (default: the input's; float16/bfloat16 upcast to float32).
        name: how error messages call ``x`` (e.g. ``"xs[2]"``).

    Returns:
        :class:`ReducedBasis` with an orthonormal ``(datapoints, k)`` basis, in the
        compute dtype and on ``x``'s device.

    The neuron-space directions come from the float64 eigendecomposition of the
    ``(neurons, neurons)`` Gram matrix; the basis is then re-orthonormalised (a float64
    Cholesky-QR step) so that its columns are orthonormal to working precision.
    """
    keep = check_keep(keep)
    check_choice(keep_rule, "keep_rule", KEEP_RULES)
    xt = check_activations(x, name, dtype=dtype)
    mean = xt.mean(0)
    xc = xt - mean
    gdt = _gram_dtype(xt, dtype)
    s, v = top_directions(gram(xc.to(gdt)), keep, keep_rule, max_directions, default_rtol(gdt))
    if s.numel() == 0:
        raise zero_variance_error(name)
    basis = _orthonormal_projection(xc, v, s)
    return ReducedBasis(
        basis=basis.to(xt.dtype),
        singular_values=s.to(xt.dtype),
        n_neurons=int(xt.shape[1]),
        components=v.to(xt.dtype),
        mean=mean,
    )


def _orthonormal_projection(xc: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``xc @ v / s`` made orthonormal to working precision by one Cholesky-QR step.

    The columns are already orthonormal up to rounding amplified by the condition of the
    kept directions; one step with a float64 Cholesky factor of their (small) Gram matrix
    restores orthonormality in the working dtype at the cost of two ``(n, k, k)`` products.
    """
    u = (xc @ v.to(xc.dtype)) / s.to(xc.dtype)
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
) -> SVCCAResult:
    """Singular Vector CCA (Raghu et al. 2017) of two layers on the same datapoints.

    Args:
        x: activations ``(datapoints, neurons_x)`` (tensor or numpy array), ``(N, C, H, W)``
            conv maps, or a :class:`ReducedBasis` from :func:`svd_reduce`.
        y: the same for the other layer; same datapoints in the same order.
        keep: int, keep that many top singular directions of each centred layer; float in
            (0, 1], keep the smallest k whose cumulative sum of singular values reaches that
            fraction (``keep_rule="singular_values"``, google/svcca's rule), or whose
            cumulative sum of squared singular values does (``keep_rule="variance"``).
        dtype: compute dtype; default the input's (float32 stays float32 for the Gram
            products, which is accurate to ~1e-5 here because only large directions are
            kept; the small eigen-problems are always solved in float64).

    Returns:
        :class:`SVCCAResult`: ``.mean`` is the SVCCA similarity, ``.coefficients`` the
        ``min(k_x, k_y)`` canonical correlations, ``.k_x``/``.k_y`` the kept directions,
        weights map each layer's (centred) neurons to canonical variates.

    Symmetric in ``x`` and ``y``; invariant to neuron permutation and to invertible
    linear maps only up to the SVD truncation (exactly, when ``keep`` keeps all directions).
    """
    keep = check_keep(keep)
    check_choice(keep_rule, "keep_rule", KEEP_RULES)
    if isinstance(x, ReducedBasis) or isinstance(y, ReducedBasis):
        return _svcca_from_bases(x, y, keep, keep_rule, dtype)
    xt, yt = prepare_pair(x, y, dtype)
    res = svcca_from_moments(moments(xt, yt, _gram_dtype(xt, dtype)), keep, keep_rule)
    res._x, res._y = xt, yt
    return res


def svcca_from_moments(m: Moments, keep: Union[int, float] = 0.99, keep_rule: str = "singular_values") -> SVCCAResult:
    """SVCCA from :class:`Moments`: the top directions of each side come from the float64
    eigendecomposition of its Gram matrix; the CCA of the reduced sides is the SVD of
    ``(Vx/sx)ᵀ Sxy (Vy/sy)``, a ``(k_x, k_y)`` matrix."""
    rtol = default_rtol(m.sxx.dtype)
    sx, vx = top_directions(m.sxx, keep, keep_rule, None, rtol)
    sy, vy = top_directions(m.syy, keep, keep_rule, None, rtol)
    for s, name in ((sx, "x"), (sy, "y")):
        if s.numel() == 0:
            raise zero_variance_error(name)
    warn_if_few_datapoints(m.n, max(len(sx), len(sy)), "x and y", stacklevel=4)
    wx, wy = vx / sx, vy / sy
    cross = wx.mT @ m.sxy.to(torch.float64) @ wy
    return SVCCAResult(
        coefficients=canonical_correlations(cross),
        x_mean=m.mx,
        y_mean=m.my,
        _whitened=(wx, cross, wy, (m.n - 1) ** 0.5),
        k_x=len(sx),
        k_y=len(sy),
    )


def _as_basis(z: Any, name: str, keep, keep_rule: str, dtype) -> ReducedBasis:
    if isinstance(z, ReducedBasis):
        if isinstance(keep, int) and keep < z.k:  # a fixed k below what was stored: truncate
            return replace(z, basis=z.basis[:, :keep], singular_values=z.singular_values[:keep])
        return z
    return svd_reduce(z, keep, keep_rule=keep_rule, dtype=dtype, name=name)


def _svcca_from_bases(x: Any, y: Any, keep, keep_rule: str, dtype) -> SVCCAResult:
    """SVCCA when one side or both are already reduced: singular values of ``Uxᵀ Uy``."""
    bx, by = _as_basis(x, "x", keep, keep_rule, dtype), _as_basis(y, "y", keep, keep_rule, dtype)
    check_same_datapoints(bx.basis, by.basis)
    m = bx.basis.to(torch.float64).mT @ by.basis.to(torch.float64)
    warn_if_few_datapoints(bx.n_datapoints, max(bx.k, by.k), "x and y")
    eye = lambda k: torch.eye(k, dtype=torch.float64, device=m.device)  # noqa: E731
    # weights on the basis coordinates (the neurons are not known from a basis alone)
    return SVCCAResult(
        coefficients=canonical_correlations(m),
        x_mean=torch.zeros(bx.k, dtype=torch.float64, device=m.device),
        y_mean=torch.zeros(by.k, dtype=torch.float64, device=m.device),
        _whitened=(eye(bx.k), m, eye(by.k), 1.0),
        _x=bx.basis.to(torch.float64) * (bx.n_datapoints - 1) ** 0.5,
        _y=by.basis.to(torch.float64) * (by.n_datapoints - 1) ** 0.5,
        k_x=bx.k,
        k_y=by.k,
    )
