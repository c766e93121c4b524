"""Independent float64 numpy implementations of the textbook formulas, for the tests.

Written from the definitions with different linear algebra than the package (QR of the
data, SVD of the data, explicit pseudo-inverses, (n, n) kernel matrices) so that an error
in the package's Gram-matrix route cannot hide behind the same error here.
Activations are (datapoints, neurons).
"""
from __future__ import annotations

import numpy as np


def _centre(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(0)


def _orth(x: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """Orthonormal basis of the column span of x, via the SVD of the data."""
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return u[:, s > rtol * s[0]]


def cca_coefficients(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Canonical correlations = cosines of the principal angles between the centred spans."""
    qx, qy = _orth(_centre(x)), _orth(_centre(y))
    return np.linalg.svd(qx.T @ qy, compute_uv=False)[: min(qx.shape[1], qy.shape[1])]


def svd_keep(s: np.ndarray, keep, rule: str = "singular_values") -> int:
    if isinstance(keep, int):
        return min(keep, len(s))
    w = s if rule == "singular_values" else s**2
    frac = np.cumsum(w) / w.sum()
    return int(np.argmax(frac >= keep - 1e-12)) + 1


def svcca_coefficients(x: np.ndarray, y: np.ndarray, keep=0.99, rule: str = "singular_values"):
    reduced = []
    for a in (x, y):
        u, s, _ = np.linalg.svd(_centre(a), full_matrices=False)
        k = svd_keep(s, keep, rule)
        reduced.append(u[:, :k] * s[:k])
    return cca_coefficients(*reduced), reduced[0].shape[1], reduced[1].shape[1]


def _inv_sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Symmetric inverse square root via pinv then the PSD square root (the reference's route)."""
    inv = np.linalg.pinv(m, rcond=1e-12, hermitian=True)
    w, v = np.linalg.eigh(inv)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def pwcca_reference(x: np.ndarray, y: np.ndarray) -> float:
    """The published recipe, in neurons x datapoints terms, literally."""
    a1, a2 = np.asarray(x, np.float64).T, np.asarray(y, np.float64).T
    a1 = a1[a1.std(1) > 0]
    a2 = a2[a2.std(1) > 0]
    swap = a1.shape[0] > a2.shape[0]
    s_act, o_act = (a2, a1) if swap else (a1, a2)
    cov = np.cov(np.vstack([s_act, o_act]))
    ds = s_act.shape[0]
    sss, soo, sso = cov[:ds, :ds], cov[ds:, ds:], cov[:ds, ds:]
    arr = _inv_sqrt_psd(sss) @ sso @ _inv_sqrt_psd(soo)
    u, rho, _ = np.linalg.svd(arr)
    mu = s_act.mean(1, keepdims=True)
    dirns = u.T @ (s_act - mu) + mu
    p, _ = np.linalg.qr(dirns.T)
    weights = np.abs(p.T @ s_act.T).sum(1)
    weights = weights / weights.sum()
    return float((weights * rho[: len(weights)]).sum())


def linear_cka(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    """Kornblith et al.'s CKA with (n, n) Gram matrices; U-centring when debiased."""
    k, l = _centre(x) @ _centre(x).T, _centre(y) @ _centre(y).T

    def centre_gram(g):
        g = g.copy()
        n = g.shape[0]
        if debiased:
            np.fill_diagonal(g, 0)
            means = g.sum(0) / (n - 2)
            means -= means.sum() / (2 * (n - 1))
            g -= means[:, None]
            g -= means[None, :]
            np.fill_diagonal(g, 0)
        else:
            h = np.eye(n) - 1.0 / n
            g = h @ g @ h
        return g

    kc, lc = centre_gram(k), centre_gram(l)
    return float((kc * lc).sum() / np.sqrt((kc * kc).sum() * (lc * lc).sum()))
