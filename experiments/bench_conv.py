"""Time DFT-CCA against the flat CCA it replaces (Raghu et al. 2017, §2.2).

For each size ``C:H:B`` (channels, square map side, base images) two conv layers are built
on a translation-invariant dataset: ``B`` random images and all their ``H*H`` circular
shifts (``N = B*H*H`` images), ``y`` a random circular convolution of ``x`` plus noise.
Three ways to the same canonical correlations are timed:

- ``flat``: :func:`svcca_torch.cca` on ``(N, C*H*H)``, every (channel, position) a neuron
  (the baseline, ``O(N (C H^2)^2 + (C H^2)^3)``);
- ``dft``: :func:`svcca_torch.dft_cca` on the same ``N`` augmented images;
- ``dft-dc``: ``dft_cca(..., centering="dc")`` on the ``B`` un-augmented images, which
  gives the same result without materialising the shifts.

It prints the times, the flat time over each DFT variant's, and the largest coefficient
difference from the baseline. Sizes whose flat CCA would have more than
``--max-flat-neurons`` neurons time only ``dft-dc`` (no flat CCA, no materialised shifts).

    python -m svcca_torch.experiments.bench_conv                 # a few sizes, well under a minute
    python -m svcca_torch.experiments.bench_conv --sizes 8:8:48 32:16:200 --repeats 5
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from svcca_torch import cca, dft_cca


def make_pair(c: int, h: int, b: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, c, h, h))
    kernel = rng.standard_normal((c, c, h, h)) / (c * h)
    y = np.fft.ifft2(np.einsum("dcuv,bcuv->bduv", np.fft.fft2(kernel), np.fft.fft2(x))).real
    y += 0.5 * rng.standard_normal(y.shape)
    return torch.from_numpy(x), torch.from_numpy(y)


def all_shifts(x: torch.Tensor, y: torch.Tensor):
    """Every image under all its circular shifts, the same shift for both maps."""
    h, w = x.shape[2:]
    shifts = [(i, j) for i in range(h) for j in range(w)]
    return tuple(torch.cat([t.roll(s, dims=(2, 3)) for s in shifts]) for t in (x, y))


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["4:4:24", "8:8:48", "16:8:96", "32:16:160"],
                        help="C:H:B triples: channels, square map side, base images (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (default: %(default)s)")
    parser.add_argument("--max-flat-neurons", type=int, default=1024,
                        help="skip the flat baseline above this many C*H*H neurons (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} thread(s), float64, best of {args.repeats}")
    print(f"{'C':>4} {'H':>3} {'B':>4} {'N':>6} {'neurons':>8} {'flat s':>9} {'dft s':>9} {'dft-dc s':>9} "
          f"{'vs dft':>8} {'vs dc':>8} {'max |diff|':>11}")
    for spec in args.sizes:
        c, h, b = (int(v) for v in spec.split(":"))
        x, y = make_pair(c, h, b)
        n, neurons = b * h * h, c * h * h
        t_dc, res_dc = best_time(lambda: dft_cca(x, y, centering="dc"), args.repeats)
        if neurons <= args.max_flat_neurons:
            xa, ya = all_shifts(x, y)
            t_dft, res = best_time(lambda: dft_cca(xa, ya), args.repeats)
            flat_x, flat_y = xa.reshape(n, -1), ya.reshape(n, -1)
            t_flat, flat = best_time(lambda: cca(flat_x, flat_y), max(1, min(args.repeats, 2)))
            diff = max(
                (flat.coefficients - res.coefficients).abs().max().item(),
                (flat.coefficients - res_dc.coefficients).abs().max().item(),
            )
            cols = f"{t_flat:9.4f} {t_dft:9.4f} {t_dc:9.4f} {t_flat / t_dft:7.0f}x {t_flat / t_dc:7.0f}x {diff:11.1e}"
        else:  # the flat CCA and the materialised shifts would not fit the time budget
            cols = f"{'skipped':>9} {'skipped':>9} {t_dc:9.4f} {'-':>8} {'-':>8} {'-':>11}"
        print(f"{c:>4} {h:>3} {b:>4} {n:>6} {neurons:>8} {cols}")


if __name__ == "__main__":
    main()
