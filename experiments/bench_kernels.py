"""Benchmark the similarity kernels against the floor and the reference pipeline.

For each (neurons, datapoints) size, in one run and on the same data:
  floor      the three Gram products XᵀX, YᵀY, XᵀY of the centred inputs, in the input
             dtype: the least any exact method must do with the data;
  reference  the numpy pipeline most SVCCA code follows: centre, full SVD of each input,
             keep the top directions, then covariance CCA (inverse square roots of the
             covariance matrices, then an SVD);
  svcca, cca, pwcca, linear_cka from svcca_torch.
Then 12 layers of 256 neurons on 5,000 datapoints: all 144 pairs by a loop of svcca calls
against one similarity_matrix call.

    python experiments/bench_kernels.py                 # CPU, one thread, float32
    python experiments/bench_kernels.py --device cuda   # the same on a GPU
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
import torch
from threadpoolctl import threadpool_limits

import svcca_torch as sv

SIZES = [(64, 10_000), (256, 10_000), (512, 10_000), (512, 50_000), (1024, 20_000)]


def make_layers(neurons: int, n: int, seed: int, device: str, count: int = 2) -> list[torch.Tensor]:
    """Correlated layers with a decaying spectrum, like real activations."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 64, generator=g)
    spectrum = 1.0 / torch.arange(1, neurons + 1, dtype=torch.float32) ** 0.7
    out = []
    for _ in range(count):
        mix = torch.randn(64, neurons, generator=g) / 8
        noise = torch.randn(n, neurons, generator=g) * spectrum
        out.append((latent @ mix + noise).relu().to(device))
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], device: str, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def floor(x: torch.Tensor, y: torch.Tensor) -> None:
    xc, yc = x - x.mean(0), y - y.mean(0)
    xc.mT @ xc, yc.mT @ yc, xc.mT @ yc  # noqa: B018


def reference_pipeline(x: np.ndarray, y: np.ndarray, keep: float = 0.99) -> float:
    reduced = []
    for a in (x, y):
        a = a - a.mean(0)
        u, s, _ = np.linalg.svd(a, full_matrices=False)
        k = int(np.searchsorted(np.cumsum(s) / s.sum(), keep)) + 1
        reduced.append(u[:, :k] * s[:k])
    a, b = reduced
    sxx, syy, sxy = a.T @ a, b.T @ b, a.T @ b

    def inv_sqrt(m):
        w, v = np.linalg.eigh(np.linalg.pinv(m))
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    return float(np.linalg.svd(inv_sqrt(sxx) @ sxy @ inv_sqrt(syy), compute_uv=False).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per entry; the median is shown")
    p.add_argument("--sizes", default=None, help="comma list of NEURONSxDATAPOINTS, e.g. 512x10000")
    p.add_argument("--skip-reference", action="store_true", help="skip the slow numpy reference pipeline")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # numpy's BLAS too, so the reference runs on the same cores
    sizes = SIZES if not args.sizes else [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    dev = args.device
    print(f"device={dev} threads={args.threads} dtype=float32 torch={torch.__version__} (median of {args.repeats})")
    head = f"{'neurons':>7} {'points':>7} | {'floor':>7} {'reference':>9} | {'svcca':>7} {'cca':>7} {'pwcca':>7} {'cka':>7} | {'svcca/floor':>11} {'ref/svcca':>9}"
    print(head)
    print("-" * len(head))
    for neurons, n in sizes:
        x, y = make_layers(neurons, n, seed=neurons + n, device=dev)
        t = {
            "floor": timeit(lambda: floor(x, y), dev, args.repeats),
            "svcca": timeit(lambda: sv.svcca(x, y), dev, args.repeats),
            "cca": timeit(lambda: sv.cca(x, y), dev, args.repeats),
            "pwcca": timeit(lambda: sv.pwcca(x, y), dev, args.repeats),
            "cka": timeit(lambda: sv.linear_cka(x, y), dev, args.repeats),
        }
        if args.skip_reference:
            t["reference"] = float("nan")
        else:
            xn, yn = x.cpu().numpy(), y.cpu().numpy()
            t["reference"] = timeit(lambda: reference_pipeline(xn, yn), "cpu", max(1, args.repeats - 2))
            assert abs(reference_pipeline(xn, yn) - sv.svcca(x, y).mean) < 1e-3
        print(
            f"{neurons:>7} {n:>7} | {t['floor']:>7.3f} {t['reference']:>9.3f} | {t['svcca']:>7.3f} "
            f"{t['cca']:>7.3f} {t['pwcca']:>7.3f} {t['cka']:>7.3f} | {t['svcca'] / t['floor']:>11.2f} "
            f"{t['reference'] / t['svcca']:>9.1f}"
        )

    layers = make_layers(256, 5_000, seed=7, device=dev, count=12)

    def loop() -> torch.Tensor:
        return torch.tensor([[sv.svcca(a, b).mean for b in layers] for a in layers])

    t_loop = timeit(loop, dev, 1)
    t_mat = timeit(lambda: sv.similarity_matrix(layers), dev, args.repeats)
    diff = float((loop() - sv.similarity_matrix(layers)).abs().max())
    print(f"\n12 layers x 256 neurons x 5000 points, all 144 pairs: loop of svcca {t_loop:.3f} s, "
          f"similarity_matrix {t_mat:.3f} s, speed-up {t_loop / t_mat:.1f}x (max |difference| {diff:.1e})")


if __name__ == "__main__":
    main()
