"""Stateless similarity kernels. Activations are ``(datapoints, neurons)``."""
from .cca import CCAResult, cca
from .cka import linear_cka
from .conv import DFTCCAResult, conv_datapoint_indices, conv_pair_to_datapoints, conv_to_datapoints, dft_cca
from .matrix import similarity_matrix
from .pwcca import pwcca
from .svcca import ReducedBasis, SVCCAResult, n_directions, svcca, svd_reduce

__all__ = [
    "CCAResult",
    "DFTCCAResult",
    "ReducedBasis",
    "SVCCAResult",
    "cca",
    "conv_datapoint_indices",
    "conv_pair_to_datapoints",
    "conv_to_datapoints",
    "dft_cca",
    "linear_cka",
    "n_directions",
    "pwcca",
    "similarity_matrix",
    "svcca",
    "svd_reduce",
]
