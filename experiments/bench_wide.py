"""Benchmark svd_reduce on wide layers (more neurons than datapoints, issue 21) and a tall one.

For each DATAPOINTSxNEURONS size, in one run, on the same float32 data (ReLU activations
with a decaying spectrum, like a flattened token layer), with the arms interleaved (one
call of each arm per round, the median over rounds, so that load on a shared machine hits
every arm alike):
  gram         the floor: the centred layer's Gram on its smaller side (X Xᵀ when wide,
               Xᵀ X when tall), in float32 -- the one pass over the data any exact method makes;
  svd_reduce   svcca_torch.svd_reduce(x, keep) (the capture path's kernel);
  torch.svd    torch.linalg.svd of the centred layer, full_matrices=False, float32;
  neuron side  (only up to --neuron-side-max neurons) svd_reduce forced onto the (d, d)
               Gram of the neurons, the route every layer took before issue 21.
Each arm reports wall seconds, process CPU seconds (all threads) and its peak memory: the
process's peak resident set during the call above the resident set before it (Linux
VmHWM, reset before every call), so it counts torch's buffers, which tracemalloc does not
see. Then svd_reduce's accuracy against float64 torch.linalg.svd of the same data:
k, max |s - s_ref| / s_1, and the sine of the largest angle between the bases.

    python -m svcca_torch.experiments.bench_wide                       # 256x3072, 1024x8320, 20000x512
    python -m svcca_torch.experiments.bench_wide --sizes 256x3072 --repeats 5
    python -m svcca_torch.experiments.bench_wide --neuron-side-max 8320 --repeats 1   # the old route too
"""
from __future__ import annotations

import argparse
import gc
import re
import statistics
import sys
import threading
import time
from typing import Callable, Dict, Tuple

import torch

import svcca_torch as sv

SIZES = [(256, 3072), (1024, 8320), (20_000, 512)]


def make_layer(n: int, d: int, seed: int) -> torch.Tensor:
    """ReLU activations of ``n`` datapoints and ``d`` neurons: 64 shared latents plus noise
    with a power-law spectrum over the neurons, float32."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 64, generator=g)
    spectrum = 1.0 / torch.arange(1, d + 1, dtype=torch.float32) ** 0.7
    return (latent @ (torch.randn(64, d, generator=g) / 8) + torch.randn(n, d, generator=g) * spectrum).relu()


# ------------------------------------------------------------------------ memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def _unpooled_malloc() -> bool:
    """Have glibc serve every block of 128 KiB or more by mmap and give it back on free (fixed
    threshold: by default it grows after frees and keeps freed buffers in the heap), so that
    a call's buffers show in the resident set even when an earlier call freed as much."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 128 << 10)) and bool(libc.mallopt(-1, 128 << 10))  # MMAP, TRIM thresholds
    except (OSError, AttributeError):
        return False


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak resident memory of the process during a block, above the resident memory at its
    start, in bytes: the kernel's own high-water mark where it can be reset, else a thread
    sampling the resident set every millisecond."""

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        self._exact = _reset_peak()
        self.base = _status_kb("VmRSS")
        self._peak, self._stop = self.base, threading.Event()
        if not self._exact:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, _status_kb("VmRSS"))

    def __exit__(self, *exc) -> None:
        if self._exact:
            self._peak = _status_kb("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _status_kb("VmRSS"))
        self.bytes = max(0, self._peak - self.base) * 1024


# ------------------------------------------------------------------------ arms
def gram_floor(x: torch.Tensor) -> torch.Tensor:
    xc = x - x.mean(0)
    return xc @ xc.mT if x.shape[1] > x.shape[0] else xc.mT @ xc


def torch_svd(x: torch.Tensor):
    return torch.linalg.svd(x - x.mean(0), full_matrices=False)


def neuron_side(x: torch.Tensor, keep) -> sv.ReducedBasis:
    """svd_reduce on the (d, d) Gram of the neurons, whatever the shape (the pre-issue-21 route)."""
    mod = sys.modules["svcca_torch.functional.svcca"]
    saved = mod.prefer_datapoint_gram
    mod.prefer_datapoint_gram = lambda n, d: False
    try:
        return sv.svd_reduce(x, keep)
    finally:
        mod.prefer_datapoint_gram = saved


def run_arms(arms: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, Tuple[float, float, int]]:
    """(median wall s, median process CPU s, max peak bytes) per arm, one call of each per round."""
    out: Dict[str, list] = {k: [] for k in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            with PeakMemory() as mem:
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                w1, c1 = time.perf_counter(), time.process_time()
            out[name].append((w1 - w0, c1 - c0, mem.bytes))
    return {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v), max(r[2] for r in v))
            for k, v in out.items()}


def accuracy(x: torch.Tensor, keep) -> Tuple[int, float, float]:
    """(k, max |s - s_ref| / s_1, sin of the largest angle between the bases) of svd_reduce
    against float64 torch.linalg.svd of the same (float32-valued) data."""
    b = sv.svd_reduce(x, keep)
    x64 = x.double()
    u, s, _ = torch.linalg.svd(x64 - x64.mean(0), full_matrices=False)
    k = b.k
    rel = float((b.singular_values.double() - s[:k]).abs().max() / s[0])
    q = b.basis.double()
    sin = float(torch.linalg.matrix_norm(q - u[:, :k] @ (u[:, :k].mT @ q), 2))
    return k, rel, sin


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m svcca_torch.experiments.bench_wide", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None,
                   help="comma list of DATAPOINTSxNEURONS (default 256x3072,1024x8320,20000x512)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds per size; medians shown (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--keep", type=float, default=0.99, help="svd_reduce's keep (default 0.99)")
    p.add_argument("--neuron-side-max", type=int, default=3072,
                   help="also time the (d, d) neuron-side route for layers of at most this many neurons "
                        "(default 3072; it costs d^3: ~2 minutes at 8,320 on one thread)")
    p.add_argument("--skip-accuracy", action="store_true", help="skip the float64 accuracy check")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = SIZES if not args.sizes else [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    keep = int(args.keep) if args.keep > 1 else args.keep
    exact_peak, unpooled = _reset_peak(), _unpooled_malloc()
    print(f"threads={args.threads} dtype=float32 torch={torch.__version__} keep={keep} "
          f"(median of {args.repeats} interleaved rounds; peak memory "
          f"{'from VmHWM' if exact_peak else 'sampled every ms'}, above the resident set before each call"
          f"{', glibc mmap threshold fixed at 128 KiB' if unpooled else ''})")
    warm = make_layer(48, 96, 0)
    for fn in (gram_floor, torch_svd, lambda z: sv.svd_reduce(z, keep), lambda z: neuron_side(z, keep)):
        fn(warm), fn(warm[:, :24])  # both routes, lazily loaded LAPACK paths
    head = f"{'datapoints x neurons':>21} | {'arm':<12} {'wall s':>8} {'cpu s':>8} {'peak MB':>8} | {'/ torch.svd':>11}"
    print(head)
    print("-" * len(head))
    for n, d in sizes:
        x = make_layer(n, d, seed=n + d)
        arms: Dict[str, Callable[[], object]] = {
            "gram": lambda: gram_floor(x),
            "svd_reduce": lambda: sv.svd_reduce(x, keep),
            "torch.svd": lambda: torch_svd(x),
        }
        if d <= args.neuron_side_max and d > n:
            arms["neuron side"] = lambda: neuron_side(x, keep)
        t = run_arms(arms, args.repeats)
        ref = t["torch.svd"][0]
        for i, (name, (wall, cpu, peak)) in enumerate(t.items()):
            label = f"{n:>9,} x {d:>9,}" if i == 0 else ""
            print(f"{label:>21} | {name:<12} {wall:>8.3f} {cpu:>8.3f} {peak / 2**20:>8.1f} | {wall / ref:>10.2f}x")
        if not args.skip_accuracy:
            k, rel, sin = accuracy(x, keep)
            print(f"{'':>21} | svd_reduce against float64 torch.linalg.svd: k={k}, max|s - s_ref|/s_1 = {rel:.1e}, "
                  f"sin(largest angle) = {sin:.1e}")
        del x, arms
        gc.collect()


if __name__ == "__main__":
    main()
