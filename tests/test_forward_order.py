"""Freeze groups follow the order the forward pass reaches the layers (issue 8, section 1),
not the order the modules were registered in."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from svcca_torch.freeze import ScheduleFreezePolicy, default_layer_groups
from svcca_torch.recorder import ActivationRecorder, LayerOrderWarning, forward_order, select_layers
from _modules import Scrambled


class Recurrent(nn.Module):
    """Registered l3, rnn, head; called rnn -> head -> l3 (l3 is the output layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.l3 = nn.Linear(6, 2)
        self.rnn = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.l3(torch.relu(self.head(out[:, -1])))


def _frozen_at_end(groups) -> list:
    policy = ScheduleFreezePolicy([g.name for g in groups])
    return policy.update(100, fraction=1.0)


def test_groups_bottom_up_in_forward_order_and_output_never_frozen() -> None:
    model, x = Scrambled(), torch.randn(6, 5)
    groups = default_layer_groups(model, example_input=x)
    assert [g.name for g in groups] == ["body", "hidden", "head"]
    assert _frozen_at_end(groups) == ["body", "hidden"]  # the output group, head, never
    # the recorder's traced order gives the same groups (what the callback/engine passes)
    rec = ActivationRecorder(model)
    assert rec.order_layers(x) == ["body", "hidden", "head"]
    assert [g.name for g in default_layer_groups(model, rec.layers)] == ["body", "hidden", "head"]


def test_lstm_model_layers_given_in_forward_order_are_kept() -> None:
    model, x = Recurrent(), torch.randn(7, 3, 4)
    # select_layers used to re-sort these into registration order: l3, rnn, head
    assert select_layers(model, ["rnn", "head", "l3"]) == ["rnn", "head", "l3"]
    assert forward_order(model, ["l3", "head", "rnn"], x) == ["rnn", "head", "l3"]
    rec = ActivationRecorder(model, ["l3", "head", "rnn"], example_input=x)
    assert rec.layers == ["rnn", "head", "l3"] and rec.ordered
    groups = default_layer_groups(model, rec.layers)
    assert _frozen_at_end(groups) == ["rnn", "head"]


def test_failed_trace_falls_back_to_given_order_with_a_warning() -> None:
    model = Scrambled()
    model.train()
    with pytest.warns(LayerOrderWarning, match="could not be traced"):
        order = forward_order(model, ["head", "hidden", "body"], torch.randn(4, 7))  # wrong width
    assert order == ["head", "hidden", "body"]
    assert model.training and all(m.training for m in model.modules())
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
