"""Cost of SVCCACallback: the same training with and without it, in one run.

Measures, on a small ResNet (``resnet_small``) on 32x32 images (scikit-learn's digits,
upsampled), with a 1,024-image probe captured every epoch:

1. wall-time overhead of the callback at its defaults (no freeze training) against the same
   training without it (target <= 10%); the captures' share is about
   ``probe images / (3 x training images per epoch)`` (a no-grad forward of the probe against
   forward + backward of the epoch), so the overhead is shown for two epoch sizes;
2. time per training step before and after freeze training froze the lower half of the
   layer groups (the schedule policy, pinned to freeze them at 50% of training), with the
   callback's own FLOP-count estimate of the backward compute saved;
3. the cost of ``find_unused_parameters=True``, which the callback turns on for freeze
   training under ``strategy="ddp"``: time per step of a DDP-wrapped model with and without
   it, no layer frozen, steps alternated in one process so load on a shared machine hits
   both alike (``--sections ddp2`` also times 2-process Lightning DDP runs).

Run ``python experiments/bench_callback.py`` (about 3-5 minutes on 2 CPU cores); ``--quick``
for a smoke run. Prints a table and writes ``bench_callback.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from svcca_torch.callbacks import SVCCACallback
from svcca_torch.data import load_digits_dataset, probe_set
from svcca_torch.models import resnet_small


class LitResNet(pl.LightningModule):
    def __init__(self, width: int, lr: float = 0.05) -> None:
        super().__init__()
        self.net = resnet_small(in_channels=1, width=width)
        self.layer_names = ["net." + n for n in self.net.layer_names]
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


class StepTimer(Callback):
    """Wall time of every training step (forward, backward, optimizer), captures excluded."""

    def __init__(self) -> None:
        self.times: List[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)


def _data(repeats: int, batch_size: int, n_probe: int):
    train, _ = load_digits_dataset(size=32)
    x, y = train.tensors
    data = TensorDataset(x.repeat(repeats, 1, 1, 1), y.repeat(repeats))
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    return loader, probe_set(train, n_probe, seed=0)


def _fit(args, loader, callbacks, root: str, max_epochs: int) -> float:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        default_root_dir=root, max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    t0 = time.perf_counter()
    trainer.fit(LitResNet(args.width), loader)
    return time.perf_counter() - t0


def _timed(cb: SVCCACallback) -> Dict[str, List[float]]:
    """Time the callback's capture (record, reduce, store, similarity) and its end-of-training
    analysis (matrices, figures, JSON), to split the overhead without relying on wall-time
    differences alone on a shared machine."""
    timings: Dict[str, List[float]] = {"capture": [], "final_analysis": []}
    for attr, key in (("_capture", "capture"), ("_finish", "final_analysis")):
        original = getattr(cb, attr)

        def wrapped(*a, _original=original, _key=key, **k):
            t0 = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                timings[_key].append(time.perf_counter() - t0)

        setattr(cb, attr, wrapped)
    return timings


def bench_overhead(args, repeats: int) -> Dict[str, Any]:
    loader, probe = _data(repeats, args.batch_size, args.probe)
    walls: Dict[str, List[float]] = {"without": [], "with": []}
    timings: Dict[str, List[float]] = {}
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.rounds):  # interleaved, so load drift on a shared machine hits both
            walls["without"].append(_fit(args, loader, [], root, args.epochs))
            cb = SVCCACallback(probe, run_dir=Path(root) / f"svcca{r}", progress=False)
            timings = _timed(cb)
            walls["with"].append(_fit(args, loader, [cb], root, args.epochs))
    base, with_cb = min(walls["without"]), min(walls["with"])
    capture = statistics.median(timings["capture"])
    final = sum(timings["final_analysis"])
    return {"train_images_per_epoch": len(loader.dataset), "probe_images": args.probe, "epochs": args.epochs,
            "captures": len(timings["capture"]), "wall_without_s": base, "wall_with_s": with_cb,
            "overhead": with_cb / base - 1.0, "capture_s": capture, "final_analysis_s": final,
            "epoch_s_without": base / args.epochs, "capture_per_epoch": capture / (base / args.epochs),
            "all_walls": walls}


def bench_freeze(args) -> Dict[str, Any]:
    loader, probe = _data(args.repeats, args.batch_size, args.probe)
    with tempfile.TemporaryDirectory() as root:
        cb = SVCCACallback(probe, run_dir=Path(root) / "svcca", freeze_training="schedule", schedule_start=0.5,
                           schedule_end=0.5, max_frozen_fraction=0.5, final_analysis=False, progress=False)
        timer = StepTimer()
        _fit(args, loader, [cb, timer], root, args.epochs)
    freeze_step = cb.freeze_log[0]["step"]
    # skip the first steps of each phase (allocator warm-up)
    before = timer.times[3:freeze_step]
    after = timer.times[freeze_step + 3:]
    b, a = statistics.median(before), statistics.median(after)
    return {"groups": [g.name for g in cb.groups], "frozen": cb.policy.frozen, "freeze_step": freeze_step,
            "step_s_before": b, "step_s_after": a, "speedup": b / a, "time_saved": 1.0 - a / b,
            "backward_flops_saved": cb.freeze_log[-1]["backward_flops_saved"],
            "frozen_parameters": cb.freeze_log[-1]["frozen_parameters"],
            "total_parameters": sum(p.numel() for g in cb.groups for p in g.parameters())}


def ddp_worker(args) -> None:
    """One 2-process run (Lightning re-launches this same command for rank 1)."""
    from pytorch_lightning.strategies import DDPStrategy

    torch.set_num_threads(1)
    loader, _ = _data(1, args.batch_size, 16)
    timer = StepTimer()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        default_root_dir=args.out, max_steps=args.ddp_steps, accelerator="cpu", devices=2,
        strategy=DDPStrategy(find_unused_parameters=bool(args.find_unused)), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    trainer.fit(LitResNet(args.width), loader)
    if trainer.global_rank == 0:
        Path(args.worker_result).write_text(json.dumps({"step_s": statistics.median(timer.times[3:])}))


def bench_ddp_2proc(args) -> Dict[str, Any]:
    """2-process Lightning DDP runs with and without find_unused_parameters (noisy on a
    shared 2-core machine: each process needs a core of its own)."""
    out: Dict[str, Any] = {}
    for flag in (0, 1) * args.rounds * 2:  # interleaved, min taken
        with tempfile.TemporaryDirectory() as root:
            res = Path(root) / "result.json"
            cmd = [sys.executable, os.path.abspath(__file__), "--ddp-worker", "--find-unused", str(flag),
                   "--worker-result", str(res), "--out", root, "--width", str(args.width),
                   "--batch-size", str(args.batch_size), "--ddp-steps", str(args.ddp_steps)]
            subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=root)
            key = "step_s_find_unused_true" if flag else "step_s_find_unused_false"
            out[key] = min(out.get(key, float("inf")), json.loads(res.read_text())["step_s"])
    out["cost"] = out["step_s_find_unused_true"] / out["step_s_find_unused_false"] - 1.0
    return out


def bench_ddp(args) -> Dict[str, Any]:
    """The per-step cost of find_unused_parameters=True in isolation: two DDP wrappers (False,
    True) of identical models in one gloo process group of size 1, training steps alternated
    so that machine load hits both alike; median step times. The flag's cost is the extra
    autograd-graph traversal after each forward, which does not depend on the world size."""
    import copy

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    loader, _ = _data(1, args.batch_size, 16)
    with tempfile.TemporaryDirectory() as root:
        dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            base = LitResNet(args.width).net
            wrapped = {flag: DDP(copy.deepcopy(base), find_unused_parameters=flag) for flag in (False, True)}
            opts = {flag: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for flag, m in wrapped.items()}
            times: Dict[bool, List[float]] = {False: [], True: []}
            batches = iter(loader)
            for i in range(args.ddp_steps):
                try:
                    x, y = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    x, y = next(batches)
                for flag in ((False, True) if i % 2 == 0 else (True, False)):
                    t0 = time.perf_counter()
                    opts[flag].zero_grad()
                    nn.functional.cross_entropy(wrapped[flag](x), y).backward()
                    opts[flag].step()
                    if i >= 3:
                        times[flag].append(time.perf_counter() - t0)
        finally:
            dist.destroy_process_group()
    f, t = statistics.median(times[False]), statistics.median(times[True])
    return {"step_s_find_unused_false": f, "step_s_find_unused_true": t, "cost": t / f - 1.0,
            "steps": len(times[False])}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=8, help="channels of the ResNet's first stage (default 8)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per run (default 3)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--probe", type=int, default=1024, help="probe images (default 1024)")
    parser.add_argument("--repeats", type=int, default=4,
                        help="the digits training split repeated this many times per epoch for the larger epoch "
                             "(default 4: 5,388 images; CIFAR-10 has 50,000)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions, min taken (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--sections", default="overhead,freeze,ddp",
                        help="comma-separated parts to run: overhead, freeze, ddp (cost of DDP "
                             "find_unused_parameters, in one process), ddp2 (the same with 2 Lightning DDP "
                             "processes; noisy on 2 shared cores); default overhead,freeze,ddp")
    parser.add_argument("--ddp-steps", type=int, default=40, help="steps per DDP timing (default 40)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes")
    parser.add_argument("--out", type=str, default="runs/bench_callback")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--find-unused", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", type=str, default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args)
        return
    torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs, args.probe, args.repeats, args.width, args.ddp_steps = 2, 128, 1, 4, 8
    results: Dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if not k.startswith(("ddp_w", "worker", "find"))},
                               "torch": torch.__version__, "lightning": pl.__version__}
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"overhead", "freeze", "ddp", "ddp2"}
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from overhead, freeze, ddp, ddp2")
    if "overhead" in sections:
        results["overhead_digits_epoch"] = bench_overhead(args, 1)
        if args.repeats > 1:
            results["overhead_larger_epoch"] = bench_overhead(args, args.repeats)
    if "freeze" in sections:
        results["freeze"] = bench_freeze(args)
    if "ddp" in sections:
        results["ddp"] = bench_ddp(args)
    if "ddp2" in sections:
        results["ddp_2proc"] = bench_ddp_2proc(args)

    print(f"\nSVCCACallback cost (resnet_small width {args.width}, 32x32 digits, probe {args.probe}, "
          f"capture every epoch, {args.epochs} epochs, {args.threads} thread(s))")
    if any(k in results for k in ("overhead_digits_epoch", "overhead_larger_epoch")):
        print(f"{'training images / epoch':>24} {'without (s)':>12} {'with (s)':>10} {'overhead':>9} "
              f"{'1 capture (s)':>14} {'capture/epoch':>14} {'end analysis (s)':>17}")
    for key in ("overhead_digits_epoch", "overhead_larger_epoch"):
        if key in results:
            r = results[key]
            print(f"{r['train_images_per_epoch']:>24,} {r['wall_without_s']:>12.1f} {r['wall_with_s']:>10.1f} "
                  f"{100 * r['overhead']:>8.1f}% {r['capture_s']:>14.2f} {100 * r['capture_per_epoch']:>13.1f}% "
                  f"{r['final_analysis_s']:>17.1f}")
    f = results.get("freeze")
    if f:
        print(f"\nfreeze training froze {len(f['frozen'])} of {len(f['groups'])} groups at step {f['freeze_step']} "
              f"({f['frozen_parameters']:,} of {f['total_parameters']:,} parameters):")
        print(f"  time per step {1000 * f['step_s_before']:.1f} ms -> {1000 * f['step_s_after']:.1f} ms "
              f"({100 * f['time_saved']:.0f}% less); backward FLOPs saved (estimate) "
              f"{100 * f['backward_flops_saved']:.0f}%")
    for key, what in (("ddp", "DDP wrapper, alternated steps in one process"),
                      ("ddp_2proc", "Lightning DDP, 2 CPU processes (gloo)")):
        if key in results:
            d = results[key]
            print(f"\n{what}: time per step {1000 * d['step_s_find_unused_false']:.1f} ms "
                  f"(find_unused_parameters=False) vs {1000 * d['step_s_find_unused_true']:.1f} ms (True): "
                  f"{100 * d['cost']:+.1f}%")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_callback.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out / 'bench_callback.json'}")


if __name__ == "__main__":
    main()
