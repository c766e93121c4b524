"""Freeze training (Raghu et al. 2017, Sec. 5): no freezing vs the paper's schedule vs the
adaptive policy, same model and budget, over several seeds.

For each seed and policy it trains the network for the same number of epochs and reports
test accuracy (mean ± std over seeds), wall time, and the backward compute saved: the
fraction of one backward pass's FLOPs no longer spent once groups are frozen (measured by
the callback with ``torch.utils.flop_counter``), weighted by the steps it was in force.
Target of the issue: adaptive saves >= 25% of backward compute with test accuracy within
0.5 points of full training. ``results.json`` holds every run; ``table.md`` the table.

    python -m svcca_torch.experiments.freeze_training                      # digits, ConvNet-BN, seeds 0 1 2
    python -m svcca_torch.experiments.freeze_training --model resnet --seeds 0 1 2 3 4
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

from .common import (
    ExperimentError,
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
from svcca_torch.callbacks import SVCCACallback
from svcca_torch.freeze import DEFAULT_THRESHOLD

POLICIES = ("none", "schedule", "adaptive")
TARGET_SAVED = 0.25
TARGET_ACCURACY_DROP = 0.5


def build_parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.split("\n\n")[0], epochs=20, cifar_epochs=40,
                    prog=module_prog(__file__), epilog=doc_examples(__doc__))
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; --seed is ignored)")
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES), help="policies to compare")
    p.add_argument("--freeze-window", type=int, default=None,
                   help="adaptive: steps between the two recordings its signal compares (default one epoch)")
    p.add_argument("--freeze-threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="adaptive: calibrated similarity to one window earlier (default: the policy's)")
    p.add_argument("--freeze-patience", type=int, default=1, help="adaptive: consecutive settled windows")
    p.add_argument("--max-frozen-fraction", type=float, default=0.75, help="most layer groups frozen")
    p.add_argument("--schedule-start", type=float, default=0.25, help="schedule: fraction at which the lowest group freezes")
    p.add_argument("--schedule-end", type=float, default=0.75, help="schedule: fraction at which the highest freezable group freezes")
    p.add_argument("--frozen-cache", action=argparse.BooleanOptionalAction, default=False,
                   help="opt in to skipping the frozen prefix's forward for training inputs seen before (exact or "
                        "off; off by itself under random augmentation)")
    return p


def train_one(args: argparse.Namespace, data: Any, seed: int, policy: str, run_dir: Path) -> Dict[str, Any]:
    callbacks = []
    cb = None
    if policy != "none":
        # captures at the callback's defaults (a 5% time budget); the freeze signal has its own grid
        cb = SVCCACallback(
            data.probe, run_dir=run_dir / f"{policy}-seed{seed}", name=f"freeze_{policy}",
            freeze_training=policy, freeze_window=args.freeze_window, freeze_threshold=args.freeze_threshold,
            freeze_patience=args.freeze_patience,
            max_frozen_fraction=args.max_frozen_fraction, schedule_start=args.schedule_start,
            schedule_end=args.schedule_end, frozen_cache=args.frozen_cache, final_analysis=False, progress=False,
        )
        callbacks.append(cb)
    module, trainer, wall = train_plain(args, data, seed, callbacks=callbacks)
    events = cb.freeze_log if cb is not None else []
    return {
        "seed": seed,
        "policy": policy,
        "test_accuracy": accuracy(module, data.test),
        "wall_seconds": wall,
        "steps": trainer.global_step,
        "backward_compute_saved": backward_saved(events, trainer.global_step),
        "frozen_groups": [g for e in events for g in e["groups"]],
        "frozen_cache": cb.tracker.frozen_cache_stats if cb is not None and cb.tracker is not None else None,
        "groups": [g.name for g in cb.groups] if cb is not None else [],
        "freeze_events": events,
    }


def summarise(runs: List[Dict[str, Any]], policies: List[str]) -> Dict[str, Any]:
    """Per policy: accuracy mean ± std, wall time, backward compute saved; and the target check."""
    table: Dict[str, Any] = {}
    for p in policies:
        rs = [r for r in runs if r["policy"] == p]
        acc_m, acc_s = mean_std([r["test_accuracy"] for r in rs])
        wall_m, wall_s = mean_std([r["wall_seconds"] for r in rs])
        saved_m, saved_s = mean_std([r["backward_compute_saved"] for r in rs])
        table[p] = {"test_accuracy_mean": acc_m, "test_accuracy_std": acc_s, "wall_seconds_mean": wall_m,
                    "wall_seconds_std": wall_s, "backward_compute_saved_mean": saved_m,
                    "backward_compute_saved_std": saved_s, "seeds": [r["seed"] for r in rs]}
    if "none" in table:
        for p, row in table.items():
            row["accuracy_change_vs_none"] = row["test_accuracy_mean"] - table["none"]["test_accuracy_mean"]
    target = None
    if "none" in table and "adaptive" in table:
        a = table["adaptive"]
        target = {
            "backward_compute_saved": a["backward_compute_saved_mean"],
            "accuracy_change_points": a["accuracy_change_vs_none"],
            "saved_at_least": TARGET_SAVED,
            "accuracy_within": TARGET_ACCURACY_DROP,
            "met": bool(a["backward_compute_saved_mean"] >= TARGET_SAVED
                        and a["accuracy_change_vs_none"] >= -TARGET_ACCURACY_DROP),
        }
    return {"table": table, "target": target}


def format_table(summary: Dict[str, Any]) -> str:
    """A markdown table of :func:`summarise`'s output."""
    lines = ["| policy | test accuracy (%) | change vs none (points) | wall time (s) | backward compute saved |",
             "|---|---|---|---|---|"]
    for p, r in summary["table"].items():
        change = r.get("accuracy_change_vs_none")
        lines.append(
            f"| {p} | {r['test_accuracy_mean']:.2f} ± {r['test_accuracy_std']:.2f} | "
            f"{'-' if change is None else f'{change:+.2f}'} | {r['wall_seconds_mean']:.1f} ± {r['wall_seconds_std']:.1f} | "
            f"{100 * r['backward_compute_saved_mean']:.1f}% ± {100 * r['backward_compute_saved_std']:.1f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace, log: Optional[Callable[[str], None]] = print) -> Dict[str, Any]:
    """Run the experiment; returns (and writes to ``<run_dir>/results.json``) its numbers."""
    log = log or (lambda s: None)
    args = finalize_args(args)
    setup_runtime(args)
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.smoke else [0, 1, 2])
    if len(set(seeds)) != len(seeds):
        raise ExperimentError(f"--seeds must be distinct, got {seeds}")
    policies = list(dict.fromkeys(args.policies))
    data = load_data(args)
    run_dir = make_run_dir(args, "freeze_training")
    log(f"freeze training on {data.name}, {args.model}, {args.epochs} epochs, seeds {seeds}, policies {policies}")
    runs = []
    for seed in seeds:
        for policy in policies:
            r = train_one(args, data, seed, policy, run_dir)
            runs.append(r)
            log(f"  seed {seed} {policy:<9} test accuracy {r['test_accuracy']:.2f}%  wall {r['wall_seconds']:.1f} s  "
                f"backward compute saved {100 * r['backward_compute_saved']:.1f}%  frozen: {', '.join(r['frozen_groups']) or '-'}")
    summary = summarise(runs, policies)
    results = {"experiment": "freeze_training", "dataset": args.dataset, "model": args.model, "epochs": args.epochs,
               "seeds": seeds, "smoke": args.smoke, "run_dir": str(run_dir), "runs": runs, **summary}
    table = format_table(summary)
    (run_dir / "table.md").write_text(table + "\n")
    write_json(run_dir / "results.json", results)
    log(table)
    t = summary["target"]
    if t is not None:
        log(f"target (adaptive saves >= {100 * TARGET_SAVED:.0f}% backward compute, accuracy within "
            f"{TARGET_ACCURACY_DROP} points): {'met' if t['met'] else 'NOT met'} "
            f"({100 * t['backward_compute_saved']:.1f}% saved, {t['accuracy_change_points']:+.2f} points)")
    log(f"numbers: {run_dir / 'results.json'}")
    return results


def main(argv: Optional[List[str]] = None) -> int:
    return script_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
