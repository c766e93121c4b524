"""Shared by the callback tests and the DDP script they launch: a tiny Lightning module on
scikit-learn's digits (real data, offline), small enough that a few epochs take seconds."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from svcca_torch.data import load_digits_dataset, probe_set
from svcca_torch.models import ConvNet


class DigitsModule(pl.LightningModule):
    """A ConvNet-BN (or, with ``batch_norm=False``, a plain conv net) on 8x8 digits."""

    def __init__(self, lr: float = 0.05, batch_norm: bool = True, optimizer: str = "sgd") -> None:
        super().__init__()
        if batch_norm:
            self.net = ConvNet(width=8, depth=4, hidden=32)
            self.layer_names = ["net." + n for n in self.net.layer_names]
        else:
            self.net = nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10),
            )
            self.layer_names = ["net.0", "net.2", "net.5", "net.8"]
        self.lr = lr
        self.optimizer = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-3)


def digits_loaders(n_train: int = 640, batch_size: int = 64, n_probe: int = 200, shuffle: bool = True):
    """(train loader over the first ``n_train`` digits, fixed probe tensor)."""
    train, _ = load_digits_dataset()
    x, y = train.tensors
    data = TensorDataset(x[:n_train], y[:n_train])
    loader = DataLoader(data, batch_size=batch_size, shuffle=shuffle,
                        generator=torch.Generator().manual_seed(0) if shuffle else None)
    return loader, probe_set(train, n_probe, seed=0)


def trainer(tmp_path, logger=None, max_epochs: int = 3, callbacks=(), checkpointing: bool = False,
            **kwargs) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=str(tmp_path), max_epochs=max_epochs, logger=logger if logger is not None else False,
        callbacks=list(callbacks), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=checkpointing, accelerator="cpu", log_every_n_steps=1, **kwargs,
    )
