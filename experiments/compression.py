"""Compression with SVCCA directions (Raghu et al. 2017, Sec. 3.1): how many directions
of a hidden layer does the network need?

Trains the network twice (seeds ``--seed`` and ``--seed + 1``) and computes the SVCCA of one
hidden layer (``--layer``) between the two, on training probe images. Then, in the first
network, inserts a linear map after that layer that projects its activations onto their
top-``k`` SVCCA directions (the canonical variates shared with the twin network; the
activations are rebuilt from them by least squares, the rest replaced by the mean) and
measures test accuracy against ``k``. Baselines: keeping the ``k`` highest-variance neurons
(the others set to their mean), and the top-``k`` principal (SVD) directions.
Outputs ``compression.png`` and ``results.json``.

    python -m svcca_torch.experiments.compression                       # digits, ConvNet-BN, layer net.fc1
    python -m svcca_torch.experiments.compression --model resnet        # layer net.flatten (pooled features)
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

import torch
from matplotlib.figure import Figure
from torch import nn

from .common import (
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
from svcca_torch import ActivationRecorder, svcca

BASIS_KINDS = ("svcca", "neurons", "svd")
DEFAULT_LAYER = {"convnet": "net.fc1", "resnet": "net.flatten"}


def build_parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.split("\n\n")[0], epochs=15, cifar_epochs=40,
                    prog=module_prog(__file__), epilog=doc_examples(__doc__))
    p.add_argument("--layer", default=None, help="module to compress (default net.fc1 / net.flatten)")
    p.add_argument("--keep", type=float, default=0.99, help="SVCCA: fraction of singular-value mass kept")
    return p


class Projection:
    """A linear map ``h -> mean + (h - mean) @ P`` applied after a module by a forward hook.

    ``P`` acts on the neuron (channel) axis: ``(N, neurons)`` outputs directly, conv outputs
    ``(N, C, H, W)`` at every position.
    """

    def __init__(self, mean: torch.Tensor, proj: torch.Tensor) -> None:
        self.mean = mean.float()
        self.proj = proj.float()

    def __call__(self, module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        mean, proj = self.mean.to(out.device), self.proj.to(out.device)
        if out.ndim == 4:
            z = out.permute(0, 2, 3, 1)
            return (mean + (z - mean) @ proj).permute(0, 3, 1, 2)
        return mean + (out.flatten(1) - mean) @ proj


def projections(x: torch.Tensor, y: torch.Tensor, ks: List[int], keep: float) -> Dict[str, Dict[int, torch.Tensor]]:
    """For each basis kind and ``k``, the ``(neurons, neurons)`` rank-``k`` map of ``x``'s
    centred activations ``(datapoints, neurons)`` (``y``: the twin network's same layer)."""
    x = x.double()
    xc = x - x.mean(0)
    res = svcca(x, y.double(), keep)
    variates = xc @ res.x_weights.double()  # (datapoints, r), canonical variates, strongest first
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    order = xc.var(0).argsort(descending=True)
    out: Dict[str, Dict[int, torch.Tensor]] = {k: {} for k in BASIS_KINDS}
    n = x.shape[1]
    for k in ks:
        if k <= variates.shape[1]:
            w = res.x_weights.double()[:, :k]
            # least-squares rebuild of the activations from the top-k variates (no inverse)
            b = torch.linalg.lstsq(variates[:, :k], xc).solution  # (k, neurons)
            out["svcca"][k] = w @ b
        d = torch.zeros(n, dtype=torch.float64)
        d[order[:k]] = 1.0
        out["neurons"][k] = torch.diag(d)
        v = vh[:k].T
        out["svd"][k] = v @ v.T
    return out


def _plot(curves: Dict[str, Dict[int, float]], full: float, layer: str, neurons: int) -> Figure:
    labels = {"svcca": "top-k SVCCA directions", "neurons": "k highest-variance neurons", "svd": "top-k SVD directions"}
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for kind, pts in curves.items():
        ks = sorted(pts)
        ax.plot(ks, [pts[k] for k in ks], marker="o", label=labels[kind])
    ax.axhline(full, color="0.3", ls="--", lw=1, label="uncompressed")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"k (of {neurons} neurons in {layer})")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def run(args: argparse.Namespace, log: Optional[Callable[[str], None]] = print) -> Dict[str, Any]:
    """Run the experiment; returns (and writes to ``<run_dir>/results.json``) its numbers."""
    log = log or (lambda s: None)
    args = finalize_args(args)
    setup_runtime(args)
    data = load_data(args)
    run_dir = make_run_dir(args, "compression")
    layer = args.layer or DEFAULT_LAYER[args.model]
    log(f"training two {args.model} networks on {data.name} (seeds {args.seed}, {args.seed + 1}; {args.epochs} epochs)")
    net_a, _, _ = train_plain(args, data, args.seed)
    net_b, _, _ = train_plain(args, data, args.seed + 1)
    modules = dict(net_a.named_modules())
    if layer not in modules:
        raise ExperimentError(f"--layer {layer!r} is not a module of the {args.model}; e.g. {', '.join(net_a.layer_names)}")
    # no pooling (grid larger than any map): conv outputs give one datapoint per position
    x = ActivationRecorder(net_a, [layer], grid=1 << 16).record(data.probe)[layer]
    y = ActivationRecorder(net_b, [layer], grid=1 << 16).record(data.probe)[layer]
    n = x.shape[1]
    ks = sorted({min(n, 2 ** i) for i in range(0, n.bit_length() + 1)})
    maps = projections(x, y, ks, float(args.keep))
    mean = x.double().mean(0)
    full = accuracy(net_a, data.test)
    curves: Dict[str, Dict[int, float]] = {k: {} for k in BASIS_KINDS}
    for kind, by_k in maps.items():
        for k, p in by_k.items():
            handle = modules[layer].register_forward_hook(Projection(mean, p))
            try:
                curves[kind][k] = accuracy(net_a, data.test)
            finally:
                handle.remove()
    figure = run_dir / "compression.png"
    _plot(curves, full, layer, n).savefig(figure, dpi=110)

    def smallest_k(kind: str) -> Optional[int]:
        ok = [k for k, a in curves[kind].items() if a >= full - 1.0]
        return min(ok) if ok else None

    results = {
        "experiment": "compression", "dataset": args.dataset, "model": args.model, "epochs": args.epochs,
        "smoke": args.smoke, "run_dir": str(run_dir), "layer": layer, "neurons": n,
        "fit_datapoints": int(x.shape[0]), "test_accuracy_full": full,
        "accuracy": {kind: {str(k): v for k, v in sorted(c.items())} for kind, c in curves.items()},
        "smallest_k_within_1_point": {kind: smallest_k(kind) for kind in BASIS_KINDS},
        "figures": {"compression": str(figure)},
    }
    write_json(run_dir / "results.json", results)
    log(f"{layer} ({n} neurons), test accuracy uncompressed {full:.1f}%:")
    log(f"{'k':>6}" + "".join(f"{kind:>10}" for kind in BASIS_KINDS))
    for k in ks:
        log(f"{k:>6}" + "".join(f"{curves[kind][k]:>10.1f}" if k in curves[kind] else f"{'-':>10}" for kind in BASIS_KINDS))
    log("smallest k within 1 point of uncompressed: "
        + ", ".join(f"{kind} {results['smallest_k_within_1_point'][kind]}" for kind in BASIS_KINDS))
    log(f"figure: {figure}; numbers: {run_dir / 'results.json'}")
    return results


def main(argv: Optional[List[str]] = None) -> int:
    return script_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
