"""Stateless similarity kernels. Activations are ``(datapoints, neurons)``."""
from .cca import CCAResult, cca
from .cka import linear_cka
from .matrix import similarity_matrix
from .pwcca import pwcca
from .svcca import ReducedBasis, SVCCAResult, n_directions, svcca, svd_reduce

__all__ = [
    "CCAResult",
    "ReducedBasis",
    "SVCCAResult",
    "cca",
    "linear_cka",
    "n_directions",
    "pwcca",
    "similarity_matrix",
    "svcca",
    "svd_reduce",
]
