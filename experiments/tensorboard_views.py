"""What SVCCA logs to TensorBoard, from a plain PyTorch training loop (no Lightning).

Trains the digits ConvNet with SGD, captures its layers on a fixed probe set
(:class:`~svcca_torch.ActivationRecorder` into a :class:`~svcca_torch.RepresentationStore`)
a few times per epoch, freezes converged layer groups bottom-up (adaptive policy), and logs
everything through :class:`svcca_torch.board.BoardLogger`: live views at each capture, the
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

from svcca_torch import ActivationRecorder
from svcca_torch.board import BoardLogger
from svcca_torch.data import load_digits_dataset, probe_set
from svcca_torch.experiments.common import DefaultsHelpFormatter, doc_examples, module_prog
from svcca_torch.dynamics import learning_dynamics, paired_similarity
from svcca_torch.freeze import backward_flops, default_layer_groups, freeze_group, make_freeze_policy
from svcca_torch.functional.svcca import svd_reduce
from svcca_torch.models import ConvNet
from svcca_torch.store import RepresentationStore


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
    """Train, log, and return ``{"run_dir", "logdir", "captures", "frozen"}``."""
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
    rec = ActivationRecorder(model, model.layer_names)
    store = RepresentationStore(run_dir / "store")
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    board = BoardLogger(writer, args.name, rec.layers, total_steps=total)
    groups = default_layer_groups(model, rec.layers)
    policy = make_freeze_policy(args.freeze, [g.name for g in groups]) if args.freeze != "none" else None
    example = probe[:2]
    base_flops = backward_flops(model, example)
    prev: Optional[Dict[str, Any]] = None
    frozen: List[str] = []

    def capture(step: int, final: bool = False) -> None:
        nonlocal prev
        model.eval()
        bases = {n: svd_reduce(a, 0.99) for n, a in rec.record(probe).items()}
        model.train()
        store.add(bases, step=step, fraction=step / total)
        sims = paired_similarity(prev, bases) if prev is not None else {}
        board.log_capture(step, sims, previous=prev, current=bases, final=final)
        newly: List[str] = []
        if policy is not None:
            by_name = {g.name: g for g in groups}
            if sims:
                # default groups are named after their recorded layer
                policy.update(step, {g.name: sims[g.name] for g in groups if g.name in sims})
            newly = [n for n in policy.frozen if n not in frozen and by_name[n].parameters()]
            for n in newly:
                freeze_group(by_name[n])
                frozen.append(n)
            saved = 1.0 - backward_flops(model, example) / base_flops
            board.log_freeze(step, len(frozen), backward_flops_saved=saved, newly_frozen=newly, n_groups=len(groups))
            if newly:
                log(f"step {step}: froze {', '.join(newly)} ({100 * saved:.0f}% of backward FLOPs saved)")
        prev = bases

    t0 = time.perf_counter()
    step = 0
    capture(0)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            step += 1
            writer.add_scalar("train/loss", loss.item(), step)
            if step % every == 0 and step < total:
                capture(step)
    capture(step, final=True)
    board.log_final(learning_dynamics(store))
    writer.close()
    log(f"{len(store)} captures, {len(frozen)} groups frozen, {time.perf_counter() - t0:.0f} s")
    logdir = run_dir / "tensorboard"
    log(f"open the logs with:  {sys.executable} -m tensorboard.main --logdir {logdir}")
    return {"run_dir": str(run_dir), "logdir": str(logdir), "captures": len(store), "frozen": list(frozen),
            "images": board.images_written}


def main(argv: Optional[List[str]] = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
