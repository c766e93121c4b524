"""Learning dynamics (Raghu et al. 2017, Fig. 4): do networks converge bottom-up?

Trains the ConvNet-BN and the small ResNet with :class:`svcca_torch.callbacks.SVCCACallback`
(optionally with freeze training), writes TensorBoard logs and, per model, the
learning-dynamics grid at 0%, 35%, 75% and 100% of training (``<model>/learning_dynamics.png``),
the per-layer convergence curves and ``results.json``. The JSON says, per layer, the fraction
of training after which its SVCCA similarity to its own final state stays at or above
``--threshold`` (0.95), and whether lower layers got there first.

    python -m svcca_torch.experiments.learning_dynamics                       # digits, both models
    python -m svcca_torch.experiments.learning_dynamics --model convnet --freeze adaptive
    python -m svcca_torch.experiments.learning_dynamics --dataset cifar10 --data-dir data --download
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

if __package__ in (None, ""):  # run as a script: import it as part of the package `experiments`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import experiments  # noqa: F401  (PEP 366: relative imports below then resolve)

    __package__ = "experiments"

from pytorch_lightning.loggers import TensorBoardLogger

from .common import (
    accuracy,
    backward_saved,
    base_parser,
    doc_examples,
    finalize_args,
    load_data,
    make_run_dir,
    module_prog,
    mean_std,
    script_main,
    setup_runtime,
    train_plain,
    write_json,
)
import torch

from svcca_torch.callbacks import SVCCACallback
from svcca_torch.dynamics import LayerCurves, convergence_order

FREEZE_CHOICES = ("none", "adaptive", "schedule")


def build_parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.split("\n\n")[0], epochs=20, cifar_epochs=40, multi_model=True,
                    prog=module_prog(__file__), epilog=doc_examples(__doc__))
    p.add_argument("--freeze", choices=FREEZE_CHOICES, default="none", help="freeze training policy")
    p.add_argument("--layers", nargs="+", default=None,
                   help="layers to record: names or glob patterns, e.g. 'net.features.*.conv' 'net.features.*.bn' "
                        "to see the BatchNorm 2x2 blocks (default: the model's layer_names)")
    p.add_argument("--captures-per-epoch", type=int, default=2, help="SVCCA captures per epoch")
    p.add_argument("--threshold", type=float, default=0.95,
                   help="similarity to the final state counted as converged")
    p.add_argument("--freeze-threshold", type=float, default=None,
                   help="adaptive policy's calibrated similarity threshold (default: SVCCACallback's, 0.5)")
    p.add_argument("--freeze-patience", type=int, default=1, help="adaptive policy's patience (windows)")
    return p


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, -(-n_train // batch_size))


def convergence(summary: Dict[str, Any], threshold: float) -> Dict[str, Any]:
    """Per layer, the fraction of training after which similarity to the final state stays
    >= ``threshold``, judged on each layer before it froze (after a freeze it equals its final
    state by construction: :func:`svcca_torch.dynamics.convergence_order`); and how strongly
    that order follows depth, stated with Spearman's rho, the number of layers and a
    permutation p-value (``lower_layers_converged_first`` is True only at rho > 0, p < 0.05)."""
    layers: List[str] = summary["layers"]
    steps: List[int] = summary["steps"]
    fractions: List[float] = summary["fractions"]
    values = torch.tensor([[float("nan") if v is None else float(v) for v in row] for row in summary["to_final"]],
                          dtype=torch.float64)  # (checkpoints, layers), None where undefined
    frozen = (summary.get("freeze") or {}).get("layer_freeze_steps") or {}
    frac = dict(zip(steps, fractions))
    every = convergence_order(LayerCurves(layers, steps, fractions, values), threshold=threshold,
                              freeze_steps=frozen)
    hidden = convergence_order(LayerCurves(layers[:-1], steps, fractions, values[:, :-1]), threshold=threshold,
                               freeze_steps=frozen)
    return {
        "threshold": threshold,
        "convergence_fraction": {n: None if every["steps"][n] is None else frac[every["steps"][n]] for n in layers},
        "left_out": every["excluded"],
        "spearman_depth_vs_convergence": every["spearman"],
        "n_layers": every["n_layers"],
        "p_value": every["p_value"],
        "lower_layers_converged_first": every["lower_first"],
        "statement": every["statement"],
        # the output layer (a few logits) is low-dimensional and often settles early; the
        # same test without it
        "hidden_layers": {"spearman_depth_vs_convergence": hidden["spearman"], "n_layers": hidden["n_layers"],
                          "p_value": hidden["p_value"], "lower_layers_converged_first": hidden["lower_first"],
                          "statement": hidden["statement"]},
    }


def run_model(args: argparse.Namespace, model: str, data: Any, run_dir: Path, log: Callable[[str], None]) -> Dict[str, Any]:
    every = max(1, steps_per_epoch(len(data.train), args.batch_size) // max(1, args.captures_per_epoch))
    logger = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=model, default_hp_metric=False)
    freeze = False if args.freeze == "none" else args.freeze
    threshold = {} if args.freeze_threshold is None else {"freeze_threshold": args.freeze_threshold}
    cb = SVCCACallback(data.probe, args.layers, every_n_train_steps=every, run_dir=run_dir / model, name="svcca",
                       freeze_training=freeze, freeze_patience=args.freeze_patience, max_overhead=None,
                       progress=False, **threshold)
    log(f"[{model}] training {args.epochs} epochs on {data.name} ({len(data.train)} images), "
        f"SVCCA capture every {every} steps on {len(data.probe)} probe images"
        + (f", freeze training: {args.freeze}" if freeze else ""))
    module, trainer, wall = train_plain(args, data, args.seed, model, [cb], logger)
    acc = accuracy(module, data.test)
    logger.experiment.add_scalar("test/accuracy", acc, trainer.global_step)
    logger.experiment.flush()
    summary = json.loads((run_dir / model / "svcca_summary.json").read_text())
    conv = convergence(summary, args.threshold)
    out = {
        "model": model,
        "test_accuracy": acc,
        "wall_seconds": wall,
        "steps": trainer.global_step,
        "layers": summary["layers"],
        "captures": len(summary["captured_steps"]),
        **conv,
        "freeze": {
            "policy": args.freeze,
            "events": summary["freeze"]["events"],
            "backward_compute_saved": backward_saved(summary["freeze"]["events"], trainer.global_step),
        },
        "figures": {
            "learning_dynamics": str(run_dir / model / "learning_dynamics.png"),
            "convergence": str(run_dir / model / "convergence.png"),
            "to_previous": str(run_dir / model / "to_previous.png"),
        },
        "svcca_summary": str(run_dir / model / "svcca_summary.json"),
        "tensorboard": str(run_dir / "tensorboard" / model),
    }
    log(f"[{model}] test accuracy {acc:.1f}% in {wall:.1f} s; layers reach {args.threshold} similarity to their "
        f"final state at (fraction of training):")
    for name, f in conv["convergence_fraction"].items():
        log(f"    {name:<24} {'-' if f is None else f'{f:.2f}'}")
    log(f"[{model}] {conv['statement']}")
    log(f"[{model}] without the output layer: {conv['hidden_layers']['statement']}")
    if freeze:
        ev = summary["freeze"]["events"]
        frozen = [g for e in ev for g in e["groups"]]
        log(f"[{model}] froze {len(frozen)} groups ({', '.join(frozen) or 'none'}); backward compute saved over "
            f"the run: {100 * out['freeze']['backward_compute_saved']:.1f}%")
    return out


def run(args: argparse.Namespace, log: Optional[Callable[[str], None]] = print) -> Dict[str, Any]:
    """Run the experiment; returns (and writes to ``<run_dir>/results.json``) its numbers."""
    log = log or (lambda s: None)
    args = finalize_args(args)
    setup_runtime(args)
    models = [args.model] if isinstance(args.model, str) else list(dict.fromkeys(args.model))
    datasets = {m: load_data(args, m) for m in models}  # a missing data set fails before any folder is made
    run_dir = make_run_dir(args, "learning_dynamics", "-".join(models))
    results: Dict[str, Any] = {
        "experiment": "learning_dynamics",
        "dataset": args.dataset,
        "seed": args.seed,
        "epochs": args.epochs,
        "smoke": args.smoke,
        "run_dir": str(run_dir),
        "models": {},
    }
    for model in models:
        results["models"][model] = run_model(args, model, datasets[model], run_dir, log)
    accs = [m["test_accuracy"] for m in results["models"].values()]
    results["test_accuracy_mean"] = mean_std(accs)[0]
    write_json(run_dir / "results.json", results)
    log(f"results: {run_dir / 'results.json'}")
    for model in models:
        log(f"learning-dynamics grid ({model}): {results['models'][model]['figures']['learning_dynamics']}")
    log(f"TensorBoard: {sys.executable} -m tensorboard.main --logdir {run_dir / 'tensorboard'}")
    return results


def main(argv: Optional[List[str]] = None) -> int:
    return script_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
