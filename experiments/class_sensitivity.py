"""Class sensitivity (Raghu et al. 2017, Sec. 4.3): how much each layer knows about each
class, over depth and over training, and which classes are learned early.

Trains one network, recording every layer on the held-out test images at the start, at
``--captures`` steps spaced geometrically (dense early, where classes are learned) and at
the end. For each class ``c`` the target is the final network's logit of ``c``
(``--target logit``, as in the paper) or the one-hot label (``--target label``); the
SVCCA similarity of a layer with that one-dimensional target is the multiple correlation
of the target with the layer's top directions (:func:`svcca_torch.class_sensitivity`).

Outputs: ``depth.png`` (final network: similarity to each class over depth),
``training.png`` (the top feature layer's similarity to each class over training) and
``results.json``: the ``(captures, classes, layers)`` values and, per class, the fraction of
training after which the top feature layer (``--layer``, default the last before the
fully connected head) stays within 95% of its final sensitivity.

    python -m svcca_torch.experiments.class_sensitivity
    python -m svcca_torch.experiments.class_sensitivity --dataset cifar10 --data-dir data --model resnet
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

if __package__ in (None, ""):  # run as a script: import it as part of the package `experiments`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import experiments  # noqa: F401  (PEP 366: relative imports below then resolve)

    __package__ = "experiments"

import pytorch_lightning as pl
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from .common import (
    ExperimentError,
    accuracy,
    base_parser,
    doc_examples,
    finalize_args,
    first_reaching,
    load_data,
    make_run_dir,
    module_prog,
    script_main,
    setup_runtime,
    train_plain,
    write_json,
)
from svcca_torch import ActivationRecorder, class_sensitivity, class_target
from svcca_torch.data import probe_set

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class Snapshots(pl.Callback):
    """Records the module's layers on a fixed probe before training, at ``captures`` steps
    spaced geometrically over training (dense early, where classes are learned) and at the
    end (``grid=1``: conv maps globally averaged, one datapoint per image)."""

    def __init__(self, probe: torch.Tensor, captures: int = 40) -> None:
        self.probe = probe
        self.captures = captures
        self.schedule: set = set()
        self.steps: List[int] = []
        self.fractions: List[float] = []
        self.acts: List[Dict[str, torch.Tensor]] = []

    def _take(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.steps and self.steps[-1] == trainer.global_step:
            return
        rec = ActivationRecorder(pl_module, grid=1)
        self.acts.append(rec.record(self.probe))
        self.steps.append(trainer.global_step)
        total = max(1, int(trainer.estimated_stepping_batches))
        self.fractions.append(min(1.0, trainer.global_step / total))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = max(1, int(trainer.estimated_stepping_batches))
        self.schedule = {int(round(s)) for s in torch.logspace(0, math.log10(total), self.captures).tolist()}
        self._take(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step in self.schedule:
            self._take(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take(trainer, pl_module)


def build_parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.split("\n\n")[0], epochs=15, cifar_epochs=40,
                    prog=module_prog(__file__), epilog=doc_examples(__doc__))
    p.add_argument("--target", choices=("logit", "label"), default="logit",
                   help="per-class target: the final network's logit (paper) or the one-hot label")
    p.add_argument("--layer", default=None,
                   help="layer whose sensitivity over training ranks the classes (default: last before the fc head)")
    p.add_argument("--captures", type=int, default=40,
                   help="recordings over training, spaced geometrically in steps (dense early)")
    p.add_argument("--keep", type=float, default=0.99, help="SVCCA: fraction of singular-value mass kept")
    return p


def _plot_depth(layers: List[str], values: torch.Tensor, names: List[str]) -> Figure:
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["tab10"]
    for c, name in enumerate(names):
        ax.plot(range(len(layers)), values[c].numpy(), marker="o", color=cmap(c % 10), label=name)
    ax.set_xticks(range(len(layers)), layers, rotation=60, fontsize=7, ha="right")
    ax.set_ylabel("SVCCA similarity to the class")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, title="class", title_fontsize=7)
    return fig


def _plot_training(fractions: List[float], values: torch.Tensor, names: List[str], layer: str) -> Figure:
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["tab10"]
    for c, name in enumerate(names):
        ax.plot(fractions, values[:, c].numpy(), marker=".", color=cmap(c % 10), label=name)
    ax.set_xscale("symlog", linthresh=0.01)  # classes are learned early: stretch the start
    ax.set_xlabel("fraction of training (log scale above 0.01)")
    ax.set_ylabel(f"SVCCA similarity of {layer} to the class")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, title="class", title_fontsize=7)
    return fig


def run(args: argparse.Namespace, log: Optional[Callable[[str], None]] = print) -> Dict[str, Any]:
    """Run the experiment; returns (and writes to ``<run_dir>/results.json``) its numbers."""
    log = log or (lambda s: None)
    args = finalize_args(args)
    setup_runtime(args)
    data = load_data(args)
    run_dir = make_run_dir(args, "class_sensitivity")
    probe, labels = probe_set(data.test, min(len(data.test), args.probe_size), seed=0, return_labels=True)
    snaps = Snapshots(probe, max(2, args.captures))
    log(f"training {args.model} on {data.name} for {args.epochs} epochs, recording {len(probe)} test images "
        f"at up to {args.captures} steps (geometric spacing)")
    module, _, wall = train_plain(args, data, args.seed, callbacks=[snaps])
    acc = accuracy(module, data.test)
    final = snaps.acts[-1]
    layers = list(final)
    out_layer = layers[-1]
    logits = final[out_layer]
    classes = [c for c in range(data.num_classes) if bool((labels == c).any()) and not bool((labels == c).all())]
    names = [CIFAR10_CLASSES[c] if data.name == "cifar10" else str(c) for c in classes]
    keep = float(args.keep)
    values = torch.empty(len(snaps.acts), len(classes), len(layers), dtype=torch.float64)
    for k, c in enumerate(classes):
        target = logits[:, c].double() if args.target == "logit" else class_target(labels, c)
        for s, acts in enumerate(snaps.acts):
            values[s, k] = class_sensitivity(acts, target, keep=keep).values
    # the top feature layer: the last one before the fully connected head (fc1's relation to
    # the final logits is nearly linear, so it would say little about when a class is learned)
    hidden = args.layer or ([n for n in layers if not n.split(".")[-1].startswith("fc")] or layers[:-1])[-1]
    if hidden not in layers:
        raise ExperimentError(f"--layer {hidden!r} is not a recorded layer; choose one of {', '.join(layers)}")
    h = layers.index(hidden)
    learned = {}
    for k, name in enumerate(names):
        curve = values[:, k, h].tolist()
        learned[name] = first_reaching(snaps.fractions, curve, 0.95 * curve[-1])
    order = sorted(learned, key=lambda n: (1.0 if learned[n] is None else learned[n], n))
    figures = {"depth": run_dir / "depth.png", "training": run_dir / "training.png"}
    _plot_depth(layers, values[-1], names).savefig(figures["depth"], dpi=110)
    _plot_training(snaps.fractions, values[:, :, h], names, hidden).savefig(figures["training"], dpi=110)
    results = {
        "experiment": "class_sensitivity", "dataset": args.dataset, "model": args.model, "epochs": args.epochs,
        "smoke": args.smoke, "run_dir": str(run_dir), "target": args.target, "test_accuracy": acc,
        "wall_seconds": wall, "layers": layers, "classes": names, "steps": snaps.steps,
        "fractions": snaps.fractions, "probe_datapoints": int(probe.shape[0]),
        "values": values,  # (captures, classes, layers)
        "final_by_depth": {n: values[-1, k].tolist() for k, n in enumerate(names)},
        "hidden_layer": hidden,
        "learned_at": learned,
        "classes_learned_first_to_last": order,
        "figures": {k: str(v) for k, v in figures.items()},
    }
    write_json(run_dir / "results.json", results)
    log(f"test accuracy {acc:.1f}%; similarity of each layer to each class's {args.target} (final network):")
    log(f"{'class':<12}" + "".join(f"{n.split('.')[-1]:>10}" for n in layers))
    for k, n in enumerate(names):
        log(f"{n:<12}" + "".join(f"{float(v):>10.3f}" for v in values[-1, k]))
    log(f"{hidden} reaches 95% of its final sensitivity (fraction of training): "
        + ", ".join(f"{n}: {'-' if learned[n] is None else f'{learned[n]:.2f}'}" for n in order))
    log(f"figures: {run_dir} (depth.png, training.png); numbers: {run_dir / 'results.json'}")
    return results


def main(argv: Optional[List[str]] = None) -> int:
    return script_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
