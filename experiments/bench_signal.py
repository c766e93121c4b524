"""Cost of the tracker's freeze-signal recording against a full capture, for this
checkout's :class:`~svcca_torch.tracker.DynamicsTracker` and a baseline version of
``svcca_torch/tracker.py`` from git (default ``main``; none outside a git checkout), in one run, arms interleaved.

Setting (issue 10's): torchvision ``resnet18(num_classes=10)`` with its ImageNet stem on
32x32 RGB inputs (the deepest maps are 1x1), a probe of ``--probe`` random images (default
1,024), the tracker's default layers (stem conv, the 8 residual blocks, ``fc``: one freeze
group each), ``freeze="adaptive"``, 1 torch thread. The weights are untrained: the costs
depend on shapes only. ``--frozen K`` marks the lowest K groups frozen first, so the signal
judges groups K and K+1 (higher in the network).

Per arm, the median over ``--repeats`` interleaved repeats of:

* ``full capture``: :meth:`DynamicsTracker.capture` (every layer on the common rows, the
  SVD reduction of each, the store write, the similarity to the previous capture);
* ``signal``: one freeze-signal recording (``tracker.policy.signal.observe``: the two lowest
  still-trained groups, ``signal_datapoints_per_neuron`` x neurons datapoints per layer, its
  SVD reduction and the comparison with one window earlier);
* ``forward``: the whole probe through the network, eval + no_grad, nothing kept (the floor
  of a full capture).

It also prints each judged layer's signal datapoints and kept directions per arm (the
signal trusts a layer with at least ``signal_datapoints_per_neuron`` datapoints per kept
direction). The baseline is loaded from ``git show REF:svcca_torch/tracker.py`` against this checkout's
other modules (recorder, store, kernels), so only the tracker differs between the arms.

    python -m svcca_torch.experiments.bench_signal                  # ~30 s on one CPU thread
    python -m svcca_torch.experiments.bench_signal --frozen 4 --baseline d4026da
    python -m svcca_torch.experiments.bench_signal --frozen 4 --grid 4     # judged layers on different grids
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_baseline(ref: str) -> Any:
    """``svcca_torch/tracker.py`` at git ``ref``, imported as ``svcca_torch._tracker_baseline``;
    None when that cannot be read (no git checkout: an installed package)."""
    import svcca_torch

    try:
        source = subprocess.run(["git", "show", f"{ref}:svcca_torch/tracker.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    name = "svcca_torch._tracker_baseline"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "svcca_torch"
    module.__file__ = str(Path(svcca_torch.__file__).parent / "_tracker_baseline.py")
    sys.modules[name] = module
    try:
        exec(compile(source, f"{ref}:svcca_torch/tracker.py", "exec"), module.__dict__)
    except ImportError as err:  # a tracker of another package layout (before the 0.3 split)
        print(f"bench_signal: the tracker at {ref} does not import against this checkout's modules ({err}); "
              "measuring this version only")
        return None
    return module


def observe(tracker: Any, step: int) -> None:
    """One freeze-signal recording: the policy's own signal (0.3), or the 0.2 tracker's."""
    signal = getattr(tracker.policy, "signal", None)
    signal.observe(step) if signal is not None else tracker._signal(step)


def last_recording(tracker: Any) -> Dict[str, Any]:
    signal = getattr(tracker.policy, "signal", None)
    return signal.ref if signal is not None else tracker._ref


def make_tracker(cls: Any, net: torch.nn.Module, probe: torch.Tensor, folder: str, frozen: int, grid: int) -> Any:
    tracker = cls(net, probe, run_dir=folder, freeze="adaptive", freeze_window=1, max_overhead=None, grid=grid,
                  final_analysis=False, freeze_threshold=1.0)  # never freezes by itself
    tracker.setup()
    if frozen:
        tracker.policy.frozen = [g.name for g in tracker.groups[:frozen]]
    tracker.start(0)
    return tracker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", type=int, default=1024, help="probe images (default 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats, median reported (default 3)")
    parser.add_argument("--frozen", type=int, default=0, help="groups marked frozen before measuring (default 0)")
    parser.add_argument("--baseline", default=None,
                        help="git ref of the baseline tracker.py (default main when run in a git checkout, else "
                             "no baseline arm)")
    parser.add_argument("--grid", type=int, default=2, help="the tracker's pooling grid (default 2)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import torchvision

    from svcca_torch import tracker as current

    baseline = load_baseline(args.baseline or "main")
    if baseline is None:
        if args.baseline is not None:
            sys.exit(f"bench_signal: error: cannot read svcca_torch/tracker.py at git ref {args.baseline!r} "
                     f"(needs a git checkout of svcca-torch at {ROOT})")
        print("no git checkout here (an installed package): measuring this version only, without a baseline arm")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    probe = torch.randn(args.probe, 3, 32, 32)
    warnings.simplefilter("ignore")  # the few-datapoints warnings of the 1x1 deep maps: not what is measured
    with tempfile.TemporaryDirectory() as tmp:
        trackers = {}
        if baseline is not None:
            trackers[f"before ({args.baseline or 'main'})"] = make_tracker(
                baseline.DynamicsTracker, net, probe, f"{tmp}/a", args.frozen, args.grid)
        trackers["after (this checkout)"] = make_tracker(current.DynamicsTracker, net, probe, f"{tmp}/b",
                                                         args.frozen, args.grid)
        groups = [g.name for g in trackers["after (this checkout)"].groups]
        print(f"tv-resnet18, 32x32, probe {args.probe}, grid {args.grid}, {args.threads} thread(s); groups {groups}; "
              f"signal judges {groups[args.frozen: args.frozen + 2]}")

        def forward() -> None:
            with torch.no_grad():
                for batch in probe.split(256):
                    net(batch)

        times: Dict[str, Dict[str, List[float]]] = {a: {"full capture": [], "signal": []} for a in trackers}
        times["-"] = {"forward": []}
        step = 0
        for _ in range(args.repeats):
            for arm, tracker in trackers.items():
                step += 1
                t0 = time.perf_counter()
                tracker.capture(step)
                times[arm]["full capture"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                observe(tracker, step)
                times[arm]["signal"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            forward()
            times["-"]["forward"].append(time.perf_counter() - t0)
        rows = {arm: {n: (b.n_datapoints, b.k) for n, b in last_recording(t)["bases"].items()} for arm, t in trackers.items()}
        for t in trackers.values():
            if hasattr(t, "close"):
                t.close()

    def med(v: List[float]) -> float:
        return sorted(v)[len(v) // 2]

    print(f"{'arm':<24} {'full capture s':>15} {'signal s':>9} {'signal/full':>12}")
    for arm in trackers:
        full, sig = med(times[arm]["full capture"]), med(times[arm]["signal"])
        print(f"{arm:<24} {full:>15.3f} {sig:>9.3f} {sig / full:>12.3f}")
    print(f"{'forward of the probe':<24} {med(times['-']['forward']):>15.3f}")
    for arm, r in rows.items():
        print(f"signal datapoints (kept directions) per layer, {arm}: "
              + ", ".join(f"{n} {d} ({k})" for n, (d, k) in r.items()))
    if len(trackers) == 2:
        b, a = (med(times[k]["signal"]) for k in trackers)
        print(f"signal recording: after / before = {a / b:.3f}")


if __name__ == "__main__":
    main()
