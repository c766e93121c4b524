"""Small modules shared by the recorder, forward-order and tracker tests."""
from __future__ import annotations

import torch
from torch import nn

from svcca_torch.models import ConvBNReLU


class Scrambled(nn.Module):
    """Registered head, hidden, body; called body -> hidden -> head; counts head calls."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.hidden = nn.Linear(8, 8)
        self.body = nn.Linear(5, 8)
        self.head_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(torch.relu(self.body(x)))
        self.head_calls += 1
        return self.head(torch.relu(h))


class Twice(nn.Module):
    """One module called twice in a forward (its outputs cannot be told apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.lin(x))


class Skip(nn.Module):
    """block3 reads block1's output directly (a skip past block2): block2's output alone
    does not determine what follows, so the prefix {block1, block2} cannot be reused."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = ConvBNReLU(1, 8)
        self.block2 = ConvBNReLU(8, 8)
        self.block3 = ConvBNReLU(8, 8)
        self.block4 = ConvBNReLU(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.block1(x)
        h3 = self.block3(self.block2(h1) + h1)
        return self.fc(self.block4(h3).mean((2, 3)))
