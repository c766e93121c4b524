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

    python -m svcca_torch.experiments.compare_networks                 # digits, ConvNet-BN
    python -m svcca_torch.experiments.compare_networks --model resnet --layer net.layer3.1
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
    doc_examples,
    finalize_args,
    load_data,
    make_run_dir,
    module_prog,
    script_main,
    setup_runtime,
    train_plain,
    write_json,
)
from svcca_torch import ActivationRecorder, aligned_directions, compare_networks, similarity_matrix
from svcca_torch.dynamics import NARROW_LAYER_DIRECTIONS
from svcca_torch.data import probe_set
from svcca_torch.functional.matrix import METHODS
from svcca_torch.plotting import plot_aligned_directions, short_layer_names


def build_parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.split("\n\n")[0], epochs=15, cifar_epochs=40,
                    prog=module_prog(__file__), epilog=doc_examples(__doc__))
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
    """``layer  svcca (random)  cca (random) ...`` as aligned text; a narrow layer (at most
    :data:`NARROW_LAYER_DIRECTIONS` kept directions) is starred, with a note under the table."""
    head = f"{'layer':<24}{'neurons':>8}" + "".join(f"{m + ' (random)':>18}" for m in METHODS)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{r['trained'][m]:>9.3f} ({r['random'][m]:.3f})" for m in METHODS)
        name = r["layer"] + (" *" if r.get("narrow") else "")
        lines.append(f"{name:<24}{r['neurons']:>8}{cells}")
    if any(r.get("narrow") for r in rows):
        lines.append(f"* at most {NARROW_LAYER_DIRECTIONS} kept directions: compare it with its twin only, not "
                     "with other layers (see the warning)")
    return "\n".join(lines)


def _plot_matrices(layers_a: List[str], layers_b: List[str], mats: Dict[str, torch.Tensor],
                   narrow: Optional[Dict[str, str]] = None) -> Figure:
    """The layer-to-layer matrices side by side, at a size whose labels read at 110 dpi: short
    layer names (the dropped prefix said below), each cell's value, and narrow layers
    (``{layer: kept directions}``, see :data:`NARROW_LAYER_DIRECTIONS`) starred."""
    narrow = narrow or {}  # {layer: "9" or "9 / 10"}: its kept directions in network A / B
    n = max(len(layers_a), len(layers_b))
    short_a, short_b = short_layer_names(layers_a), short_layer_names(layers_b)
    tick_a = [s + (" *" if l in narrow else "") for l, s in zip(layers_a, short_a)]
    tick_b = [s + (" *" if l in narrow else "") for l, s in zip(layers_b, short_b)]
    side = min(7.0, max(4.5, 0.55 * n + 1.5))
    fig = Figure(figsize=(side * len(mats) + 1.4, side + 1.0), layout="constrained")
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    im = None
    for ax, (name, m) in zip(axes, mats.items()):
        data = m.T.numpy()
        im = ax.imshow(data, origin="lower", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(layers_a)), tick_a, rotation=45, ha="right", rotation_mode="anchor", fontsize=13)
        ax.set_yticks(range(len(layers_b)), tick_b, fontsize=13)
        if n <= 12:  # the values, readable at this size
            for (j, i), v in np.ndenumerate(data):
                ax.text(i, j, f"{v:.2f}", ha="center", va="center", fontsize=11,
                        color="black" if v > 0.6 else "white")
        ax.set_xlabel("layer of network A", fontsize=13)
        ax.set_ylabel("layer of network B", fontsize=13)
        ax.set_title(f"{name} between two seeds", fontsize=15)
    cbar = fig.colorbar(im, ax=list(axes), shrink=0.8)
    cbar.set_label("similarity", fontsize=13)
    cbar.ax.tick_params(labelsize=12)
    notes = []
    dropped = sorted({full[: len(full) - len(s)] for full, s in zip(layers_a + layers_b, short_a + short_b) if full != s})
    if dropped:
        notes.append("layer names without the prefix " + ", ".join(repr(d) for d in dropped))
    if narrow:
        short = dict(zip(layers_a + layers_b, short_a + short_b))
        which = ", ".join(f"{short[l]}: {k} kept directions" for l, k in narrow.items())
        notes.append(f"* {which} (at most {NARROW_LAYER_DIRECTIONS}: narrow): high against any layer that carries "
                     "them; read it against its twin only")
    if notes:
        fig.supxlabel("\n".join(notes), fontsize=12, color="0.3")
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
    # the library's comparison: it warns about layers too narrow for the matrix to mean much
    cmp = compare_networks(acts_a, acts_b, keep=keep)
    mats = {
        "SVCCA": cmp.matrix,
        "linear CKA": similarity_matrix([acts_a[n] for n in layers], [acts_b[n] for n in layers], "cka"),
    }
    narrow = {name: str(ks[0]) if len(set(ks)) == 1 else " / ".join(map(str, ks)) for name, ks in cmp.narrow.items()}
    layer = args.layer or layers[-2]
    if layer not in acts_a:
        raise ExperimentError(f"--layer {layer!r} is not a recorded layer; choose one of {', '.join(layers)}")
    al = aligned_directions(acts_a[layer].double(), acts_b[layer].double(), keep=keep, n=2)
    figures = {"matrix": run_dir / "matrix.png", "per_layer": run_dir / "per_layer.png",
               "aligned_directions": run_dir / "aligned_directions.png"}
    _plot_matrices(layers, layers, mats, narrow).savefig(figures["matrix"], dpi=110)
    _plot_per_layer(rows).savefig(figures["per_layer"], dpi=110)
    plot_aligned_directions(al, labels, names=(f"seed {args.seed}", f"seed {seed_b}"), layer=layer).savefig(
        figures["aligned_directions"], dpi=110)
    for r in rows:
        r["kept_directions"] = [cmp.kept_a[r["layer"]], cmp.kept_b[r["layer"]]]
        r["narrow"] = r["layer"] in narrow
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
        "narrow_layers": sorted(narrow),  # at most NARROW_LAYER_DIRECTIONS kept directions: see the warning
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
