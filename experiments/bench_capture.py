"""Cost of capturing a ResNet-18 on a probe set: a full capture, a capture of the lowest
quarter of the layers (the forward stops after them), and a plain forward of the probe;
then memory against naive hooks, and the cost of storing and comparing one checkpoint.

Network (``--model``): ``tv-resnet18``, torchvision's ``resnet18(num_classes=10)`` with its
ImageNet stem (7x7 stride-2 conv + max-pool) on 32x32 inputs (the deepest maps are 1x1), or
``resnet18_cifar`` (:func:`svcca_torch.models.resnet18_cifar`, 3x3 stem, maps 32x32 down to
4x4; about 30x the compute). ``--probe`` random 32x32 RGB images (default 1,024); the
recorded layers are the recorder's defaults (stem conv, the 8 residual blocks, ``fc``). The
weights are untrained: the costs depend on shapes, not on what the network has learned.

1. Capture cost, one process, arms interleaved ``--repeats`` times (median):
   ``forward`` (the probe through the network, eval + no_grad, nothing kept: the floor),
   ``full capture`` (:meth:`ActivationRecorder.record`, common rows), ``lowest quarter``
   (``record(probe, layers=lowest quarter)``: the forward stops after its last layer),
   ``per-layer rows`` (``rows="per_layer"``) and ``record_both`` (both row modes, one pass).
   With ``--device cuda``: on the GPU, with the peak device memory of each arm above what
   was allocated before it (model and probe).
2. (CPU) Memory, each phase in a fresh process so that its peak RSS is its own: the
   forward, the recorder, and ``naive hooks`` that keep every full-resolution output.
3. (CPU) One checkpoint: :meth:`RepresentationStore.add` (SVD-reduce every layer and write
   it), the bytes stored, and the layers x layers matrix from the stored bases against
   ``svcca`` on the raw activations for every pair.

    python -m svcca_torch.experiments.bench_capture                    # ~1 minute on one CPU thread
    python -m svcca_torch.experiments.bench_capture --model resnet18_cifar --probe 256
    python -m svcca_torch.experiments.bench_capture --device cuda --probe 4096
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


def make_model(name: str) -> torch.nn.Module:
    """``tv-resnet18`` (torchvision, ImageNet stem) or ``resnet18_cifar``, 10 classes, eval mode."""
    if name == "tv-resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=10).eval()
    from svcca_torch.models import resnet18_cifar

    return resnet18_cifar().eval()


def _setup(args: Dict) -> Tuple[torch.nn.Module, torch.Tensor]:
    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    net = make_model(args["model"])
    probe = torch.randn(args["probe"], 3, 32, 32)
    return net, probe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture_cost(args: Dict) -> Dict[str, Dict[str, float]]:
    """Seconds (median over interleaved repeats) and, on CUDA, peak device MiB per arm."""
    from svcca_torch.recorder import ActivationRecorder, direction_limits

    net, probe = _setup(args)
    device = torch.device(args["device"])
    net.to(device)
    probe = probe.to(device)
    rec = ActivationRecorder(net, grid=args["grid"], batch_size=args["batch_size"])
    rec.order_layers(probe)
    quarter = rec.layers[: max(1, len(rec.layers) // 4)]

    def forward() -> None:
        with torch.no_grad():
            for batch in probe.split(args["batch_size"]):
                net(batch)

    arms = {
        "forward": forward,
        "full capture": lambda: rec.record(probe),
        "lowest quarter": lambda: rec.record(probe, layers=quarter),
        "per-layer rows": lambda: rec.record(probe, rows="per_layer"),
        "record_both": lambda: rec.record_both(probe),
    }
    with torch.no_grad():  # warm-up: allocator, kernels, cuDNN choice; not counted
        net(probe[: min(8, len(probe))])
    for fn in arms.values():
        fn()
    times: Dict[str, list] = {a: [] for a in arms}
    peaks: Dict[str, float] = {}
    for _ in range(args["repeats"]):
        for arm, fn in arms.items():
            if device.type == "cuda":
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            result = fn()
            _sync(device)
            times[arm].append(time.perf_counter() - t0)
            del result
            if device.type == "cuda":
                peaks[arm] = max(peaks.get(arm, 0.0), (torch.cuda.max_memory_allocated(device) - base) / 2**20)
    out = {a: {"s": sorted(t)[len(t) // 2]} for a, t in times.items()}
    for a, p in peaks.items():
        out[a]["peak_mib"] = p
    common, per_layer = rec.record_both(probe)
    out["_layers"] = {"all": rec.layers, "quarter": quarter,  # type: ignore[assignment]
                      "common": {n: t.shape[0] for n, t in common.items()},
                      "per_layer": {n: t.shape[0] for n, t in per_layer.items()},
                      "limits": direction_limits(per_layer), "neurons": {n: t.shape[1] for n, t in common.items()}}
    return out


def _phase(name: str, args: Dict, queue) -> None:
    from svcca_torch.recorder import ActivationRecorder

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
        layers = ActivationRecorder(net).layers
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

    import warnings

    from svcca_torch.utils.validation import FewDatapointsWarning

    warnings.simplefilter("ignore", FewDatapointsWarning)  # 1x1 deep maps: said once in main()
    net, probe = _setup(args)
    acts = ActivationRecorder(net, grid=args["grid"], batch_size=args["batch_size"]).record(probe)
    res = {"layers": len(acts), "datapoints": next(iter(acts.values())).shape[0]}
    with tempfile.TemporaryDirectory() as folder:
        # float32 bases: the capture is measured against its raw size (int12 is bench_analysis.py's)
        store = RepresentationStore(folder, keep=args["keep"], max_directions=args["max_directions"],
                                    encoding="float32")
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
    parser.add_argument("--model", choices=("tv-resnet18", "resnet18_cifar"), default="tv-resnet18",
                        help="network (default: %(default)s)")
    parser.add_argument("--probe", type=int, default=1024, help="probe images, 32x32 RGB (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="probe batch size (default: %(default)s)")
    parser.add_argument("--grid", type=int, default=2, help="recorder's conv grid side (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved repeats of the cost arms (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the capture-cost arms run")
    parser.add_argument("--keep", type=float, default=0.99, help="SVD keep fraction (default: %(default)s)")
    parser.add_argument("--max-directions", type=int, default=None, help="cap on stored directions per layer")
    parser.add_argument("--no-pairwise", dest="pairwise", action="store_false",
                        help="skip the pair-by-pair svcca baseline of the matrix")
    parser.add_argument("--cost-only", action="store_true", help="only the capture-cost arms (part 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = vars(parser.parse_args())
    if args["device"].startswith("cuda") and not torch.cuda.is_available():
        parser.exit(2, "--device cuda: no CUDA device here; run it on a machine with a GPU.\n")

    torch.set_num_threads(args["threads"])
    dev = torch.cuda.get_device_name(args["device"]) if args["device"].startswith("cuda") else "CPU"
    print(f"{args['model']} on {args['probe']} 32x32 images, batch {args['batch_size']}, grid {args['grid']}, "
          f"{dev}, {args['threads']} torch thread(s), median of {args['repeats']} interleaved repeats")
    cost = capture_cost(args)
    layers = cost.pop("_layers")
    print(f"recorded layers: {', '.join(layers['all'])}; lowest quarter: {', '.join(layers['quarter'])}")
    print("datapoints per layer (neurons; most directions at 5 datapoints each, per-layer rows):")
    print("  common rows:    " + ", ".join(f"{n} {k}" for n, k in layers["common"].items()))
    print("  per-layer rows: " + ", ".join(f"{n} {k} ({layers['neurons'][n]}; {layers['limits'][n]})"
                                       for n, k in layers["per_layer"].items()))
    floor = cost["forward"]["s"]
    peak_col = f"{'peak device MiB':>17}" if args["device"].startswith("cuda") else ""
    print(f"{'arm':<16}{'time s':>9}{'x forward':>11}{peak_col}")
    for arm, res in cost.items():
        peak = f"{res['peak_mib']:>17.1f}" if "peak_mib" in res else ""
        print(f"{arm:<16}{res['s']:>9.3f}{res['s'] / floor:>11.2f}{peak}")
    if args["cost_only"] or args["device"] != "cpu":
        return

    print(f"\n{'capture':<13}{'time s':>9}{'RSS before MB':>15}{'peak RSS MB':>13}{'peak - before':>15}{'kept MB':>10}")
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
