"""Similarity of every pair of layers, each layer reduced once."""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import torch

from ..utils.validation import check_activations, check_choice, warn_if_few_datapoints, zero_variance_error
from .cca import canonical_correlations
from .cka import linear_cka
from .pwcca import pwcca
from ._linalg import default_rtol, gram
from .svcca import ReducedBasis, svd_reduce, top_directions

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

    Each layer is prepared once: centred, with the eigendecomposition of its Gram matrix
    giving its top directions (SVCCA) or its numerical range (CCA). Then one GEMM per row of
    the matrix (the upper triangle only, for a square one) computes every cross product
    ``Xᵢᵀ Xⱼ`` -- the only pass over the datapoints -- and a pair costs small float64
    products and a symmetric eigenproblem of ``(k_i, k_j)`` size. With :class:`ReducedBasis`
    inputs the cross products are ``Uᵢᵀ Uⱼ`` of the stored bases. CKA is computed the same
    way from the centred layers; PWCCA pair by pair.
    """
    check_choice(method, "method", METHODS)
    lx = _as_list(xs, "xs")
    ly = lx if ys is None else _as_list(ys, "ys")
    if method == "pwcca":
        out = torch.empty(len(lx), len(ly), dtype=torch.float64)
        for i, a in enumerate(lx):
            for j, b in enumerate(ly):
                out[i, j] = pwcca(a, b, dtype=dtype, **kwargs)
        return out
    if method == "cka" and kwargs.get("debiased"):
        return torch.tensor([[linear_cka(a, b, debiased=True, dtype=dtype) for b in ly] for a in lx],
                            dtype=torch.float64)
    if kwargs:
        raise TypeError(f"unexpected arguments for method={method!r}: {', '.join(kwargs)}")
    if method == "cca":
        keep, keep_rule, dtype = 10**9, "singular_values", dtype or torch.float64
    use_bases = any(isinstance(z, ReducedBasis) for z in list(lx) + list(ly))
    if use_bases and method == "cka":
        raise ValueError("`method='cka'` needs activations, not ReducedBasis objects.")
    prep = lambda z, name: _prepare(z, name, method, use_bases, keep, keep_rule, dtype)  # noqa: E731
    px = [prep(z, f"xs[{i}]") for i, z in enumerate(lx)]
    py = px if ys is None else [prep(z, f"ys[{j}]") for j, z in enumerate(ly)]
    return _rows(px, py, method)


class _Prepared(NamedTuple):
    data: torch.Tensor  # (n, w): centred activations, or an orthonormal basis
    right: Optional[torch.Tensor]  # (w, k) float64 map to whitened top directions; None = identity
    norm: float  # ‖XᵀX‖_F for CKA


def _prepare(z: Any, name: str, method: str, use_bases: bool, keep, keep_rule: str, dtype) -> _Prepared:
    if use_bases:
        b = z if isinstance(z, ReducedBasis) else svd_reduce(z, keep, keep_rule=keep_rule, dtype=dtype, name=name)
        return _Prepared(b.basis, None, 0.0)
    t = check_activations(z, name, dtype=dtype)
    xc = t - t.mean(0)
    g = gram(xc)
    if method == "cka":
        norm = float(g.double().norm())
        if norm == 0:
            raise zero_variance_error(name)
        return _Prepared(xc, None, norm)
    s, v = top_directions(g, keep, keep_rule, None, default_rtol(g.dtype))
    if s.numel() == 0:
        raise zero_variance_error(name)
    return _Prepared(xc, v / s, 0.0)


def _rows(px: Sequence[_Prepared], py: Sequence[_Prepared], method: str) -> torch.Tensor:
    n = {p.data.shape[0] for p in list(px) + list(py)}
    if len(n) != 1:
        raise ValueError(f"all layers must be activations of the same datapoints; got datapoint counts {sorted(n)}.")
    kmax = max(p.data.shape[1] if p.right is None else p.right.shape[1] for p in list(px) + list(py))
    if method != "cka":
        warn_if_few_datapoints(n.pop(), kmax, "layers")
    square = py is px
    device, dt = px[0].data.device, px[0].data.dtype
    big_y = torch.cat([p.data.to(device, dt) for p in py], 1)
    oy = [0] + torch.tensor([p.data.shape[1] for p in py]).cumsum(0).tolist()
    out = torch.empty(len(px), len(py), dtype=torch.float64)
    for i, a in enumerate(px):
        first = i if square else 0  # a symmetric matrix needs its upper triangle only
        row = (a.data.mT @ big_y[:, oy[first] :]).to(torch.float64)  # one GEMM per row
        for j in range(first, len(py)):
            block = row[:, oy[j] - oy[first] : oy[j + 1] - oy[first]]
            b = py[j]
            if method == "cka":
                out[i, j] = block.square().sum().item() / (a.norm * b.norm)
                continue
            if a.right is not None:
                block = a.right.mT @ block @ b.right
            out[i, j] = canonical_correlations(block).mean().item()
        if square:
            out[i:, i] = out[i, i:].clone()
    return out
