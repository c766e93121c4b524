"""The similarity methods, listed once.

Each method is its own functional kernel (``svcca.py``, ``cca.py``, ``pwcca.py``,
``cka.py``) plus one :class:`Method` entry here; :func:`similarity_matrix`, the command
line and the experiments take the names and options from this registry, and an unknown
name is the same ``ValueError`` everywhere (:func:`get_method`). A new method is its kernel
and one :func:`register_method` call; :func:`similarity_matrix` compares its layers pair by
pair (the built-in methods have batched paths there).
Activations are ``(datapoints, neurons)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import torch

from .cca import cca
from .cka import linear_cka
from .pwcca import pwcca
from .svcca import svcca

#: ``compare(x, y, *, keep, keep_rule, dtype, names, **options)`` -> ``{"value": float, "note": str, ...}``
Compare = Callable[..., Dict[str, Any]]


@dataclass(frozen=True)
class Method:
    """One similarity method.

    Attributes:
        name: what users pass as ``method=`` / ``--method``.
        compare: the pairwise kernel behind a common signature: ``value`` (a float) and
            ``note`` (a short description for the command line), plus any details.
        options: the extra keyword arguments it takes (e.g. ``debiased`` for CKA).
        uses_bases: whether it accepts :class:`~svcca_torch.functional.svcca.ReducedBasis` inputs.
    """

    name: str
    compare: Compare
    options: Tuple[str, ...] = ()
    uses_bases: bool = False


_METHODS: Dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (its name must be new)."""
    if method.name in _METHODS:
        raise ValueError(f"a similarity method named {method.name!r} is already registered.")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method added by :func:`register_method` (e.g. at the end of a test)."""
    get_method(name)
    del _METHODS[name]


def method_names() -> Tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return tuple(_METHODS)


def get_method(name: Any) -> Method:
    """The method called ``name``; a ``ValueError`` naming the known ones otherwise."""
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"`method` must be one of {', '.join(map(repr, _METHODS))}; got {name!r}.")
    return _METHODS[name]


def _svcca(x: torch.Tensor, y: torch.Tensor, *, keep: Any = 0.99, keep_rule: str = "singular_values",
           dtype: Any = None, names: Tuple[str, str] = ("x", "y")) -> Dict[str, Any]:
    r = svcca(x, y, keep, keep_rule=keep_rule, dtype=dtype, names=names)
    return {"value": r.mean, "k": [r.k_x, r.k_y],
            "note": f"kept {r.k_x} and {r.k_y} directions, {r.coefficients.numel()} canonical correlations"}


def _cca(x: torch.Tensor, y: torch.Tensor, *, keep: Any = None, keep_rule: Any = None, dtype: Any = None,
         names: Tuple[str, str] = ("x", "y"), rtol: Any = None) -> Dict[str, Any]:
    r = cca(x, y, dtype=dtype, names=names, **({} if rtol is None else {"rtol": rtol}))
    return {"value": r.mean, "note": f"{r.coefficients.numel()} canonical correlations"}


def _pwcca(x: torch.Tensor, y: torch.Tensor, *, keep: Any = None, keep_rule: Any = None, dtype: Any = None,
           names: Tuple[str, str] = ("x", "y"), method: str = "reference") -> Dict[str, Any]:
    return {"value": float(pwcca(x, y, method=method, dtype=dtype, names=names)),
            "note": "weights from the side with fewer neurons"}


def _cka(x: torch.Tensor, y: torch.Tensor, *, keep: Any = None, keep_rule: Any = None, dtype: Any = None,
         names: Tuple[str, str] = ("x", "y"), debiased: bool = False) -> Dict[str, Any]:
    return {"value": float(linear_cka(x, y, debiased=debiased, dtype=dtype, names=names)),
            "note": f"linear{', debiased' if debiased else ''}"}


register_method(Method("svcca", _svcca, uses_bases=True))
register_method(Method("cca", _cca, options=("rtol",)))
register_method(Method("pwcca", _pwcca, options=("method",)))
register_method(Method("cka", _cka, options=("debiased",)))
