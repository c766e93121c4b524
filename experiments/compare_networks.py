"""Two networks trained from different seeds (Raghu et al. 2017, Sec. 4 and Fig. 2).

Trains the same architecture twice (seeds ``--seed`` and ``--seed-b``), records every layer
on the held-out test images, and writes:

* the layer-to-layer SVCCA and linear-CKA matrices between the two networks (``matrix.png``);
* each layer against its twin by every method (SVCCA, CCA, PWCCA, linear CKA) next to a
  random baseline of the same shapes (Gaussian activations, ``--baseline-draws`` draws),
  printed as a table and drawn in ``per_layer.png``;
* the aligned-directions figure (``aligned_directions.png``): the two networks' top neurons
  of one layer barely correlate, their top SVCCA directions do;
* ``results.json`` with all the numbers.

    python experiments/compare_networks.py                 # digits, ConvNet-BN
    python experiments/compare_networks.py --model resnet --layer net.layer3.1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

if __package__ in (None, ""):  # run as a script: import it as part of the package `experiments`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import experiments  # noqa: F401  (PEP 366: relative imports below then resolve)

    __package__ = "experiments"

import numpy as np
import torch
from matplotlib.figure import Figure

from .common import (
    Data,
    ExperimentError,
    accuracy,
    base_parser,
    finalize_args,
    load_data,
    make_run_dir,
    script_main,
    setup_runtime,
    train_plain,
    write_json,
)
from svcca_torch import ActivationRecorder, aligned_directions, similarity_matrix
from svcca_torch.data import probe_set
from svcca_torch.functional.matrix import METHODS
from svcca_torch.plotting import plot_aligned_directions, short_layer_names


def build_parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.split("\n\n")[0], epochs=15, cifar_epochs=40)
    p.add_argument("--seed-b", type=int, default=None, help="seed of the second network (default --seed + 1)")
    p.add_argument("--layer", default=None, help="layer of the aligned-directions figure (default: the last hidden layer)")
    p.add_argument("--keep", type=float, default=0.99, help="SVCCA: fraction of singular-value mass kept")
    p.add_argument("--baseline-draws", type=int, default=3, help="random draws averaged for the baseline")
    return p


def similarity(method: str, x: torch.Tensor, y: torch.Tensor, keep: float) -> float:
    """One similarity of two ``(datapoints, neurons)`` layers by ``method`` (one of METHODS)."""
    return float(similarity_matrix([x], [y], method, keep=keep)[0, 0])


def random_baseline(n: int, pa: int, pb: int, draws: int, seed: int, keep: float) -> Dict[str, float]:
    """Mean similarity of independent Gaussian layers ``(n, pa)`` and ``(n, pb)``: the
    chance level of each method for these shapes (CCA-based methods rise with neurons / n)."""
    g = torch.Generator().manual_seed(seed)
    sums = {m: 0.0 for m in METHODS}
    for _ in range(draws):
        a = torch.randn(n, pa, generator=g, dtype=torch.float64)
        b = torch.randn(n, pb, generator=g, dtype=torch.float64)
        for m in METHODS:
            sums[m] += similarity(m, a, b, keep)
    return {m: s / draws for m, s in sums.items()}


def format_table(rows: List[Dict[str, Any]]) -> str:
    """``layer  svcca (random)  cca (random) ...`` as aligned text."""
    head = f"{'layer':<24}{'neurons':>8}" + "".join(f"{m + ' (random)':>18}" for m in METHODS)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{r['trained'][m]:>9.3f} ({r['random'][m]:.3f})" for m in METHODS)
        lines.append(f"{r['layer']:<24}{r['neurons']:>8}{cells}")
    return "\n".join(lines)


def _plot_matrices(layers_a: List[str], layers_b: List[str], mats: Dict[str, torch.Tensor]) -> Figure:
    fig = Figure(figsize=(5.0 * len(mats) + 1, 4.8), layout="constrained")
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    im = None
    for ax, (name, m) in zip(axes, mats.items()):
        im = ax.imshow(m.T.numpy(), origin="lower", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(layers_a)), layers_a, rotation=90, fontsize=7)
        ax.set_yticks(range(len(layers_b)), layers_b, fontsize=7)
        ax.set_xlabel("network A layer")
        ax.set_ylabel("network B layer")
        ax.set_title(f"{name} between two seeds", fontsize=9)
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="similarity")
    return fig


def _plot_per_layer(rows: List[Dict[str, Any]]) -> Figure:
    """One panel per method: each layer against its twin, and that method's random baseline."""
    fig = Figure(figsize=(10.0, 6.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True, sharey=True)
    x = np.arange(len(rows))
    for i, (ax, m) in enumerate(zip(axes.flat, METHODS)):
        ax.plot(x, [r["trained"][m] for r in rows], marker="o", color=f"C{i}", lw=2, label="two seeds")
        ax.plot(x, [r["random"][m] for r in rows], marker="x", ls="--", color="0.45", lw=1.5,
                label="random layers, same shapes")
        ax.set_title(m, fontsize=11)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xticks(x, short_layer_names([r["layer"] for r in rows]), rotation=45, fontsize=10, ha="right",
                      rotation_mode="anchor")
    for ax in axes[:, 0]:
        ax.set_ylabel("similarity of layer to its twin")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside upper center", ncols=2, fontsize=10,
               frameon=False)  # above the panels: covers no curve
    return fig


def compare_trained(args: argparse.Namespace, data: Data, log: Callable[[str], None], run_dir: Path) -> Dict[str, Any]:
    """Train the two networks and compute everything; figures go to ``run_dir``."""
    seed_b = args.seed + 1 if args.seed_b is None else args.seed_b
    log(f"training two {args.model} networks on {data.name} (seeds {args.seed} and {seed_b}, {args.epochs} epochs each)")
    net_a, _, wall_a = train_plain(args, data, args.seed)
    net_b, _, wall_b = train_plain(args, data, seed_b)
    acc = [accuracy(net_a, data.test), accuracy(net_b, data.test)]
    probe, labels = probe_set(data.test, min(len(data.test), max(args.probe_size, 2)), seed=0, return_labels=True)
    # grid=1: conv maps globally averaged, one datapoint per image for every layer
    acts_a = ActivationRecorder(net_a, grid=1).record(probe)
    acts_b = ActivationRecorder(net_b, grid=1).record(probe)
    layers = list(acts_a)
    keep = float(args.keep)
    rows = []
    for i, name in enumerate(layers):
        x, y = acts_a[name].double(), acts_b[name].double()
        trained = {m: similarity(m, x, y, keep) for m in METHODS}
        rand = random_baseline(x.shape[0], x.shape[1], y.shape[1], args.baseline_draws, 1000 + i, keep)
        rows.append({"layer": name, "neurons": int(x.shape[1]), "datapoints": int(x.shape[0]),
                     "trained": trained, "random": rand})
    mats = {
        "SVCCA": similarity_matrix([acts_a[n] for n in layers], [acts_b[n] for n in layers], "svcca", keep=keep),
        "linear CKA": similarity_matrix([acts_a[n] for n in layers], [acts_b[n] for n in layers], "cka"),
    }
    layer = args.layer or layers[-2]
    if layer not in acts_a:
        raise ExperimentError(f"--layer {layer!r} is not a recorded layer; choose one of {', '.join(layers)}")
    al = aligned_directions(acts_a[layer].double(), acts_b[layer].double(), keep=keep, n=2)
    figures = {"matrix": run_dir / "matrix.png", "per_layer": run_dir / "per_layer.png",
               "aligned_directions": run_dir / "aligned_directions.png"}
    _plot_matrices(layers, layers, mats).savefig(figures["matrix"], dpi=110)
    _plot_per_layer(rows).savefig(figures["per_layer"], dpi=110)
    plot_aligned_directions(al, labels, names=(f"seed {args.seed}", f"seed {seed_b}"), layer=layer).savefig(
        figures["aligned_directions"], dpi=110)
    above = [r["layer"] for r in rows if all(r["trained"][m] > r["random"][m] for m in METHODS)]
    return {
        "seeds": [args.seed, seed_b],
        "test_accuracy": acc,
        "wall_seconds": [wall_a, wall_b],
        "probe_datapoints": int(probe.shape[0]),
        "layers": layers,
        "per_layer": rows,
        "all_methods_above_random": above,
        "svcca_matrix": mats["SVCCA"],
        "cka_matrix": mats["linear CKA"],
        "aligned_directions": {
            "layer": layer,
            "neuron_correlations": al.neuron_correlations,
            "direction_correlations": al.coefficients,
        },
        "figures": {k: str(v) for k, v in figures.items()},
    }


def run(args: argparse.Namespace, log: Optional[Callable[[str], None]] = print) -> Dict[str, Any]:
    """Run the experiment; returns (and writes to ``<run_dir>/results.json``) its numbers."""
    log = log or (lambda s: None)
    args = finalize_args(args)
    setup_runtime(args)
    if args.seed_b is not None and args.seed_b == args.seed:
        raise ExperimentError("--seed-b must differ from --seed (the point is two different initialisations)")
    data = load_data(args)
    run_dir = make_run_dir(args, "compare_networks")
    res = compare_trained(args, data, log, run_dir)
    results = {"experiment": "compare_networks", "dataset": args.dataset, "model": args.model,
               "epochs": args.epochs, "smoke": args.smoke, "run_dir": str(run_dir), **res}
    write_json(run_dir / "results.json", results)
    log(f"test accuracy: seed {res['seeds'][0]} {res['test_accuracy'][0]:.1f}%, "
        f"seed {res['seeds'][1]} {res['test_accuracy'][1]:.1f}%; {res['probe_datapoints']} test images recorded")
    log("similarity of each layer to its twin (random baseline of the same shapes in brackets):")
    log(format_table(res["per_layer"]))
    ad = res["aligned_directions"]
    log(f"{ad['layer']}: top-2 neurons correlate {', '.join(f'{float(c):.2f}' for c in ad['neuron_correlations'])}; "
        f"top-2 SVCCA directions {', '.join(f'{float(c):.2f}' for c in ad['direction_correlations'])}")
    log(f"figures: {run_dir} (matrix.png, per_layer.png, aligned_directions.png); numbers: {run_dir / 'results.json'}")
    return results


def main(argv: Optional[List[str]] = None) -> int:
    return script_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
