"""What one training step costs with the lowest groups frozen, with and without the
frozen-output cache (issue 10).

Torchvision ``resnet18(num_classes=10)`` (ImageNet stem) on scikit-learn digits upsampled to
32x32x3, batch 64, SGD momentum 0.9, one torch thread. Arms, steps interleaved (one step of
each arm in turn, in rotating order, so that machine load hits all alike):

- ``trainable``: nothing frozen;
- ``frozen``: the lowest ``--frozen`` of the 10 layer groups frozen (``freeze_group``);
- ``frozen+cache``: the same, with :class:`svcca_torch.frozen_prefix.FrozenPrefix`'s training
  cache serving the frozen prefix's output (its kept outputs filled and checked by two passes over the
  batches before timing).

Prints the median time of the forward, backward and optimizer step of each arm and their
ratios to ``trainable``.

    python -m svcca_torch.experiments.bench_frozen_step                 # 7 of 10 groups frozen, 30 steps
    python -m svcca_torch.experiments.bench_frozen_step --frozen 4 --steps 50
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Dict, List, Optional

import torch
from torch import nn


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frozen", type=int, default=7, help="lowest groups frozen, of 10 (default 7: the most allowed)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per arm (default 30)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torchvision

    from svcca_torch.frozen_prefix import FrozenPrefix, outermost
    from svcca_torch.settings import CACHE_BYTES
    from svcca_torch.data import load_digits_dataset
    from svcca_torch.freeze import default_layer_groups, freeze_group

    torch.set_num_threads(args.threads)
    train, _ = load_digits_dataset(size=32)
    x, y = train.tensors
    x = x.expand(-1, 3, -1, -1).contiguous()
    batches = list(zip(x.split(args.batch_size), y.split(args.batch_size)))[:-1]  # full batches only

    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    models: Dict[str, nn.Module] = {arm: copy.deepcopy(base) for arm in ("trainable", "frozen", "frozen+cache")}
    caches = {}
    for arm in ("frozen", "frozen+cache"):
        model = models[arm]
        groups = default_layer_groups(model, example_input=x[:2])
        for g in groups[: args.frozen]:
            freeze_group(g)
        if arm == "frozen+cache":
            frozen = outermost({n: m for g in groups[: args.frozen] for n, m in zip(g.module_names, g.modules)})
            cache = caches[arm] = FrozenPrefix(model, CACHE_BYTES)
            cache.update(frozen, x[: FrozenPrefix.CHECK_IMAGES])
            print(f"{args.frozen} of {len(groups)} groups frozen: {', '.join(g.name for g in groups[:args.frozen])}; "
                  f"boundary {cache.stats().cache.boundary}")
    opts = {arm: torch.optim.SGD([q for q in m.parameters() if q.requires_grad], lr=0.01, momentum=0.9)
            for arm, m in models.items()}

    def step(arm: str, xb: torch.Tensor, yb: torch.Tensor) -> List[float]:
        model, opt = models[arm], opts[arm]
        model.train()
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(xb), yb)
        t1 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        return [t1 - t0, t2 - t1, t3 - t2]

    for _ in range(2):  # the cache keeps every batch's output, then checks its first serve against a real one
        for xb, yb in batches:
            step("frozen+cache", xb, yb)
    served_before = caches["frozen+cache"].stats().cache.served
    times: Dict[str, List[List[float]]] = {arm: [] for arm in models}
    arms = list(models)
    for i in range(args.steps):
        xb, yb = batches[i % len(batches)]
        for arm in arms[i % 3:] + arms[: i % 3]:
            times[arm].append(step(arm, xb, yb))
    assert caches["frozen+cache"].stats().cache.served - served_before == args.steps * args.batch_size, \
        "every timed step served"

    med = {arm: [statistics.median(t[j] for t in ts) for j in range(3)] for arm, ts in times.items()}
    base_t = med["trainable"]
    print(f"resnet18 (ImageNet stem), 32x32x3 digits, batch {args.batch_size}, {args.threads} thread(s), "
          f"median of {args.steps} interleaved steps (ms; x trainable)")
    print(f"{'arm':<14} {'forward':>16} {'backward':>16} {'optimizer':>16} {'step':>16}")
    for arm, m in med.items():
        cells = [f"{1000 * v:7.1f} ({v / b:4.2f}x)" for v, b in zip(m + [sum(m)], base_t + [sum(base_t)])]
        print(f"{arm:<14} " + " ".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
