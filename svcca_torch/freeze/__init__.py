"""Freeze training (Raghu et al. 2017, section 4.1) as plain PyTorch: layer groups, freeze
policies as small serialisable state machines, and the freezing itself.

Lower layers of a network converge (reach their final representation, as measured by SVCCA)
earlier than higher ones, so they can be frozen bottom-up during training to save backward
compute. This module has no Lightning dependency; :class:`svcca_torch.callbacks.SVCCACallback`
drives it from a ``Trainer``, and a plain training loop can drive it directly::

    groups = default_layer_groups(model, example_input=batch)  # bottom-up in forward order
    policy = AdaptiveFreezePolicy([g.name for g in groups])
    ...every window of training steps, with each group's SVCCA similarity to one window earlier:
    for name in policy.update(step, similarities):
        freeze_group(groups_by_name[name])

:class:`svcca_torch.tracker.DynamicsTracker` does all of this (and the recording) for you.
"""
from .groups import (LayerGroup, backward_flops, default_layer_groups, explicit_layer_groups,
                     freeze_group, frozen_parameter_count, is_frozen, unfreeze_group)
from .policy import (FreezePolicy, PolicyRun, get_policy, make_freeze_policy, policy_names, register_policy,
                     unregister_policy)
from .chance import CHANCE_LIMIT, calibrated_similarity
from .adaptive import AdaptiveFreezePolicy
from .schedule import ScheduleFreezePolicy
from .signal import SIGNAL_SHARE, FreezeSignal
from ..settings import DEFAULT_THRESHOLD

__all__ = [
    "LayerGroup", "default_layer_groups", "explicit_layer_groups", "freeze_group", "unfreeze_group", "is_frozen",
    "frozen_parameter_count", "backward_flops",
    "FreezePolicy", "PolicyRun", "AdaptiveFreezePolicy", "ScheduleFreezePolicy", "FreezeSignal",
    "register_policy", "unregister_policy", "get_policy", "policy_names", "make_freeze_policy",
    "calibrated_similarity", "CHANCE_LIMIT", "DEFAULT_THRESHOLD", "SIGNAL_SHARE",
]
