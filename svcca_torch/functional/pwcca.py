"""Projection-weighted CCA (Morcos, Raghu & Bengio, NeurIPS 2018)."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from ..utils.validation import check_choice, check_dtype, check_names, warn_if_few_datapoints
from ._linalg import default_rtol, eigh_desc, numerical_rank, rank_mask
from .cca import Moments, cca, live_neurons, moments, prepare_pair, sub_matrix

PWCCA_METHODS = ("reference", "paper")


def pwcca(
    x: Any,
    y: Any,
    *,
    method: str = "reference",
    dtype: Optional[torch.dtype] = None,
    names: Tuple[str, str] = ("x", "y"),
) -> float:
    """Projection-weighted CCA similarity of two layers. **Asymmetric**: ``pwcca(x, y) != pwcca(y, x)``.

    Args:
        x: activations ``(datapoints, neurons_x)`` (tensor or numpy array) or ``(N, C, H, W)``.
        y: activations ``(datapoints, neurons_y)`` of the same datapoints.
        method: ``"reference"`` (default) reproduces google/svcca's ``compute_pwcca``, which
            published PWCCA results were computed with: the weights come from the side
            with fewer live neurons (``x`` on a tie), from its canonical directions applied
            to its centred neurons *with the neuron means added back*, orthonormalised in
            order (QR), projected on the *uncentred* neurons. Unlike the reference, it works
            whichever side is smaller. ``"paper"`` is the paper's definition: weights
            ``α_i = Σ_j |⟨h_i, z_j⟩|`` from ``x``'s unit-norm canonical variates ``h_i`` and
            its centred neurons ``z_j``.
        dtype: ``torch.float32``/``torch.float64`` (or their names) for the Gram products;
            default the input's (the small eigenproblems and SVD run in float64).
        names: what error messages call ``x`` and ``y`` (e.g. file names).

    Returns:
        ``Σ_i α_i ρ_i`` with weights ``α`` normalised to sum 1, a float in [0, 1].

    Zero-variance (dead) neurons are dropped first, as in the reference; on layers with
    linearly dependent neurons only the true canonical pairs are weighted (the reference also
    weights null-space directions with ρ = 0, so a layer against itself scores below 1). Computed from the
    three Gram matrices only: the in-order QR of the projected directions is obtained from
    a Cholesky factor of their Gram matrix (a Householder QR over the datapoints is the
    fallback when that is ill-conditioned); nothing is inverted explicitly.
    """
    check_choice(method, "method", PWCCA_METHODS)
    names = check_names(names)
    xt, yt = prepare_pair(x, y, check_dtype(dtype), names=names)
    if method == "paper":
        return _pwcca_paper(xt, yt, names)
    m = moments(xt, yt, xt.dtype)
    return pwcca_from_moments(m, x=xt, y=yt, names=names)


def pwcca_from_moments(
    m: Moments,
    x: Optional[torch.Tensor] = None,
    y: Optional[torch.Tensor] = None,
    names: Tuple[str, str] = ("x", "y"),
) -> float:
    """The ``"reference"`` PWCCA of :func:`pwcca` from :class:`Moments` alone.

    ``x``/``y`` (the activations) are only needed for the Householder-QR fallback when the
    projected directions are ill-conditioned; without them that case is an error.
    """
    live_x, live_y = live_neurons(m.sxx, m.mx, m.n, names[0]), live_neurons(m.syy, m.my, m.n, names[1])
    sxx, syy = sub_matrix(m.sxx, live_x, live_x), sub_matrix(m.syy, live_y, live_y)
    sxy = sub_matrix(m.sxy, live_x, live_y)
    if len(sxx) <= len(syy):
        mu, sss, soo, sso, data, c = m.mx[live_x], sxx, syy, sxy, _cols(x, live_x), m.scale_x
    else:
        mu, sss, soo, sso, data, c = m.my[live_y], syy, sxx, sxy.mT, _cols(y, live_y), m.scale_y
    rtol = default_rtol(m.gram_dtype)
    es, eo = eigh_desc(sss), eigh_desc(soo)
    # The rank is decided on the correlation matrices (scale-free, like CCA itself); the
    # symmetric inverse square roots then use that many top eigenpairs of the Grams.
    ms, mo = _rank_mask(es, sss, rtol), _rank_mask(eo, soo, rtol)
    vs, vo = es.vectors[:, ms], eo.vectors[:, mo]
    ws = vs * es.values[ms].rsqrt()
    wo = vo * eo.values[mo].rsqrt()
    warn_if_few_datapoints(m.n, int(max(ms.sum(), mo.sum())), f"{names[0]} and {names[1]}", stacklevel=4)
    # Σss^{-1/2} Σso Σoo^{-1/2} with the symmetric (range-restricted) inverse square roots.
    # Its SVD runs on the CPU in float64 so that singular-vector signs follow LAPACK's, as
    # numpy's do in the reference: the added-back means make the weights sign-dependent.
    m_sym = (vs @ (ws.mT @ sso @ wo) @ vo.mT).to("cpu", torch.float64)
    u, rho, _ = torch.linalg.svd(m_sym, full_matrices=False)
    # Only the min(rank_s, rank_o) true canonical pairs: the reference also keeps directions
    # in the null space of a rank-deficient side (duplicate neurons), with ρ = 0, which pulls
    # a layer's similarity to itself below 1. On full-rank layers nothing changes.
    r = int(min(ms.sum(), mo.sum()))
    u, rho = u[:, :r].to(sss.device, sss.dtype), rho[:r].to(sss.device, sss.dtype)
    mu = mu.to(sss.dtype)
    # D = (S - μ) u + 1 μ[:r]ᵀ (datapoints x directions); D = P R in order.
    # DᵀD and Dᵀ S follow from the Grams because the centred part is orthogonal to 1.
    dtd = u.mT @ sss @ u + m.n * torch.outer(mu[:r], mu[:r])
    dts = u.mT @ sss + m.n * torch.outer(mu[:r], mu)
    chol, info = torch.linalg.cholesky_ex(dtd)
    diag = chol.diagonal() if int(info) == 0 else None
    if diag is not None and float(diag.min()) > 1e-4 * float(diag.max()):
        proj = torch.linalg.solve_triangular(chol, dts, upper=False)  # Pᵀ S
    elif data is not None:
        sd = data.to(sss.dtype) * c
        proj = torch.linalg.qr((sd - mu) @ u + mu[:r]).Q.mT @ sd
    else:
        raise ValueError(
            "PWCCA's projected directions are numerically dependent (linearly dependent neurons); "
            "from accumulated statistics this needs the activations: call svcca_torch.pwcca(x, y)."
        )
    weights = proj.abs().sum(1)
    return float((weights / weights.sum() * rho).sum())


def _cols(data: Optional[torch.Tensor], live: torch.Tensor) -> Optional[torch.Tensor]:
    return data if data is None or bool(live.all()) else data[:, live]


def _rank_mask(e, g: torch.Tensor, rtol: float) -> torch.Tensor:
    """The top eigenpairs that count: by the threshold on ``g``'s own eigenvalues, or, when
    that drops a direction, by the (scale-free) rank of its correlation matrix if larger."""
    mask = rank_mask(e.values, rtol)
    if bool(mask.all()):
        return mask
    rank = max(int(mask.sum()), numerical_rank(g, rtol))
    return torch.arange(len(g), device=g.device) < rank


def _pwcca_paper(x: torch.Tensor, y: torch.Tensor, names: Tuple[str, str]) -> float:
    res = cca(x, y, names=names)
    h = res.x_variates
    h = h / h.norm(dim=0, keepdim=True)
    z = (x - x.mean(0)).to(h.dtype)
    weights = (h.mT @ z).abs().sum(1)
    return float((weights / weights.sum() * res.coefficients).sum())
