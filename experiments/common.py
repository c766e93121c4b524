"""Shared plumbing of the paper-reproduction scripts: arguments, data, models, training,
run folders and JSON.

Every experiment takes the same core options::

    --dataset digits|cifar10   scikit-learn's handwritten digits (offline, default) or CIFAR-10
    --data-dir DIR [--download]  where CIFAR-10 lives (torchvision layout) / fetch it there
    --model convnet|resnet     the paper's two families (ConvNet with BatchNorm, small ResNet)
    --seed N --out DIR         fixed seed; run folders go under DIR/<experiment>/
    --smoke                    a tiny budget (seconds), used by the test suite
    --threads N                torch threads (0: 1 on digits, torch's default on CIFAR-10)

Images are ``(N, C, H, W)``; recorded activations are ``(datapoints, neurons)``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

import pytorch_lightning as pl

from svcca_torch.data import load_cifar10, load_digits_dataset, probe_set
from svcca_torch.models import ConvNet, resnet_small
from svcca_torch.utils.validation import FewDatapointsWarning

DATASETS = ("digits", "cifar10")
MODELS = ("convnet", "resnet")


class ExperimentError(Exception):
    """A user-facing problem (missing data set, bad option): printed as one line."""


# ----------------------------------------------------------------------------- arguments
class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after an option's help, unless the help already says its default
    (e.g. "(default 20 on digits, 40 on CIFAR-10)"), or there is none to say (None, a flag);
    the description and the epilog (the example commands) as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def module_prog(file: str) -> str:
    """What ``--help`` shows as the command: ``python -m svcca_torch.experiments.<name>``,
    which works wherever the package is installed."""
    return f"python -m svcca_torch.experiments.{Path(file).stem}"


def doc_examples(doc: Optional[str]) -> Optional[str]:
    """The example commands of a script's docstring (its ``python -m ...`` lines), as the
    ``--help`` epilog."""
    lines = [ln.rstrip() for ln in (doc or "").splitlines() if ln.strip().startswith("python -m ")]
    return "examples:\n" + "\n".join(lines) if lines else None


def base_parser(description: str, *, epochs: int, cifar_epochs: int, multi_model: bool = False,
                prog: Optional[str] = None, epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """The options every experiment shares; scripts add their own to the returned parser.

    ``epochs`` / ``cifar_epochs`` are the default training budgets on digits / CIFAR-10.
    With ``multi_model`` the ``--model`` option takes several models (default both).
    ``prog``: the command in the usage line (:func:`module_prog`); ``epilog``: the example
    commands (:func:`doc_examples`).
    """
    p = argparse.ArgumentParser(prog=prog, usage=None if prog is None else "%(prog)s [options]",
                                description=description, epilog=epilog, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits: scikit-learn's handwritten digits (offline); cifar10: torchvision CIFAR-10")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py (CIFAR-10 only)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-dir if missing")
    if multi_model:
        p.add_argument("--model", nargs="+", choices=MODELS, default=list(MODELS), help="network families to run")
    else:
        p.add_argument("--model", choices=MODELS, default="convnet", help="network family")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and probe set")
    p.add_argument("--out", default="runs", help="parent folder of the run folders")
    p.add_argument("--smoke", action="store_true", help="tiny budget (seconds): a check that everything runs")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (default {epochs} on digits, {cifar_epochs} on CIFAR-10, 2 with --smoke)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default 32 digits, 128 CIFAR-10)")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (default 0.05), cosine-annealed")
    p.add_argument("--width", type=int, default=None, help="channels of the first layer (default by dataset)")
    p.add_argument("--probe-size", type=int, default=None, help="probe images recorded for SVCCA")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: 1 on digits, torch default on CIFAR-10)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (CIFAR-10)")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator (cpu, gpu, auto)")
    p.add_argument("--progress", action="store_true", help="show Lightning progress bars")
    p.set_defaults(_epochs=epochs, _cifar_epochs=cifar_epochs)
    return p


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the dataset-dependent defaults (budget, batch size, width, probe size)."""
    digits = args.dataset == "digits"
    if args.epochs is None:
        args.epochs = 2 if args.smoke else (args._epochs if digits else args._cifar_epochs)
    if args.batch_size is None:
        args.batch_size = 32 if digits else 128
    if args.lr is None:
        args.lr = 0.05
    if args.width is None:
        args.width = (8 if args.smoke else 16) if digits else (8 if args.smoke else 32)
    if args.probe_size is None:
        args.probe_size = 150 if args.smoke else (500 if digits else 1000)
    for name in ("epochs", "batch_size", "width", "probe_size"):
        if getattr(args, name) < 1:
            raise ExperimentError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads < 0:
        raise ExperimentError(f"--threads must be >= 0, got {args.threads}")
    return args


def setup_runtime(args: argparse.Namespace) -> None:
    """Threads, and quiet Lightning/library chatter (the scripts print their own summary)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.dataset == "digits":
        # tiny convolutions: one thread is fastest, and two on a loaded 2-core machine are far slower
        torch.set_num_threads(1)
    os.environ.setdefault("MPLBACKEND", "Agg")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*number of training batches.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning's own deprecation
    if args.smoke:  # the tiny probe of a smoke run is knowingly below 5 datapoints per direction
        warnings.filterwarnings("ignore", category=FewDatapointsWarning)


# ----------------------------------------------------------------------------- data
@dataclass
class Data:
    """Train / test splits, a fixed probe set and the image format."""

    name: str
    train: Dataset
    test: Dataset
    probe: torch.Tensor          # (n, C, H, W), same images in the same order at every capture
    probe_labels: torch.Tensor   # (n,)
    in_channels: int
    image_size: int
    num_classes: int = 10


def _subset(ds: TensorDataset, n: int, seed: int) -> TensorDataset:
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return TensorDataset(*(t[idx] for t in ds.tensors))


def load_data(args: argparse.Namespace, model: Optional[str] = None) -> Data:
    """The data set of ``args`` sized for ``model`` (ResNets get 16x16 digits, room for
    their strided stages). Missing CIFAR-10 raises :class:`ExperimentError` (one line)."""
    model = model or (args.model if isinstance(args.model, str) else args.model[0])
    if args.dataset == "digits":
        size = 16 if model == "resnet" else 8
        train, test = load_digits_dataset(seed=0, size=size)
        if args.smoke:
            train = _subset(train, 360, 0)
        probe, labels = probe_set(train, min(args.probe_size, len(train)), seed=0, return_labels=True)
        return Data("digits", train, test, probe, labels, 1, size)
    try:
        train = load_cifar10(args.data_dir, download=args.download, train=True, augment=True)
        test = load_cifar10(args.data_dir, download=False, train=False)
        plain = load_cifar10(args.data_dir, download=False, train=True, augment=False)
    except FileNotFoundError as err:
        raise ExperimentError(str(err).replace("download=True (--download)", "--download")) from None
    except (OSError, RuntimeError) as err:  # e.g. no network with --download
        raise ExperimentError(
            f"could not get CIFAR-10 into {args.data_dir} ({err}); put cifar-10-batches-py there "
            "(extracted from cifar-10-python.tar.gz) or retry --download with network access"
        ) from None
    if args.smoke:
        train = Subset(train, range(512))
        test = Subset(test, range(256))
    probe, labels = probe_set(plain, min(args.probe_size, len(plain)), seed=0, return_labels=True)
    return Data("cifar10", train, test, probe, labels, 3, 32)


def build_model(args: argparse.Namespace, data: Data, model: Optional[str] = None) -> nn.Module:
    """The ConvNet-BN or small ResNet for ``data``, initialised from the current torch seed."""
    model = model or (args.model if isinstance(args.model, str) else args.model[0])
    if model == "convnet":
        if data.name == "digits":
            hidden = 32 if args.smoke else 64
            return ConvNet(data.in_channels, data.num_classes, width=args.width, depth=4,
                           image_size=data.image_size, hidden=hidden)
        return ConvNet(data.in_channels, data.num_classes, width=args.width, depth=8,
                       image_size=data.image_size, hidden=256)
    return resnet_small(data.in_channels, data.num_classes, width=args.width)


# ----------------------------------------------------------------------------- training
class Classifier(pl.LightningModule):
    """A classification LightningModule around any ``nn.Module`` (held as ``net``).

    SGD with Nesterov momentum and weight decay, learning rate cosine-annealed over
    ``epochs``. ``layer_names`` lists the net's representation layers (prefixed ``net.``)
    so :class:`~svcca_torch.callbacks.SVCCACallback` records them by default.
    """

    def __init__(self, net: nn.Module, lr: float = 0.05, epochs: int = 10, weight_decay: float = 5e-4) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.epochs = epochs
        self.weight_decay = weight_decay
        names = getattr(net, "layer_names", None)
        if names is not None:
            self.layer_names = ["net." + n for n in names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True,
                              weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.epochs))
        return {"optimizer": opt, "lr_scheduler": sched}


def train_loader(args: argparse.Namespace, data: Data, seed: int) -> DataLoader:
    return DataLoader(data.train, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                      generator=torch.Generator().manual_seed(seed), drop_last=False)


def make_trainer(args: argparse.Namespace, callbacks: Sequence[pl.Callback] = (), logger: Any = False) -> pl.Trainer:
    """A Trainer for ``args.epochs`` epochs, no checkpoints, no model summary."""
    return pl.Trainer(
        max_epochs=args.epochs, accelerator=args.accelerator, devices=1, logger=logger,
        callbacks=list(callbacks), enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=bool(args.progress), log_every_n_steps=10, deterministic=False,
        default_root_dir=None,
    )


@torch.no_grad()
def predict(model: nn.Module, inputs: Any, batch_size: int = 512) -> torch.Tensor:
    """Logits ``(N, classes)`` of a tensor of inputs or a dataset, in eval mode."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    if isinstance(inputs, torch.Tensor):
        batches = inputs.split(batch_size)
    else:
        batches = (b[0] for b in DataLoader(inputs, batch_size=batch_size))
    out = torch.cat([model(b.to(device)).float().cpu() for b in batches])
    model.train(was)
    return out


def labels_of(ds: Dataset) -> torch.Tensor:
    if isinstance(ds, TensorDataset):
        return ds.tensors[1]
    return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))])  # type: ignore[arg-type]


def accuracy(model: nn.Module, ds: Dataset) -> float:
    """Top-1 accuracy on ``ds``, in percent."""
    logits = predict(model, ds)
    return 100.0 * float((logits.argmax(1) == labels_of(ds)).float().mean())


def train_plain(args: argparse.Namespace, data: Data, seed: int, model: Optional[str] = None,
                callbacks: Sequence[pl.Callback] = (), logger: Any = False) -> tuple[Classifier, pl.Trainer, float]:
    """Train one network from ``seed``; return (module, trainer, wall seconds of ``fit``)."""
    torch.manual_seed(seed)
    module = Classifier(build_model(args, data, model), lr=args.lr, epochs=args.epochs)
    trainer = make_trainer(args, callbacks, logger)
    t0 = time.perf_counter()
    trainer.fit(module, train_loader(args, data, seed))
    return module, trainer, time.perf_counter() - t0


# ----------------------------------------------------------------------------- outputs
def make_run_dir(args: argparse.Namespace, experiment: str, tag: Optional[str] = None) -> Path:
    """A fresh folder ``<out>/<experiment>/<dataset>-<tag>-seed<seed>[-smoke]-<time>``."""
    tag = tag or (args.model if isinstance(args.model, str) else "-".join(args.model))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(args.out) / experiment / f"{args.dataset}-{tag}-seed{args.seed}{'-smoke' if args.smoke else ''}-{stamp}"
    folder, i = base, 1
    while folder.exists():
        i += 1
        folder = base.with_name(f"{base.name}-{i}")
    folder.mkdir(parents=True)
    return folder


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj: Dict[str, Any]) -> Path:
    """Write ``obj`` as indented JSON (NaN -> null), atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=1))
    os.replace(tmp, path)
    return path


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def first_reaching(fractions: Sequence[float], values: Sequence[float], threshold: float) -> Optional[float]:
    """The first fraction at which ``values`` reaches ``threshold`` and stays there."""
    last_below = -1
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)) or v < threshold:
            last_below = i
    i = last_below + 1
    return float(fractions[i]) if i < len(fractions) else None


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman rank correlation (average ranks for ties); None if either side is constant."""
    def ranks(v: Sequence[float]) -> torch.Tensor:
        t = torch.tensor([float(a) for a in v], dtype=torch.float64)
        r = torch.empty_like(t)
        order = torch.argsort(t)
        r[order] = torch.arange(len(t), dtype=torch.float64)
        for val in torch.unique(t):  # ties share their mean rank
            m = t == val
            r[m] = r[m].mean()
        return r

    if len(x) < 2:
        return None
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / den if den > 0 else None


def backward_saved(freeze_log: Sequence[Dict[str, Any]], total_steps: int) -> float:
    """Fraction of the run's backward compute saved by freezing: each freeze event's saved
    fraction of one backward pass (``backward_flops_saved``, measured by the callback with
    ``torch.utils.flop_counter``), weighted by the steps it was in force."""
    if total_steps <= 0:
        return 0.0
    events = sorted(freeze_log, key=lambda e: e["step"])
    saved = 0.0
    for i, e in enumerate(events):
        end = events[i + 1]["step"] if i + 1 < len(events) else total_steps
        saved += float(e.get("backward_flops_saved") or 0.0) * max(0, end - e["step"])
    return saved / total_steps


def script_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Dict[str, Any]],
                argv: Optional[List[str]] = None) -> int:
    """Parse, run, and turn user-facing errors into one line on stderr (exit 2; set
    ``SVCCA_TORCH_TRACEBACK=1`` for the traceback)."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ExperimentError, ValueError) as err:  # library checks name the bad argument
        if os.environ.get("SVCCA_TORCH_TRACEBACK"):
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0
