"""What SVCCA logs to TensorBoard, from a plain PyTorch training loop (no Lightning).

Trains the digits ConvNet with SGD; a :class:`~svcca_torch.tracker.DynamicsTracker` captures
its layers on a fixed probe set a few times per epoch and freezes converged layer groups
bottom-up (adaptive policy, the engine's signal); one :class:`svcca_torch.views.TrainingViews`
logs everything to TensorBoard and the run folder's PNGs: live views at each capture, the
freeze state from step 0, the paper's views at the end. Then prints the command that opens
the logs.

    python -m svcca_torch.experiments.tensorboard_views                 # ~1 minute on one CPU thread
    python -m svcca_torch.experiments.tensorboard_views --epochs 4 --captures-per-epoch 10
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from svcca_torch.data import load_digits_dataset, probe_set
from svcca_torch.experiments.common import DefaultsHelpFormatter, doc_examples, module_prog
from svcca_torch.models import ConvNet
from svcca_torch.tracker import DynamicsTracker
from svcca_torch.views import PNGSink, TensorBoardSink, TrainingViews


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=module_prog(__file__), usage="%(prog)s [options]",
                                description=__doc__.split("\n\n")[0], epilog=doc_examples(__doc__),
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=6, help="training epochs")
    p.add_argument("--captures-per-epoch", type=int, default=4, help="SVCCA captures per epoch")
    p.add_argument("--probe-size", type=int, default=500, help="probe images")
    p.add_argument("--freeze", choices=("none", "adaptive"), default="adaptive", help="freeze training policy")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and probe set")
    p.add_argument("--out", default="runs", help="parent folder of the run folder")
    p.add_argument("--name", default="svcca", help="first component of the TensorBoard tags")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--smoke", action="store_true", help="tiny budget (seconds): 1 epoch, 3 captures, 100 probe images")
    return p


def run(args: argparse.Namespace, log=print) -> Dict[str, Any]:
    """Train, log, and return ``{"run_dir", "logdir", "captures", "frozen", "images"}``."""
    if args.smoke:
        args.epochs, args.captures_per_epoch, args.probe_size = 1, 3, 100
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, _ = load_digits_dataset(seed=args.seed)
    probe = probe_set(train, min(args.probe_size, len(train)), seed=args.seed)
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    model = ConvNet(in_channels=1, num_classes=10, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    total = args.epochs * len(loader)
    every = max(1, len(loader) // args.captures_per_epoch)
    run_dir = Path(args.out) / "tensorboard_views" / datetime.now().strftime("digits-convnet-%Y%m%d-%H%M%S")
    logdir = run_dir / "tensorboard"
    # the engine: captures every `every` steps, the adaptive freeze signal on the same grid
    tracker = DynamicsTracker(model, probe, model.layer_names, run_dir=run_dir, total_steps=total, every_n_steps=every,
                              max_overhead=None, freeze="adaptive" if args.freeze == "adaptive" else False,
                              freeze_window=every, figures=False, progress=False)
    writer = SummaryWriter(str(logdir))
    # the views: TensorBoard and the run folder's PNGs, drawn once
    views = TrainingViews.for_tracker(tracker, [TensorBoardSink(writer), PNGSink(run_dir, to_previous=True)],
                                      args.name)
    t0 = time.perf_counter()
    views.log(tracker.start())
    step = 0
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            step += 1
            writer.add_scalar("train/loss", loss.item(), step)
            events = tracker.maybe_capture(step, epoch=epoch)
            if events.freeze is not None:
                saved = events.freeze["backward_flops_saved"] or 0.0
                log(f"step {step}: froze {', '.join(events.freeze['groups'])} ({100 * saved:.0f}% of backward "
                    "FLOPs saved)")
            views.log(events)
    views.log_final(tracker.finish(step))
    views.close()
    writer.close()
    frozen = list(tracker.policy.frozen) if tracker.policy is not None else []
    log(f"{len(tracker.captured_steps)} captures, {len(frozen)} groups frozen, {time.perf_counter() - t0:.0f} s")
    log(f"open the logs with:  {sys.executable} -m tensorboard.main --logdir {logdir}")
    return {"run_dir": str(run_dir), "logdir": str(logdir), "captures": len(tracker.captured_steps),
            "frozen": frozen, "images": views.images_written}


def main(argv: Optional[List[str]] = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
