"""Similarity of every pair of layers, each layer reduced once."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ..utils.validation import check_activations, check_choice, check_same_datapoints, warn_if_few_datapoints
from .cka import linear_cka
from .pwcca import pwcca
from .svcca import ReducedBasis, svd_reduce

METHODS = ("svcca", "cca", "pwcca", "cka")
Layers = Union[Sequence[Any], Mapping[str, Any]]


def _as_list(layers: Layers, name: str) -> list:
    items = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
    if not items:
        raise ValueError(f"`{name}` is empty: pass a sequence (or dict) of layer activations.")
    return items


def similarity_matrix(
    xs: Layers,
    ys: Optional[Layers] = None,
    method: str = "svcca",
    *,
    keep: Union[int, float] = 0.99,
    keep_rule: str = "singular_values",
    dtype: Optional[torch.dtype] = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Similarity of every layer in ``xs`` with every layer in ``ys``.

    Args:
        xs: a sequence (or dict, in its order) of activations ``(datapoints, neurons)``,
            all on the same datapoints; for ``method="svcca"`` also :class:`ReducedBasis`
            objects (e.g. from a :class:`RepresentationStore`), used as they are.
        ys: the same for the other axis; default ``xs`` (a layers-by-layers matrix).
        method: ``"svcca"``, ``"cca"``, ``"pwcca"`` or ``"cka"`` (linear CKA).
        keep, keep_rule: SVCCA's truncation (see :func:`svcca`).
        dtype: compute dtype.
        **kwargs: passed to :func:`pwcca` (``method=``) or :func:`linear_cka` (``debiased=``).

    Returns:
        float64 tensor ``(len(xs), len(ys))``; entry ``[i, j]`` compares ``xs[i]`` with ``ys[j]``
        (for the asymmetric PWCCA, weights come from ``xs[i]``'s side per :func:`pwcca`).

    SVCCA and CCA reduce each layer to an orthonormal basis once; a pair then costs one
    ``(k_i, k_j)`` block of a single ``Bxᵀ By`` product and its singular values (batched
    over all pairs). CKA centres each layer once and costs one cross product per pair.
    PWCCA is computed pair by pair.
    """
    check_choice(method, "method", METHODS)
    lx = _as_list(xs, "xs")
    ly = lx if ys is None else _as_list(ys, "ys")
    if method in ("svcca", "cca"):
        if method == "cca":
            keep, keep_rule = 10**9, "singular_values"  # every direction above the rank threshold
        bx = [_basis(z, f"xs[{i}]", keep, keep_rule, dtype) for i, z in enumerate(lx)]
        by = bx if ys is None else [_basis(z, f"ys[{j}]", keep, keep_rule, dtype) for j, z in enumerate(ly)]
        return _matrix_from_bases(bx, by)
    if method == "cka":
        return _cka_matrix(lx, ly, ys is None, dtype, **kwargs)
    out = torch.empty(len(lx), len(ly), dtype=torch.float64)
    for i, a in enumerate(lx):
        for j, b in enumerate(ly):
            out[i, j] = pwcca(a, b, dtype=dtype, **kwargs)
    return out


def _basis(z: Any, name: str, keep, keep_rule: str, dtype) -> ReducedBasis:
    if isinstance(z, ReducedBasis):
        return z
    try:
        return svd_reduce(check_activations(z, name, dtype=dtype), keep, keep_rule=keep_rule, dtype=dtype)
    except ValueError as err:
        raise ValueError(str(err).replace("`x`", f"`{name}`")) from None


def _matrix_from_bases(bx: Sequence[ReducedBasis], by: Sequence[ReducedBasis]) -> torch.Tensor:
    n = {b.n_datapoints for b in list(bx) + list(by)}
    if len(n) != 1:
        raise ValueError(
            f"all layers must be activations of the same datapoints; got datapoint counts {sorted(n)}."
        )
    kmax = max(b.k for b in list(bx) + list(by))
    warn_if_few_datapoints(n.pop(), kmax, "layers")
    device, dt = bx[0].basis.device, bx[0].basis.dtype
    square = by is bx
    big_y = torch.cat([b.basis.to(device, dt) for b in by], 1)
    oy = [0] + torch.tensor([b.k for b in by]).cumsum(0).tolist()
    out = torch.empty(len(bx), len(by), dtype=torch.float64)
    for i, a in enumerate(bx):
        first = i if square else 0  # a symmetric matrix needs its upper triangle only
        # one GEMM per row: the only pass over the datapoints
        row = (a.basis.to(device, dt).mT @ big_y[:, oy[first] :]).to(torch.float64)
        for j in range(first, len(by)):
            m = row[:, oy[j] - oy[first] : oy[j + 1] - oy[first]]
            # squared canonical correlations = eigenvalues of the smaller of MMᵀ, MᵀM;
            # a symmetric eigen-solver gets them several times faster than an SVD
            small = m @ m.mT if m.shape[0] <= m.shape[1] else m.mT @ m
            rho = torch.linalg.eigvalsh(small).clamp(0.0, 1.0).sqrt()
            out[i, j] = rho.mean().item()
            if square:
                out[j, i] = out[i, j]
    return out


def _cka_matrix(lx: list, ly: list, square: bool, dtype, debiased: bool = False) -> torch.Tensor:
    if debiased:
        return torch.tensor([[linear_cka(a, b, debiased=True, dtype=dtype) for b in ly] for a in lx],
                            dtype=torch.float64)
    ref = check_activations(lx[0], "xs[0]", dtype=dtype)
    cx = [_centred(a, ref, f"xs[{i}]", dtype) for i, a in enumerate(lx)]
    cy = cx if square else [_centred(b, ref, f"ys[{j}]", dtype) for j, b in enumerate(ly)]
    nx = [(a.mT @ a).double().norm() for a in cx]
    ny = nx if square else [(b.mT @ b).double().norm() for b in cy]
    out = torch.empty(len(cx), len(cy), dtype=torch.float64)
    for i, a in enumerate(cx):
        for j, b in enumerate(cy):
            out[i, j] = (a.mT @ b).double().square().sum() / (nx[i] * ny[j])
    return out


def _centred(z: Any, ref: torch.Tensor, name: str, dtype) -> torch.Tensor:
    t = check_activations(z, name, dtype=dtype)
    check_same_datapoints(t, ref, (name, "xs[0]"))
    if float(t.var(0).sum()) == 0:
        raise ValueError(f"`{name}` has zero variance: every neuron is constant over the datapoints.")
    return t - t.mean(0)
