"""Projection-weighted CCA (Morcos, Raghu & Bengio, NeurIPS 2018)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..utils.validation import check_choice, warn_if_few_datapoints
from ._linalg import default_rtol, eigh_desc, rank_mask
from .cca import cca, moments, prepare_pair

PWCCA_METHODS = ("reference", "paper")


def pwcca(
    x: Any,
    y: Any,
    *,
    method: str = "reference",
    dtype: Optional[torch.dtype] = None,
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
        dtype: compute dtype (default float64 for the Gram matrices).

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
    xt, yt = prepare_pair(x, y, dtype)
    if method == "paper":
        return _pwcca_paper(xt, yt, dtype)
    gdt = dtype or torch.float64
    xt, yt = _drop_dead(xt, "x"), _drop_dead(yt, "y")
    if xt.shape[1] <= yt.shape[1]:
        s, o = xt, yt
    else:
        s, o = yt, xt
    mu, _, sss, soo, sso = moments(s, o, gdt)
    rtol = default_rtol(gdt)
    es, eo = eigh_desc(sss), eigh_desc(soo)
    ms, mo = rank_mask(es.values, rtol), rank_mask(eo.values, rtol)
    vs, vo = es.vectors[:, ms], eo.vectors[:, mo]
    ws = vs * es.values[ms].rsqrt()
    wo = vo * eo.values[mo].rsqrt()
    warn_if_few_datapoints(s.shape[0], s.shape[1], "x and y")
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
    n = s.shape[0]
    mu = mu.to(sss.dtype)
    # D = (S - μ) u + 1 μ[:r]ᵀ (datapoints x directions); D = P R in order.
    # DᵀD and Dᵀ S follow from the Grams because the centred part is orthogonal to 1.
    dtd = u.mT @ sss @ u + n * torch.outer(mu[:r], mu[:r])
    dts = u.mT @ sss + n * torch.outer(mu[:r], mu)
    chol, info = torch.linalg.cholesky_ex(dtd)
    diag = chol.diagonal() if int(info) == 0 else None
    if diag is not None and float(diag.min()) > 1e-4 * float(diag.max()):
        proj = torch.linalg.solve_triangular(chol, dts, upper=False)  # Pᵀ S
    else:
        sd = s.to(sss.dtype)
        d = (sd - mu) @ u + mu[:r]
        proj = torch.linalg.qr(d).Q.mT @ sd
    weights = proj.abs().sum(1)
    return float((weights / weights.sum() * rho).sum())


def _drop_dead(t: torch.Tensor, name: str) -> torch.Tensor:
    live = t.var(0) > 0
    if not bool(live.any()):
        raise ValueError(f"`{name}` has zero variance: every neuron is constant over the datapoints.")
    return t if bool(live.all()) else t[:, live]


def _pwcca_paper(x: torch.Tensor, y: torch.Tensor, dtype: Optional[torch.dtype]) -> float:
    res = cca(x, y, dtype=dtype or torch.float64)
    h = res.x_variates
    h = h / h.norm(dim=0, keepdim=True)
    z = (x - x.mean(0)).to(h.dtype)
    weights = (h.mT @ z).abs().sum(1)
    return float((weights / weights.sum() * res.coefficients).sum())
