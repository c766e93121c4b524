"""Cost of capturing a ResNet-18-style network on a probe set, and of one checkpoint's
layers x layers SVCCA matrix, against the naive ways of doing the same.

Network: :func:`svcca_torch.models.resnet18_cifar` (ResNet-18 widths, 11M parameters) on
``--probe`` random 32x32 RGB images (default 1,024); the recorded layers are its defaults:
the stem, the 8 residual blocks and ``fc`` (10 layers). The weights are untrained: the
costs depend on shapes, not on what the network has learned.

Each capture phase runs in a fresh process so that its peak RSS is its own:

- ``forward``: the probe through the network, eval + no_grad, nothing kept (the floor);
- ``recorder``: :class:`ActivationRecorder.record` (conv maps pooled per batch to the
  common grid, ``--grid``, then folded: ``probe * grid^2`` datapoints);
- ``naive hooks``: forward hooks that keep every full-resolution output of the same layers
  (what a hand-written capture holds before any reduction).

Then, in one process: :meth:`RepresentationStore.add` (SVD-reduce every layer and write
it), the bytes stored per checkpoint, and one checkpoint's layers x layers matrix from the
stored bases (:func:`learning_dynamics`, one basis per layer) against ``svcca`` called on
the raw activations for every pair (each layer reduced again for every pair).

    python experiments/bench_capture.py              # ~1-2 minutes on one CPU thread
    python experiments/bench_capture.py --probe 256 --no-pairwise
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import tempfile
import time
from typing import Dict, Tuple

import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _setup(args: Dict) -> Tuple[torch.nn.Module, torch.Tensor]:
    torch.set_num_threads(args["threads"])
    from svcca_torch.models import resnet18_cifar

    torch.manual_seed(0)
    net = resnet18_cifar().eval()
    probe = torch.randn(args["probe"], 3, 32, 32)
    return net, probe


def _phase(name: str, args: Dict, queue) -> None:
    from svcca_torch.recorder import ActivationRecorder, select_layers

    net, probe = _setup(args)
    with torch.no_grad():  # warm-up: allocator and kernels, not counted
        net(probe[:8])
    before = _rss_mb()
    t0 = time.perf_counter()
    kept = 0
    if name == "forward":
        with torch.no_grad():
            for batch in probe.split(args["batch_size"]):
                net(batch)
    elif name == "recorder":
        out = ActivationRecorder(net, grid=args["grid"], batch_size=args["batch_size"]).record(probe)
        kept = sum(v.numel() * 4 for v in out.values())
    elif name == "naive hooks":
        layers = select_layers(net)
        modules = dict(net.named_modules())
        store = {n: [] for n in layers}
        handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: store[n].append(o.detach().clone()))
                   for n in layers]
        with torch.no_grad():
            for batch in probe.split(args["batch_size"]):
                net(batch)
        for h in handles:
            h.remove()
        out = {n: torch.cat(v) for n, v in store.items()}
        store.clear()
        kept = sum(v.numel() * 4 for v in out.values())
    seconds = time.perf_counter() - t0
    queue.put((name, seconds, before, _peak_mb(), kept))


def _matrix_phase(args: Dict, queue) -> None:
    from svcca_torch.dynamics import learning_dynamics
    from svcca_torch.functional.svcca import svcca
    from svcca_torch.recorder import ActivationRecorder
    from svcca_torch.store import RepresentationStore

    net, probe = _setup(args)
    acts = ActivationRecorder(net, grid=args["grid"], batch_size=args["batch_size"]).record(probe)
    res = {"layers": len(acts), "datapoints": next(iter(acts.values())).shape[0]}
    with tempfile.TemporaryDirectory() as folder:
        store = RepresentationStore(folder, keep=args["keep"], max_directions=args["max_directions"])
        t0 = time.perf_counter()
        ck = store.add(acts, step=0, fraction=1.0)
        res["add_s"] = time.perf_counter() - t0
        res["bytes"] = ck.nbytes
        res["sum_k"] = sum(store.load(ck, n).k for n in ck.layers)
        res["raw_bytes"] = sum(v.numel() * 4 for v in acts.values())
        t0 = time.perf_counter()
        dyn = learning_dynamics(store, [ck])
        res["matrix_s"] = time.perf_counter() - t0
        if args["pairwise"]:
            names = list(acts)
            t0 = time.perf_counter()
            ref = torch.tensor([[svcca(acts[a], acts[b], keep=args["keep"]).mean for b in names] for a in names],
                               dtype=torch.float64)
            res["pairwise_s"] = time.perf_counter() - t0
            # the stored bases are float32, the raw route float32 Grams: agreement ~1e-4
            res["max_diff"] = float((ref - dyn.matrices[0]).abs().max()) if args["max_directions"] is None else None
    queue.put(res)


def _run(target, *a):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*a, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", type=int, default=1024, help="probe images, 32x32 RGB (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="probe batch size (default: %(default)s)")
    parser.add_argument("--grid", type=int, default=2, help="recorder's common conv grid side (default: %(default)s)")
    parser.add_argument("--keep", type=float, default=0.99, help="SVD keep fraction (default: %(default)s)")
    parser.add_argument("--max-directions", type=int, default=None, help="cap on stored directions per layer")
    parser.add_argument("--no-pairwise", dest="pairwise", action="store_false",
                        help="skip the pair-by-pair svcca baseline of the matrix")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = vars(parser.parse_args())

    print(f"ResNet-18 (resnet18_cifar) on {args['probe']} 32x32 images, batch {args['batch_size']}, "
          f"{args['threads']} torch thread(s), grid {args['grid']}")
    print(f"{'capture':<13}{'time s':>9}{'RSS before MB':>15}{'peak RSS MB':>13}{'peak - before':>15}{'kept MB':>10}")
    for phase in ("forward", "recorder", "naive hooks"):
        name, seconds, before, peak, kept = _run(_phase, phase, args)
        print(f"{name:<13}{seconds:>9.2f}{before:>15.0f}{peak:>13.0f}{peak - before:>15.0f}{kept / 2**20:>10.1f}")
    res = _run(_matrix_phase, args)
    print(f"\none checkpoint: {res['layers']} layers x {res['datapoints']} datapoints, sum k = {res['sum_k']}")
    print(f"  store.add (SVD-reduce + atomic write): {res['add_s']:.2f} s")
    print(f"  bytes stored per checkpoint: {res['bytes'] / 2**20:.2f} MiB "
          f"(n * sum_k * 4 = {res['datapoints'] * res['sum_k'] * 4 / 2**20:.2f} MiB; "
          f"recorded activations {res['raw_bytes'] / 2**20:.2f} MiB)")
    print(f"  layers x layers matrix from stored bases: {res['matrix_s']:.3f} s")
    if "pairwise_s" in res:
        diff = "" if res["max_diff"] is None else f", max |difference| {res['max_diff']:.1e}"
        print(f"  baseline, svcca() on raw activations per pair: {res['pairwise_s']:.2f} s "
              f"({res['pairwise_s'] / res['matrix_s']:.0f}x slower{diff})")


if __name__ == "__main__":
    main()
