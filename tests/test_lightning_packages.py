"""SVCCACallback under both Lightning packages (issue 21): ``import pytorch_lightning as pl``
and ``import lightning.pytorch as L`` (the unified package) work alike: the callback is
accepted, freeze training runs on one device, DDP is checked for find_unused_parameters, TensorBoard
and other loggers get their views, and the callback's state is checkpointed."""
from __future__ import annotations

import csv
import importlib

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from svcca_torch.callbacks import SVCCACallback
from svcca_torch.data import load_digits_dataset, probe_set
from svcca_torch.models import ConvNet

PACKAGES = ["pytorch_lightning", "lightning.pytorch"]


def _package(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.skip(f"{name} is not installed (pip install {'lightning' if '.' in name else 'pytorch-lightning'})")


def _module(pkg):
    class Digits(pkg.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = ConvNet(width=8, depth=4, hidden=32)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return Digits()


def _data():
    train, _ = load_digits_dataset()
    x, y = train.tensors
    loader = DataLoader(TensorDataset(x[:320], y[:320]), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    return loader, probe_set(train, 200, seed=0)


@pytest.mark.parametrize("name", PACKAGES)
def test_the_callback_is_a_callback_of_each_package(name):
    pkg = _package(name)
    assert isinstance(SVCCACallback(torch.randn(8, 4)), pkg.Callback)


@pytest.mark.parametrize("name", PACKAGES)
def test_freeze_training_on_one_device_logs_and_checkpoints_under_each_package(tmp_path, name):
    """The unified package's single-device strategy was refused as 'not supported' (the check
    knew only pytorch_lightning's classes); its loggers were not recognised either."""
    pkg = _package(name)
    pkg.seed_everything(0, verbose=False)
    loader, probe = _data()
    cb = SVCCACallback(probe, freeze_training=True, freeze_threshold=0.5, max_overhead=None, final_analysis=False,
                       progress=False)
    tb = pkg.loggers.TensorBoardLogger(str(tmp_path), name="tb", default_hp_metric=False)
    csv_logger = pkg.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = pkg.Trainer(default_root_dir=str(tmp_path), max_epochs=3, accelerator="cpu", devices=1,
                          logger=[tb, csv_logger], callbacks=[cb], enable_progress_bar=False,
                          enable_model_summary=False, log_every_n_steps=1)
    assert isinstance(trainer.strategy, pkg.strategies.SingleDeviceStrategy)
    trainer.fit(_module(pkg), loader)

    assert cb.freeze_log, "freeze training froze nothing"
    from svcca_torch.views import TensorBoardSink

    assert [type(s) for s in cb.views.sinks].count(TensorBoardSink) == 1  # the package's TensorBoardLogger is recognised
    with open(csv_logger.log_dir + "/metrics.csv") as f:
        columns = next(csv.reader(f))
    assert any(c.startswith("svcca/to_previous/") for c in columns)
    assert any(c.startswith("svcca/freeze/") for c in columns)
    # the callback's state is in the package's checkpoint
    ckpt = next((tmp_path / "tb").rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=False)["callbacks"][cb.state_key]
    # (saved at the last epoch's end, before the end-of-training capture)
    assert state["captured_steps"] == cb.captured_steps[:-1] and state["freeze_log"] == cb.freeze_log


@pytest.mark.parametrize("name", PACKAGES)
def test_ddp_of_each_package_is_checked_for_find_unused_parameters(tmp_path, name):
    """Freeze training under either package's DDP: the wrapped model is checked at the start of
    training (the strategy's settings are left alone) and the error names the fix."""
    pkg = _package(name)
    loader, probe = _data()
    cb = SVCCACallback(probe, freeze_training=True, final_analysis=False, progress=False)
    trainer = pkg.Trainer(default_root_dir=str(tmp_path), strategy=pkg.strategies.DDPStrategy(), accelerator="cpu",
                          devices=1, max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False, callbacks=[cb])
    with pytest.raises(ValueError, match="strategy='ddp_find_unused_parameters_true'"):
        trainer.fit(_module(pkg), loader)
