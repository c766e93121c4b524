"""Cost and benefit of SVCCACallback, end to end, in one run with the arms interleaved.

Setting (issue 10): torchvision ``resnet18(num_classes=10)`` with its ImageNet stem on
scikit-learn's digits upsampled to 32x32 with 3 channels, batch 64, one torch thread, a
1,024-image probe, a ``TensorBoardLogger`` in every arm (so the callback's logging is
paid), the same seed and data order in every arm of a seed. It prints:

1. **overhead at defaults** (no freeze training): wall time with the callback against the
   same training without it, for the 1,347-image digits epoch and a 4x larger one
   (goal: <= 5%);
2. **freeze training end to end**: wall time (callback included) and test accuracy, mean
   of the seeds, for no callback / ``freeze_training="schedule"`` / ``freeze_training=True``
   (adaptive) at their defaults (goal: <= 0.75x the time without the callback, accuracy
   within 0.5 points);
3. **capture-frequency invariance**: the adaptive policy with captures every 4 steps vs
   every epoch (``max_overhead=None``): groups frozen and the training fraction of the
   first freeze (goal: same groups +-1, first freeze within 10% of training);
4. with ``--augment``, **random augmentation** (issue 21): the no-callback and adaptive arms
   also trained under the usual CIFAR recipe (``RandomCrop(32, padding=4)`` +
   ``RandomHorizontalFlip()``, drawn per sample from a generator of the seed's own, so both
   augmented arms of a seed see the same images), interleaved with the plain arms: wall
   ratio, process CPU time ratio (each against the no-callback arm of the same recipe and
   seed) and test accuracy, side by side.

Every arm also reports its process CPU time (``time.process_time``, all threads): wall time
on a shared machine moves with the load, CPU time much less.

    python -m svcca_torch.experiments.bench_callback                 # the run of docs/freeze_training.md (~30 min, 2 cores)
    python -m svcca_torch.experiments.bench_callback --quick         # smoke run
    python -m svcca_torch.experiments.bench_callback --freeze-only --augment --seeds 0   # augmentation side by side

Writes ``bench_callback.json`` to ``--out``. ``--sections ddp`` (or ``ddp2``) times the cost
of DDP's ``find_unused_parameters=True`` that freeze training needs
(``strategy="ddp_find_unused_parameters_true"``).
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
from pytorch_lightning.loggers import TensorBoardLogger

from svcca_torch.callbacks import SVCCACallback
from svcca_torch.data import load_digits_dataset, probe_set
from svcca_torch.experiments.common import backward_saved


def _resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)  # the ImageNet stem: 7x7/2 conv + max-pool


class Lit(pl.LightningModule):
    """ResNet-18 trained with SGD (momentum 0.9, weight decay 5e-4), learning rate 0.05,
    cosine-annealed to 0 over ``epochs`` (``schedule="cosine"``, the usual ResNet recipe and
    that of the paper reproductions in ``experiments/common.py``) or held (``"constant"``)."""

    def __init__(self, lr: float = 0.05, epochs: int = 1, schedule: str = "cosine") -> None:
        super().__init__()
        self.net = _resnet18()
        self.lr = lr
        self.epochs = epochs
        self.schedule = schedule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        if self.schedule == "constant":
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.epochs))
        return {"optimizer": opt, "lr_scheduler": sched}


class StepTimer(Callback):
    """Wall time of every training step (forward, backward, optimizer), captures excluded."""

    def __init__(self) -> None:
        self.times: List[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)


def _rgb(ds: TensorDataset) -> TensorDataset:
    x, y = ds.tensors
    return TensorDataset(x.expand(-1, 3, -1, -1).contiguous(), y)


class CropFlip:
    """The usual CIFAR training recipe, ``RandomCrop(32, padding=4)`` then
    ``RandomHorizontalFlip()``, applied per sample as a DataLoader ``collate_fn``: each image
    padded by ``padding`` pixels of ``fill`` (the background: the standardised value of a blank
    pixel, as the recipe pads black before normalising), a random ``size`` x ``size`` window
    cut out, flipped left-right with probability 1/2. The draws come from a generator of its
    own seeded with ``seed``, so that two runs of a seed see the same augmented images
    whatever else draws random numbers (the callback, Lightning)."""

    def __init__(self, seed: int, fill: float, padding: int = 4) -> None:
        self.generator = torch.Generator().manual_seed(1_000_003 + int(seed))
        self.fill = float(fill)
        self.padding = int(padding)

    def __call__(self, samples):
        x = torch.stack([s[0] for s in samples])
        y = torch.stack([torch.as_tensor(s[1]) for s in samples])
        return self.augment(x), y

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.padding
        padded = nn.functional.pad(x, (p, p, p, p), value=self.fill)
        oy = torch.randint(0, 2 * p + 1, (n,), generator=self.generator)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=self.generator)
        flip = torch.rand(n, generator=self.generator) < 0.5
        rows = (oy[:, None] + torch.arange(h))[:, :, None]                     # (n, h, 1)
        cols = ox[:, None] + torch.arange(w)                                    # (n, w)
        cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]       # (n, 1, w)
        out = padded[torch.arange(n)[:, None, None], :, rows, cols]             # (n, h, w, C)
        return out.permute(0, 3, 1, 2).contiguous()


def _data(repeats: int, batch_size: int, n_probe: int, seed: int = 0, augment: bool = False):
    """(train loader, test set, probe): digits at 32x32, 3 channels; the training split
    repeated ``repeats`` times per epoch, repeat ``r`` offset by ``r * 1e-6`` so that its
    inputs differ bit for bit (a larger dataset to the frozen-output cache, which would
    otherwise serve a repeat within its first epoch; the images are the same to 1e-6); the
    data order fixed by ``seed``. ``augment``: each training batch through :class:`CropFlip`
    (the probe and the test set stay plain)."""
    train, test = load_digits_dataset(size=32)
    train, test = _rgb(train), _rgb(test)
    x, y = train.tensors
    data = TensorDataset(torch.cat([x + 1e-6 * r for r in range(repeats)]), y.repeat(repeats))
    collate = CropFlip(seed, fill=float(x.min())) if augment else None
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
                        collate_fn=collate)
    return loader, test, probe_set(train, min(n_probe, len(train)), seed=0)


def _accuracy(model: nn.Module, test: TensorDataset) -> float:
    x, y = test.tensors
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(b).argmax(1) for b in x.split(256)])
    return float((pred == y).float().mean())


_HOOKS = ("setup", "on_train_start", "on_train_batch_end", "on_train_epoch_end", "on_train_end")


def _time_hooks(cb: Callback) -> List[float]:
    """Accumulate the wall time spent in the callback's hooks (its whole cost, logging
    included), so that its share of a run is measured inside that run, not only by the
    difference of two runs on a shared machine; ``[wall s, process CPU s]``."""
    spent = [0.0, 0.0]
    for name in _HOOKS:
        original = getattr(cb, name)

        def wrapped(*a, _original=original, **k):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return _original(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t0
                spent[1] += time.process_time() - c0

        setattr(cb, name, wrapped)
    return spent


def _fit(args, repeats: int, seed: int, epochs: int, make_cb, root: str, tag: str,
         augment: bool = False) -> Dict[str, Any]:
    """One training run; ``make_cb(probe, run_dir)`` gives the SVCCA callback or None;
    ``augment``: random crop + flip on the training batches (:class:`CropFlip`)."""
    loader, test, probe = _data(repeats, args.batch_size, args.probe, seed, augment=augment)
    pl.seed_everything(seed, verbose=False)
    model = Lit(epochs=epochs, schedule=args.lr_schedule)
    cb = make_cb(probe, Path(root) / tag) if make_cb is not None else None
    spent = _time_hooks(cb) if cb is not None else [0.0, 0.0]
    trainer = pl.Trainer(
        default_root_dir=root, max_epochs=epochs, accelerator="cpu", devices=1,
        logger=TensorBoardLogger(root, name=tag), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[cb] if cb is not None else [],
    )
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(model, loader)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    total = trainer.global_step
    out: Dict[str, Any] = {"tag": tag, "seed": seed, "augment": augment, "wall_s": wall, "cpu_s": cpu,
                           "steps": total, "test_accuracy": _accuracy(model, test)}
    if cb is not None:
        events = cb.freeze_log
        out.update(backward_saved=backward_saved(events, total), callback_s=spent[0], callback_share=spent[0] / (wall - spent[0]),
                   callback_cpu_s=spent[1], callback_cpu_share=spent[1] / (cpu - spent[1]) if cpu > spent[1] else None,
                   captures=len(cb.captured_steps), captured_steps=list(cb.captured_steps),
                   frozen=[g for e in events for g in e["groups"]],
                   first_freeze_fraction=events[0]["step"] / total if events else None,
                   freeze_events=[{"step": e["step"], "groups": e["groups"]} for e in events],
                   tracker_overhead=cb.tracker.overhead, signal=[dict(e) for e in cb.tracker.signal_log],
                   frozen_cache=cb.tracker.frozen_cache_stats)
    print(f"  {tag:<28} seed {seed}: {wall:7.1f} s (CPU {cpu:7.1f} s), test accuracy {100 * out['test_accuracy']:.2f}%"
          + (f", callback {spent[0]:.1f} s ({100 * out['callback_share']:.1f}% of training), captures "
             f"{out['captures']}, frozen {len(out['frozen'])}" if cb is not None else ""), flush=True)
    return out


def _adaptive_at(**policy: Any):
    """Adaptive freeze training at another ``freeze_threshold`` or ``freeze_patience`` (the
    trade-off's other points)."""
    return lambda probe, d: SVCCACallback(probe, run_dir=d, freeze_training=True, progress=False, **policy)


def bench(args) -> Dict[str, Any]:
    defaults = lambda probe, d: SVCCACallback(probe, run_dir=d, progress=False)  # noqa: E731
    schedule = lambda probe, d: SVCCACallback(probe, run_dir=d, freeze_training="schedule", progress=False)  # noqa: E731
    adaptive = lambda probe, d: SVCCACallback(probe, run_dir=d, freeze_training=True, progress=False)  # noqa: E731
    cached = lambda probe, d: SVCCACallback(probe, run_dir=d, freeze_training=True, frozen_cache=True,  # noqa: E731
                                            progress=False)
    every4 = lambda probe, d: SVCCACallback(probe, run_dir=d, freeze_training=True, every_n_train_steps=4,  # noqa: E731
                                            max_overhead=None, final_analysis=False, progress=False)
    every_epoch = lambda probe, d: SVCCACallback(probe, run_dir=d, freeze_training=True, every_n_epochs=1,  # noqa: E731
                                                 max_overhead=None, final_analysis=False, progress=False)
    runs: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as root:
        # the larger epoch: overhead at defaults only
        if not args.freeze_only:
            for arm, make in (("none-large", None), ("defaults-large", defaults)):
                runs.append(dict(_fit(args, args.repeats, args.seeds[0], args.large_epochs, make, root, arm), arm=arm))
        for seed in args.seeds:  # arms interleaved within each seed
            arms = [("none", None), ("defaults", defaults), ("schedule", schedule), ("adaptive", adaptive)]
            if args.overhead_only:
                arms = arms[:2]
            elif args.freeze_only:
                arms = [arms[0]] + arms[2:]
            elif seed == args.seeds[0]:
                arms += [("adaptive-every-4-steps", every4), ("adaptive-every-epoch", every_epoch)]
            if not args.overhead_only:
                arms += [(f"adaptive-{t:g}", _adaptive_at(freeze_threshold=t)) for t in args.thresholds]
                arms += [(f"adaptive-patience-{k}", _adaptive_at(freeze_patience=k)) for k in args.patience]
                if args.cache_arm:
                    arms.append(("adaptive-cache", cached))
            plan = [(arm, make, False) for arm, make in arms]
            if args.augment:  # the recipe's arms right after the plain ones, so that load hits both alike
                plan += [(f"{arm}-aug", make, True) for arm, make in arms if arm in ("none", "adaptive")]
            for arm, make, augment in plan:
                runs.append(dict(_fit(args, args.epoch_repeats, seed, args.epochs, make, root, f"{arm}-s{seed}",
                                      augment=augment), arm=arm))
    return {"runs": runs}


def _base_arm(arm: str) -> str:
    """The no-callback arm an arm is measured against: the one with the same recipe."""
    return "none-aug" if arm.endswith("-aug") else "none"



def summarise(results: Dict[str, Any]) -> Dict[str, Any]:
    runs = results["runs"]
    by: Dict[str, List[Dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["arm"], []).append(r)
    out: Dict[str, Any] = {}
    if "defaults-large" in by:
        out["overhead_large"] = by["defaults-large"][0]["wall_s"] / by["none-large"][0]["wall_s"] - 1
        out["callback_share_large"] = by["defaults-large"][0]["callback_share"]
    if "defaults" in by:
        out["callback_share_digits"] = [r["callback_share"] for r in by["defaults"]]
        base_seed = by["none"][0]["seed"]
        out["overhead_digits"] = (next(r["wall_s"] for r in by["defaults"] if r["seed"] == base_seed)
                                  / by["none"][0]["wall_s"] - 1)
        out["overhead_digits_mean"] = statistics.mean(d["wall_s"] / n["wall_s"] - 1
                                                      for d, n in zip(by["defaults"], by["none"]))
    none_wall = statistics.mean(r["wall_s"] for r in by["none"])
    table = {}
    for arm in [a for a in ("none", "defaults", "schedule", "adaptive", "adaptive-no-cache") if a in by] + sorted(
            a for a in by if a.startswith("adaptive-") and (a[9:10].isdigit() or a.startswith("adaptive-patience-"))) \
            + [a for a in ("none-aug", "adaptive-aug") if a in by]:
        rs = by[arm]
        base = {r["seed"]: r for r in by[_base_arm(arm)]}
        pairs = [(r, base[r["seed"]]) for r in rs]
        accs = [r["test_accuracy"] for r in rs]
        table[arm] = {"wall_s": statistics.mean(r["wall_s"] for r in rs),
                      "wall_ratio": statistics.mean(r["wall_s"] / n["wall_s"] for r, n in pairs),
                      "cpu_s": statistics.mean(r["cpu_s"] for r in rs),
                      "cpu_ratio": statistics.mean(r["cpu_s"] / n["cpu_s"] for r, n in pairs),
                      "cpu_ratios": [r["cpu_s"] / n["cpu_s"] for r, n in pairs],
                      "accuracy": statistics.mean(accs), "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                      "accuracy_drop_points": 100 * statistics.mean(n["test_accuracy"] - r["test_accuracy"]
                                                                    for r, n in pairs),
                      "train_ratio": [(r["wall_s"] - r.get("callback_s", 0.0)) / n["wall_s"] for r, n in pairs],
                      "own_cpu_share": [r.get("callback_cpu_share") for r in rs],
                      "frozen": [len(r.get("frozen", [])) for r in rs],
                      "backward_saved": [r.get("backward_saved", 0.0) for r in rs],
                      "first_freeze_fraction": [r.get("first_freeze_fraction") for r in rs],
                      "cache_served": [(r.get("frozen_cache") or {}).get("served") for r in rs]}
    out["arms"] = table
    out["none_wall_s"] = none_wall
    if "none-aug" in by:
        out["augmentation"] = {arm: {"plain": table.get(arm), "augmented": table.get(f"{arm}-aug")}
                               for arm in ("none", "adaptive") if f"{arm}-aug" in table}
    out["signal_seed0"] = by["adaptive"][0].get("signal", []) if "adaptive" in by else []
    out["signal_seed0_aug"] = by["adaptive-aug"][0].get("signal", []) if "adaptive-aug" in by else []
    out["frequency"] = {arm: {"frozen": by[arm][0]["frozen"], "first_freeze_fraction": by[arm][0]["first_freeze_fraction"],
                              "captures": by[arm][0]["captures"]}
                        for arm in ("adaptive-every-4-steps", "adaptive-every-epoch") if arm in by}
    return out

def ddp_worker(args) -> None:
    """One 2-process run (Lightning re-launches this same command for rank 1)."""
    from pytorch_lightning.strategies import DDPStrategy

    torch.set_num_threads(1)
    loader, _, _ = _data(1, args.batch_size, 16)
    timer = StepTimer()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        default_root_dir=args.out, max_steps=args.ddp_steps, accelerator="cpu", devices=2,
        strategy=DDPStrategy(find_unused_parameters=bool(args.find_unused)), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    trainer.fit(Lit(), loader)
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
                   "--worker-result", str(res), "--out", root,
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

    loader, _, _ = _data(1, args.batch_size, 16)
    with tempfile.TemporaryDirectory() as root:
        dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            base = Lit().net
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
    parser.add_argument("--epochs", type=int, default=15, help="epochs of the 1,347-image digits epoch (default 15)")
    parser.add_argument("--large-epochs", type=int, default=4,
                        help="epochs of the larger epoch (the digits split repeated --repeats times; default 4)")
    parser.add_argument("--repeats", type=int, default=4, help="the larger epoch: training split x this (default 4: 5,388)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                        help="learning rate 0.05, cosine-annealed over the run (default) or constant")
    parser.add_argument("--probe", type=int, default=1024, help="probe images (default 1024)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--sections", default="main",
                        help="comma-separated: main (overhead, freeze, frequency), ddp (cost of DDP "
                             "find_unused_parameters, in one process), ddp2 (2 Lightning DDP processes); default main")
    parser.add_argument("--ddp-steps", type=int, default=40, help="steps per DDP timing (default 40)")
    parser.add_argument("--rounds", type=int, default=1, help="ddp2: interleaved repetitions (default 1)")
    parser.add_argument("--epoch-repeats", type=int, default=1,
                        help="the main arms' epoch: the digits training split x this (default 1: 1,347 images)")
    parser.add_argument("--freeze-only", action="store_true",
                        help="only no callback, schedule and adaptive (no overhead or frequency sections)")
    parser.add_argument("--overhead-only", action="store_true",
                        help="only the overhead arms (no callback, callback at defaults); no freeze sections")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[],
                        help="extra adaptive arms at these freeze_threshold values (default: none; the default "
                        "arm uses the default, 0.5), e.g. --thresholds 0.6 0.9 for the speed/accuracy trade-off")
    parser.add_argument("--patience", type=int, nargs="*", default=[],
                        help="extra adaptive arms at these freeze_patience values (default: none; the default arm "
                        "uses the default, 1), e.g. --patience 2 for the previous default")
    parser.add_argument("--cache-arm", action="store_true",
                        help="also run the adaptive arm with frozen_cache=True (what the opt-in frozen-output cache "
                        "saves)")
    parser.add_argument("--augment", action="store_true",
                        help="also run the no-callback and adaptive arms under random augmentation "
                        "(RandomCrop(32, padding=4) + RandomHorizontalFlip, the usual CIFAR recipe), interleaved "
                        "with the plain arms in each seed: wall ratio, CPU time ratio and accuracy side by side")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, 1 seed, 256-image probe")
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
        args.epochs, args.large_epochs, args.repeats, args.seeds, args.probe, args.ddp_steps = 2, 1, 2, [0, 1], 256, 8
    results: Dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if not k.startswith(("ddp_w", "worker", "find"))},
                               "torch": torch.__version__, "lightning": pl.__version__}
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"main", "ddp", "ddp2"}
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from main, ddp, ddp2")
    if "main" in sections:
        print(f"resnet18 (ImageNet stem) on 32x32x3 digits, batch {args.batch_size}, SGD lr 0.05 "
              f"({args.lr_schedule}), probe {args.probe}, "
              f"{args.threads} thread(s), TensorBoardLogger; arms interleaved per seed", flush=True)
        results.update(bench(args))
        s = results["summary"] = summarise(results)
        n_small = len(load_digits_dataset()[0])
        n_epoch = args.epoch_repeats * n_small
        if "callback_share_digits" in s:
            print("\n1. callback at defaults (no freezing): time in its hooks / the rest of the run (same run), and "
                  "wall time vs the run without it (same seed; noisy on a shared machine):")
            print(f"   {n_epoch:,}-image epoch x {args.epochs}: own time "
                  + ", ".join(f"{100 * v:.1f}%" for v in s["callback_share_digits"])
                  + f" (seeds); wall {100 * s['overhead_digits']:+.1f}% (seed {args.seeds[0]}), "
                  f"{100 * s['overhead_digits_mean']:+.1f}% (mean over seeds)")
        if "callback_share_large" in s:
            print(f"   {args.repeats * n_small:,}-image epoch x {args.large_epochs}: own time "
                  f"{100 * s['callback_share_large']:.1f}%; wall {100 * s['overhead_large']:+.1f}%")
        print(f"\n2. freeze training end to end ({n_epoch:,}-image epoch x {args.epochs}, {len(args.seeds)} seeds; "
              "'train x none': wall minus the callback's own time, per seed; '-aug' arms against none-aug; "
              "CPU: process CPU time, all threads):")
        print(f"   {'arm':<19} {'wall (s)':>9} {'x none':>7} {'CPU (s)':>8} {'x none':>7} {'train x none':>20} "
              f"{'test acc (%)':>14} {'drop (pts)':>11} "
              f"{'groups frozen':>14} {'first freeze at':>16} {'backward FLOPs saved':>22}")
        for arm, r in s["arms"].items():
            ff = [f for f in r["first_freeze_fraction"] if f is not None]
            print(f"   {arm:<19} {r['wall_s']:>9.1f} {r['wall_ratio']:>7.2f} {r['cpu_s']:>8.1f} {r['cpu_ratio']:>7.2f} "
                  f"{', '.join(f'{v:.2f}' for v in r['train_ratio']):>20} "
                  f"{100 * r['accuracy']:>8.2f} ± {100 * r['accuracy_std']:.2f} {r['accuracy_drop_points']:>11.2f} "
                  f"{str(r['frozen']):>14} {(', '.join(f'{100 * f:.0f}%' for f in ff) or '-'):>16} "
                  f"{', '.join(f'{100 * v:.0f}%' for v in r['backward_saved']):>22}")
        served = {arm: r["cache_served"] for arm, r in s["arms"].items() if any(v for v in r["cache_served"])}
        if served:
            print("   frozen-output cache, training samples whose frozen forward was skipped: "
                  + "; ".join(f"{arm} {v}" for arm, v in served.items()))
        print(f"\n   adaptive signal, seed {args.seeds[0]} (SVCCA similarity to one epoch earlier, per judged group):")
        for e in s["signal_seed0"]:
            print(f"   step {e['step']:>4}: " + ", ".join(f"{g} {v:.3f}" for g, v in e.items() if g != "step"))
        if s["frequency"]:
            print("\n3. adaptive freeze decisions vs capture frequency (seed %d, max_overhead=None):" % args.seeds[0])
        for arm, r in s["frequency"].items():
            ff = r["first_freeze_fraction"]
            print(f"   {arm:<24} captures {r['captures']:>4}, frozen {len(r['frozen'])} {r['frozen']}, "
                  f"first freeze at {'-' if ff is None else f'{100 * ff:.0f}%'} of training")
        if s.get("augmentation"):
            print("\n4. random augmentation (RandomCrop(32, padding=4) + RandomHorizontalFlip, per sample), side by "
                  "side in this run; ratios against the no-callback arm of the same recipe, mean of the seeds:")
            print(f"   {'arm':<10} {'recipe':<10} {'wall (s)':>9} {'wall x none':>12} {'CPU (s)':>8} {'CPU x none':>11} "
                  f"{'test acc (%)':>14} {'groups frozen':>14} {'backward saved':>15}")
            for arm, sides in s["augmentation"].items():
                for recipe, r in (("plain", sides["plain"]), ("crop+flip", sides["augmented"])):
                    if r is None:
                        continue
                    print(f"   {arm:<10} {recipe:<10} {r['wall_s']:>9.1f} {r['wall_ratio']:>12.2f} {r['cpu_s']:>8.1f} "
                          f"{r['cpu_ratio']:>11.2f} {100 * r['accuracy']:>8.2f} ± {100 * r['accuracy_std']:.2f} "
                          f"{str(r['frozen']):>14} {', '.join(f'{100 * v:.0f}%' for v in r['backward_saved']):>15}")
            print(f"   adaptive signal under crop+flip, seed {args.seeds[0]}:")
            for e in s["signal_seed0_aug"]:
                print(f"   step {e['step']:>4}: " + ", ".join(f"{g} {v:.3f}" for g, v in e.items() if g != "step"))
    if "ddp" in sections:
        results["ddp"] = d = bench_ddp(args)
        print(f"\nDDP wrapper, alternated steps in one process: {1000 * d['step_s_find_unused_false']:.1f} ms "
              f"(find_unused_parameters=False) vs {1000 * d['step_s_find_unused_true']:.1f} ms: {100 * d['cost']:+.1f}%")
    if "ddp2" in sections:
        results["ddp_2proc"] = d = bench_ddp_2proc(args)
        print(f"\nLightning DDP, 2 CPU processes: {1000 * d['step_s_find_unused_false']:.1f} ms vs "
              f"{1000 * d['step_s_find_unused_true']:.1f} ms: {100 * d['cost']:+.1f}%")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_callback.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out / 'bench_callback.json'}")


if __name__ == "__main__":
    main()
