"""svcca-torch: SVCCA, PWCCA and CKA for PyTorch, and a Lightning callback that watches
how each layer of a network learns.

Activations are ``(datapoints, neurons)`` (batch-first), or ``(N, C, H, W)`` for conv layers.
"""
from .functional import (
    CCAResult,
    DFTCCAResult,
    ReducedBasis,
    SVCCAResult,
    cca,
    conv_datapoint_indices,
    conv_pair_to_datapoints,
    conv_to_datapoints,
    dft_cca,
    linear_cka,
    n_directions,
    pwcca,
    similarity_matrix,
    svcca,
    svd_reduce,
)
from .utils.validation import FewDatapointsWarning, NonFiniteError, ZeroVarianceError
from .metrics import CCA, PWCCA, SVCCA, LinearCKA
from .recorder import ActivationRecorder, LayerOrderWarning, direction_limits, forward_order
from .store import Checkpoint, RepresentationStore, StoreCorruptError, StoreLockedError
from .dynamics import (
    AlignedDirections,
    ClassSensitivity,
    LayerCurves,
    LearningDynamics,
    NarrowLayerWarning,
    NetworkComparison,
    aligned_directions,
    class_sensitivity,
    class_target,
    compare_networks,
    learning_dynamics,
    paired_similarity,
    similarity_to_final,
    similarity_to_previous,
)

from .freeze import (
    AdaptiveFreezePolicy,
    LayerGroup,
    ScheduleFreezePolicy,
    default_layer_groups,
    explicit_layer_groups,
    freeze_group,
    unfreeze_group,
)
from .tracker import CaptureError, DynamicsTracker
from .board import BoardLogger
from .data import load_cifar10, load_digits_dataset, probe_set
from .models import ConvNet, ResNet, resnet18_cifar, resnet_small

__version__ = "0.3.0"
