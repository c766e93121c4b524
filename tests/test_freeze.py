"""Layer groups, freeze policies and freezing (plain PyTorch)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from svcca_torch.freeze import (
    CHANCE_LIMIT,
    AdaptiveFreezePolicy,
    ScheduleFreezePolicy,
    backward_flops,
    calibrated_similarity,
    default_layer_groups,
    explicit_layer_groups,
    freeze_group,
    frozen_parameter_count,
    is_frozen,
    make_freeze_policy,
    unfreeze_group,
)
from svcca_torch.models import ConvNet, resnet_small


def test_default_groups_convnet_blocks():
    model = ConvNet()
    groups = default_layer_groups(model, ["features.block1.conv", "features.block2.conv", "fc1", "fc"])
    assert [g.name for g in groups] == ["features.block1.conv", "features.block2.conv", "fc1", "fc"]
    # the conv's smallest enclosing block holds its BatchNorm
    assert groups[0].module_names == ["features.block1"]
    assert any(p is model.features.block1.bn.weight for p in groups[0].parameters())
    assert groups[2].module_names == ["fc1"]


def test_default_groups_resnet_blocks_and_nested_layers():
    model = resnet_small()
    groups = default_layer_groups(model)  # model.layer_names
    assert [g.name for g in groups] == model.layer_names
    assert groups[1].module_names == ["layer1.0"]  # a residual block is one group
    # a conv inside a block, recorded with the block, belongs to the block's group
    groups = default_layer_groups(model, ["stem", "layer1.0", "layer1.0.conv1", "fc"])
    assert [g.name for g in groups] == ["stem", "layer1.0", "fc"]
    # a lone conv inside a block takes the whole block (no other recorded layer in it)
    groups = default_layer_groups(model, ["layer2.1.conv2", "fc"])
    assert groups[0].module_names == ["layer2.1"]


def test_default_groups_following_batchnorm_in_flat_model():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 10),
    )
    groups = default_layer_groups(model, ["0", "3", "7"])
    assert [g.module_names for g in groups] == [["0", "1"], ["3", "4"], ["7"]]



def test_default_groups_of_post_activation_layers_hold_the_weights_before_them():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 10),
    )
    groups = default_layer_groups(model, ["2", "5", "7"])  # the ReLU outputs, as in the paper
    assert [g.module_names for g in groups] == [["0", "1", "2"], ["3", "4", "5"], ["7"]]
    freeze_group(groups[0])
    assert not any(p.requires_grad for p in model[0].parameters()) and model[3].weight.requires_grad
    # a ReLU right after another recorded layer takes nothing of it
    assert [g.module_names for g in default_layer_groups(model, ["0", "2", "7"])] == [["0", "1"], ["2"], ["7"]]


def test_group_errors_name_the_argument():
    model = ConvNet()
    with pytest.raises(ValueError, match="layer_names.*nope"):
        default_layer_groups(model, ["nope"])
    with pytest.raises(ValueError, match="groups"):
        explicit_layer_groups(model, [["features.block1"], []])
    groups = explicit_layer_groups(model, {"low": ["features.block1", "features.block2"], "head": ["fc"]})
    assert [g.name for g in groups] == ["low", "head"] and len(groups[0].modules) == 2


def test_adaptive_policy_bottom_up_patience_and_cap():
    names = ["a", "b", "c", "d"]
    pol = AdaptiveFreezePolicy(names, threshold=0.9, patience=2, max_frozen_fraction=0.75)
    assert pol.max_frozen == 3
    # b settles first, but a has not: nothing freezes (contiguous from the bottom)
    assert pol.update(1, {"a": 0.5, "b": 0.95, "c": 0.5, "d": 0.5}) == []
    assert pol.update(2, {"a": 0.95, "b": 0.95, "c": 0.5, "d": 0.99}) == []
    assert pol.update(3, {"a": 0.95, "b": 0.95, "c": 0.95, "d": 0.99}) == ["a", "b"]
    # a dip resets the streak
    assert pol.update(4, {"c": 0.5, "d": 0.99}) == []
    assert pol.update(5, {"c": 0.95, "d": 0.99}) == []
    assert pol.update(6, {"c": 0.95, "d": 0.99}) == ["c"]
    # never the last group, whatever its similarity
    assert pol.update(7, {"d": 1.0}) == [] and pol.update(8, {"d": 1.0}) == []
    assert pol.frozen == ["a", "b", "c"]
    assert pol.events == [{"step": 3, "group": "a"}, {"step": 3, "group": "b"}, {"step": 6, "group": "c"}]
    cap = AdaptiveFreezePolicy(names, patience=1, max_frozen_fraction=0.5)
    assert cap.update(0, dict.fromkeys(names, 1.0)) == ["a", "b"]


def test_policy_state_roundtrip_is_json_and_resumes():
    names = ["a", "b", "c"]
    pol = AdaptiveFreezePolicy(names, threshold=0.9, patience=2)
    pol.update(1, {"a": 0.95, "b": 0.95})
    state = json.loads(json.dumps(pol.state_dict()))
    fresh = AdaptiveFreezePolicy(names, threshold=0.9, patience=2)
    fresh.load_state_dict(state)
    # both continue identically: one more settled capture freezes a and b... capped at 2 of 3
    assert fresh.update(2, {"a": 0.95, "b": 0.95}) == pol.update(2, {"a": 0.95, "b": 0.95}) == ["a", "b"]
    with pytest.raises(ValueError, match="same model"):
        AdaptiveFreezePolicy(["x", "y"]).load_state_dict(state)
    with pytest.raises(ValueError, match="adaptive"):
        ScheduleFreezePolicy(names).load_state_dict(state)


def test_calibrated_similarity_judges_the_part_that_can_change():
    """Issue 21: (s - chance) / (1 - chance), clipped to [0, 1]: 1 for an unchanged layer, 0 for
    one no closer to its earlier self than an unrelated network; None: not calibrated."""
    assert calibrated_similarity(1.0, 0.991) == 1.0
    assert calibrated_similarity(0.991, 0.991) == 0.0
    assert calibrated_similarity(0.5, 0.991) == 0.0  # below chance: clipped
    assert calibrated_similarity(0.9955, 0.991) == pytest.approx(0.5)
    # the same raw reading means much less for a layer whose chance level is high
    assert calibrated_similarity(0.95, 0.5) == pytest.approx(0.9)
    assert calibrated_similarity(0.95, 0.9) == pytest.approx(0.5)
    assert calibrated_similarity(0.93, None) == 0.93
    with pytest.raises(ValueError, match="chance"):
        calibrated_similarity(1.0, 1.0)
    assert 0.9 < CHANCE_LIMIT < 1.0


def test_schedule_policy_linear_in_depth():
    names = [f"g{i}" for i in range(5)]
    pol = ScheduleFreezePolicy(names, start=0.2, end=0.8, max_frozen_fraction=1.0)
    assert pol.freeze_fractions == pytest.approx({"g0": 0.2, "g1": 0.4, "g2": 0.6, "g3": 0.8})
    assert pol.update(10, fraction=0.1) == []
    assert pol.update(20, fraction=0.45) == ["g0", "g1"]
    assert pol.update(30, fraction=1.0) == ["g2", "g3"]
    restored = ScheduleFreezePolicy(names, start=0.2, end=0.8, max_frozen_fraction=1.0)
    restored.load_state_dict(json.loads(json.dumps(pol.state_dict())))
    assert restored.frozen == pol.frozen and restored.events == pol.events
    with pytest.raises(ValueError, match="end"):
        ScheduleFreezePolicy(names, start=0.8, end=0.2)
    with pytest.raises(ValueError, match="freeze_training"):
        make_freeze_policy("sometimes", names)
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveFreezePolicy(names, threshold=1.5)


def test_frozen_weights_and_bn_stats_stay_bit_identical():
    torch.manual_seed(0)
    model = ConvNet()
    groups = default_layer_groups(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))

    def step():
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    model.train()
    for _ in range(3):  # momentum buffers exist for every parameter
        step()
    n = freeze_group(groups[0]) + freeze_group(groups[1])
    assert n == frozen_parameter_count(model) > 0
    assert is_frozen(groups[0]) and not is_frozen(groups[2])
    frozen_state = {k: v.clone() for k, v in model.features.block1.state_dict().items()}
    frozen_state.update({"b2." + k: v.clone() for k, v in model.features.block2.state_dict().items()})
    trained_before = model.features.block3.conv.weight.clone()
    for _ in range(3):
        model.train()  # as Lightning does after validation
        assert not model.features.block1.bn.training and model.features.block3.bn.training
        step()
    # also resists code that flips the flag directly (e.g. restoring saved modes)
    model.features.block1.bn.training = True
    step()
    now = {k: v for k, v in model.features.block1.state_dict().items()}
    now.update({"b2." + k: v for k, v in model.features.block2.state_dict().items()})
    for k, v in frozen_state.items():
        assert torch.equal(v, now[k]), k  # weights and running stats, bit for bit
    assert not torch.equal(trained_before, model.features.block3.conv.weight)
    # survives a deepcopy (e.g. for an EMA or a checkpoint copy)
    clone = copy.deepcopy(model)
    clone.train()
    assert not clone.features.block1.bn.training
    unfreeze_group(groups[0])
    model.train()
    assert model.features.block1.bn.training and model.features.block1.conv.weight.requires_grad


def test_backward_flops_drop_when_lower_groups_freeze():
    model = resnet_small(width=8)
    groups = default_layer_groups(model)
    x = torch.randn(2, 1, 16, 16)
    full = backward_flops(model, x)
    for g in groups[:3]:
        freeze_group(g)
    part = backward_flops(model, x)
    assert 0 < part < full
    # frozen groups save at least their weight-gradient share
    assert all(p.grad is None for p in model.parameters())
    for g in groups:
        freeze_group(g)
    assert backward_flops(model, x) == 0


@settings(max_examples=60, deadline=None)
@given(
    n_groups=st.integers(2, 7),
    patience=st.integers(1, 3),
    cap=st.sampled_from([0.3, 0.5, 0.75, 1.0]),
    data=st.data(),
)
def test_adaptive_policy_invariants_and_resume(n_groups, patience, cap, data):
    names = [f"g{i}" for i in range(n_groups)]
    sims = data.draw(st.lists(st.lists(st.floats(0.0, 1.0), min_size=n_groups, max_size=n_groups),
                              min_size=1, max_size=12))
    cut = data.draw(st.integers(0, len(sims)))
    pol = AdaptiveFreezePolicy(names, threshold=0.9, patience=patience, max_frozen_fraction=cap)
    resumed = None
    for step, row in enumerate(sims):
        if step == cut:  # checkpoint here and continue on a fresh policy
            resumed = AdaptiveFreezePolicy(names, threshold=0.9, patience=patience, max_frozen_fraction=cap)
            resumed.load_state_dict(json.loads(json.dumps(pol.state_dict())))
        feed = {n: s for n, s in zip(names, row) if n not in pol.frozen}
        got = pol.update(step, feed)
        if resumed is not None:
            assert resumed.update(step, feed) == got
        # always a contiguous prefix, never the output group, never past the cap
        assert pol.frozen == names[: len(pol.frozen)]
        assert names[-1] not in pol.frozen
        assert len(pol.frozen) <= max(0, min(n_groups - 1, int(cap * n_groups + 1e-9)))
        # a group only freezes after `patience` settled captures in a row
        for g in got:
            i = names.index(g)
            recent = [r[i] for r in sims[max(0, step - patience + 1): step + 1]]
            assert len(recent) == patience and all(v >= 0.9 for v in recent)
