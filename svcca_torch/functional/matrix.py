"""Similarity of every pair of layers, each layer reduced once."""
from __future__ import annotations

from typing import Any, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ..utils.validation import (
    check_activations,
    check_bool,
    check_dtype,
    check_keep_rule,
    check_rtol,
    warn_if_few_datapoints,
    warn_keep_capped,
    zero_variance_error,
)
from ._linalg import (
    centre_layer,
    datapoint_gram,
    datapoint_whitened,
    default_rtol,
    equilibrated_whitener,
    live_columns,
    prefer_datapoint_gram,
)
from .cca import live_neurons, sub_matrix
from .cka import _hsic_debiased, _kernel_diagonal
from .cca import mean_canonical_correlations
from .methods import get_method, method_names
from .svcca import ReducedBasis, _capped, svd_reduce, top_datapoint_directions, top_directions

#: the registered methods' names (:mod:`svcca_torch.functional.methods`), kept for 0.2's imports
METHODS = method_names()
_BATCHED = ("svcca", "cca", "cka")  # the methods with a batched path here; others go pair by pair
Layers = Union[Sequence[Any], Mapping[str, Any]]


def _as_list(layers: Layers, name: str) -> Tuple[list, List[str]]:
    if isinstance(layers, Mapping):
        items, labels = list(layers.values()), [f"{name}[{k!r}]" for k in layers]
    else:
        items = list(layers)
        labels = [f"{name}[{i}]" for i in range(len(items))]
    if not items:
        raise ValueError(f"`{name}` is empty: pass a sequence (or dict) of layer activations.")
    return items, labels


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
        method: a registered method (:func:`~svcca_torch.functional.methods.method_names`):
            ``"svcca"``, ``"cca"``, ``"pwcca"`` or ``"cka"`` (linear CKA), or one you registered.
        keep, keep_rule: SVCCA's truncation, validated as in :func:`svcca`.
        dtype: ``torch.float32``/``torch.float64`` (or their names) for the products; default
            the layers' own, promoted to a common dtype (float32 with float64 gives float64).
        **kwargs: ``rtol=`` for ``"cca"``, ``method=`` for ``"pwcca"``, ``debiased=`` for ``"cka"``.

    Returns:
        float64 tensor ``(len(xs), len(ys))``; entry ``[i, j]`` compares ``xs[i]`` with ``ys[j]``
        (for the asymmetric PWCCA, weights come from ``xs[i]``'s side per :func:`pwcca`).

    Each layer is prepared once: centred, with the eigendecomposition of its Gram matrix
    giving its top directions (SVCCA) or its whitening map (CCA), and whitened (one
    ``(datapoints, neurons, k)`` product). Then one GEMM per row of
    the matrix (the upper triangle only, for a square one) computes every cross product
    ``Xᵢᵀ Xⱼ`` of the whitened layers -- the only other pass over the datapoints -- and the
    canonical correlations of every pair come from one batched symmetric eigensolve, in
    the layers' dtype (float32: within ~3e-6 of float64, see docs/kernels.md). With :class:`ReducedBasis` inputs the cross products are
    ``Uᵢᵀ Uⱼ`` of the stored bases. CKA (biased or debiased) is computed the same way from
    the centred layers; PWCCA pair by pair.

    A layer with more neurons than datapoints is prepared from its datapoints' ``(n, n)``
    Gram (SVCCA, CCA), so no ``(neurons, neurons)`` matrix is formed for it; CKA, when any
    layer is that wide, works from every layer's ``(n, n)`` kernel ``XXᵀ``
    (``‖XᵢᵀXⱼ‖²_F = ⟨XᵢXᵢᵀ, XⱼXⱼᵀ⟩_F``), one GEMM over the flattened kernels for all pairs.
    """
    spec = get_method(method)
    keep, keep_rule = check_keep_rule(keep, keep_rule)
    dtype = check_dtype(dtype)
    extra = set(kwargs) - set(spec.options)
    if extra:
        raise TypeError(f"unexpected arguments for method={method!r}: {', '.join(sorted(extra))}")
    lx, nx = _as_list(xs, "xs")
    ly, ny = (lx, nx) if ys is None else _as_list(ys, "ys")
    use_bases = any(isinstance(z, ReducedBasis) for z in lx + ly)
    if use_bases and not spec.uses_bases:
        uses = [m for m in method_names() if get_method(m).uses_bases]
        raise ValueError(f"`method={method!r}` needs activations, not ReducedBasis objects (only "
                         f"{', '.join(map(repr, uses))} uses bases).")
    # Validate every layer once and promote them to one dtype (as the pairwise kernels do).
    tx = [z if isinstance(z, ReducedBasis) else check_activations(z, n, dtype=dtype) for z, n in zip(lx, nx)]
    ty = tx if ys is None else [z if isinstance(z, ReducedBasis) else check_activations(z, n, dtype=dtype)
                                for z, n in zip(ly, ny)]
    common = dtype
    if common is None:
        common = torch.float32
        for z in tx + ty:
            common = torch.promote_types(common, (z.basis if isinstance(z, ReducedBasis) else z).dtype)
    cast = lambda zs: [z if isinstance(z, ReducedBasis) else z.to(common) for z in zs]  # noqa: E731
    tx = cast(tx)
    ty = tx if ys is None else cast(ty)

    if method not in _BATCHED:  # pwcca and registered methods: pair by pair
        out = torch.empty(len(tx), len(ty), dtype=torch.float64)
        for i, a in enumerate(tx):
            for j, b in enumerate(ty):
                out[i, j] = spec.compare(a, b, keep=keep, keep_rule=keep_rule, names=(nx[i], ny[j]),
                                         **kwargs)["value"]
        return out
    debiased = check_bool(kwargs.get("debiased", False), "debiased")
    rtol = check_rtol(kwargs.get("rtol"))
    capped = [] if method != "svcca" else sum(
        (_capped(keep, z.n_neurons if isinstance(z, ReducedBasis) else int(z.shape[1]), n)
         for z, n in zip(tx + (tx if ys is None else ty), nx + (nx if ys is None else ny))), [])
    warn_keep_capped(keep, list(dict.fromkeys(capped)))
    if method == "cka" and any(prefer_datapoint_gram(*z.shape) for z in tx + ([] if ys is None else ty)):
        kx = [_kernel(z, n) for z, n in zip(tx, nx)]
        return _cka_from_kernels(kx, kx if ys is None else [_kernel(z, n) for z, n in zip(ty, ny)], debiased)
    prep = lambda z, name: _prepare(z, name, method, use_bases, keep, keep_rule, common, rtol)  # noqa: E731
    px = [prep(z, n) for z, n in zip(tx, nx)]
    py = px if ys is None else [prep(z, n) for z, n in zip(ty, ny)]
    return _rows(px, py, method, debiased)


class _Prepared(NamedTuple):
    data: torch.Tensor  # (n, w): whitened directions, an orthonormal basis, or centred activations (CKA)
    rel: Optional[torch.Tensor]  # (w,) float64 column factors back to the layer's scale (CKA)
    norm: float  # ‖XᵀX‖_F (CKA) or the debiased HSIC(X, X)
    kdiag: Optional[torch.Tensor]  # (n,) kernel diagonal, debiased CKA


def _prepare(z: Any, name: str, method: str, use_bases: bool, keep, keep_rule: str, dtype, rtol) -> _Prepared:
    if use_bases:
        b = z if isinstance(z, ReducedBasis) else svd_reduce(z, keep, keep_rule=keep_rule, dtype=dtype, name=name)
        return _Prepared(b.basis, None, 0.0, None)
    wide = method != "cka" and prefer_datapoint_gram(*z.shape)
    c = centre_layer(z, z.dtype, neuron_gram=not wide)
    if not bool(c.live.any()):
        raise zero_variance_error(name, int(z.shape[1]), z.dtype)
    n = z.shape[0]
    if wide:  # the datapoints' (n, n) Gram: its eigenvectors are the prepared data itself
        if method == "cca":
            u = datapoint_whitened(c, default_rtol(z.dtype) if rtol is None else rtol, weights=False)[0]
        else:
            u = top_datapoint_directions(c, keep, keep_rule, None, default_rtol(z.dtype))[1]
            if u.shape[1] == 0:
                raise zero_variance_error(name, int(z.shape[1]), z.dtype)
        return _Prepared(u.to(c.data.dtype), None, 0.0, None)
    g = c.gram if c.rel is None else c.gram * c.rel[:, None] * c.rel[None, :]
    if method == "cka":
        live_neurons(g, c.mean * c.scale, n, name)
        return _Prepared(c.data, c.rel, float(g.norm()), _kernel_diagonal(c))
    if method == "cca":
        live = live_neurons(g, c.mean * c.scale, n, name)
        w, _ = equilibrated_whitener(sub_matrix(g, live, live), default_rtol(z.dtype) if rtol is None else rtol)
        right = w.new_zeros(len(live), w.shape[1])
        right[live] = w
    else:
        s, v = top_directions(g, keep, keep_rule, None, default_rtol(z.dtype))
        if s.numel() == 0:
            raise zero_variance_error(name, int(z.shape[1]), z.dtype)
        right = v / s
    if c.rel is not None:
        right = right * c.rel[:, None]
    # Whiten the data once per layer (one (n, d, k) product) rather than every block of
    # every pair (two float64 (k, d, d) products each): then the cross products are the
    # whitened blocks themselves.
    return _Prepared(c.data @ right.to(c.data.dtype), None, 0.0, None)


def _rows(px: Sequence[_Prepared], py: Sequence[_Prepared], method: str, debiased: bool) -> torch.Tensor:
    n = {p.data.shape[0] for p in list(px) + list(py)}
    if len(n) != 1:
        raise ValueError(f"all layers must be activations of the same datapoints; got datapoint counts {sorted(n)}.")
    n = n.pop()
    if method != "cka":
        warn_if_few_datapoints(n, max(p.data.shape[1] for p in list(px) + list(py)), "layers")
    if method == "cka" and debiased:
        if n < 4:
            raise ValueError(f"`debiased=True` needs at least 4 datapoints, got {n}.")
        hsic = lambda p, q, g2: _hsic_debiased(g2, p.kdiag, q.kdiag, n)  # noqa: E731
        own = lambda p: p._replace(norm=float(hsic(p, p, torch.tensor(p.norm, dtype=torch.float64) ** 2)))  # noqa: E731
        was_square = py is px
        px = [own(p) for p in px]
        py = px if was_square else [own(p) for p in py]
    square = py is px
    device, dt = px[0].data.device, px[0].data.dtype
    big_y = torch.cat([p.data.to(device, dt) for p in py], 1)
    oy = [0] + torch.tensor([p.data.shape[1] for p in py]).cumsum(0).tolist()
    out = torch.empty(len(px), len(py), dtype=torch.float64)
    pairs, blocks = [], []
    for i, a in enumerate(px):
        first = i if square else 0  # a symmetric matrix needs its upper triangle only
        row = a.data.mT @ big_y[:, oy[first] :]  # one GEMM per row
        if method == "cka":
            row = row.to(torch.float64)
        if a.rel is not None:
            row = row * a.rel[:, None]
        for j in range(first, len(py)):
            block = row[:, oy[j] - oy[first] : oy[j + 1] - oy[first]]
            b = py[j]
            if method == "cka":
                if b.rel is not None:
                    block = block * b.rel[None, :]
                g2 = block.square().sum()
                out[i, j] = float((hsic(a, b, g2) if debiased else g2) / (a.norm * b.norm) ** (0.5 if debiased else 1))
                continue
            pairs.append((i, j))
            blocks.append(block)
    if pairs:
        out_vals = mean_canonical_correlations(blocks)
        for (i, j), v in zip(pairs, out_vals.tolist()):
            out[i, j] = v
    if square:
        upper = torch.triu(torch.ones(len(px), len(px), dtype=torch.bool), 1)
        out = torch.where(upper.T, out.T, out)
    return out


def _kernel(z: torch.Tensor, name: str) -> torch.Tensor:
    """A layer's centred linear kernel ``A Aᵀ`` ``(n, n)`` float64 (``A`` at its power-of-two
    scale, dead neurons zero), for CKA when some layer is wider than the datapoints."""
    c = centre_layer(z, z.dtype, neuron_gram=False)
    if not bool(c.live.any()):
        raise zero_variance_error(name, int(z.shape[1]), z.dtype)
    return datapoint_gram(live_columns(c))


def _cka_from_kernels(kx: Sequence[torch.Tensor], ky: Sequence[torch.Tensor], debiased: bool) -> torch.Tensor:
    """Linear CKA of every pair from the layers' ``(n, n)`` kernels: ``tr(KᵢKⱼ)`` for all
    pairs is one GEMM of the flattened kernels (float64); the debiased estimator needs only
    these and the kernels' diagonals (see :func:`cka._hsic_debiased`)."""
    n = {int(k.shape[0]) for k in list(kx) + list(ky)}
    if len(n) != 1:
        raise ValueError(f"all layers must be activations of the same datapoints; got datapoint counts {sorted(n)}.")
    n = n.pop()
    if debiased and n < 4:
        raise ValueError(f"`debiased=True` needs at least 4 datapoints, got {n}.")
    fx = torch.stack([k.reshape(-1) for k in kx])
    fy = fx if ky is kx else torch.stack([k.to(fx.device).reshape(-1) for k in ky])
    tr = (fx @ fy.mT).cpu()
    own_x, own_y = fx.square().sum(1).cpu(), fy.square().sum(1).cpu()
    if not debiased:
        return tr / torch.outer(own_x.sqrt(), own_y.sqrt())
    dx = [k.diagonal().cpu() for k in kx]
    dy = dx if ky is kx else [k.diagonal().cpu() for k in ky]
    hx = torch.stack([_hsic_debiased(own_x[i], dx[i], dx[i], n) for i in range(len(dx))])
    hy = hx if ky is kx else torch.stack([_hsic_debiased(own_y[j], dy[j], dy[j], n) for j in range(len(dy))])
    out = torch.empty(len(dx), len(dy), dtype=torch.float64)
    for i in range(len(dx)):
        for j in range(len(dy)):
            out[i, j] = _hsic_debiased(tr[i, j], dx[i], dy[j], n) / (hx[i] * hy[j]).sqrt()
    return out
