"""Benchmark every similarity kernel against the floor and the numpy reference pipeline.

For each (neurons, datapoints) size, in one run, on the same data, with the arms
interleaved (one timed call of each arm per round, median over rounds, so that load on a
shared machine hits every arm alike):
  floor        the three Gram products XᵀX, YᵀY, XᵀY of the centred inputs, in the input
               dtype: the least any exact method must do with the data;
  reference    the numpy pipeline most SVCCA code follows: centre, full SVD of each input,
               keep the top directions, then covariance CCA (inverse square roots of the
               covariance matrices, then an SVD);
  svcca, cca, pwcca, linear_cka (biased and debiased) from svcca_torch.
Each method is printed with its time, its ratio to the floor and reference / method.
Then 12 layers of 256 neurons on 5,000 datapoints, all 144 pairs: one similarity_matrix
call against its own floor (one Gram per layer, the upper triangle's cross products in
one GEMM per row, and every pair's singular values from one batched symmetric
eigensolve, all in float32) and against a loop of svcca calls.

    python -m svcca_torch.experiments.bench_kernels                 # CPU, one thread, float32
    python -m svcca_torch.experiments.bench_kernels --device cuda   # the same on a GPU
    python -m svcca_torch.experiments.bench_kernels --accuracy      # float32 against float64, every method
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import torch
from threadpoolctl import threadpool_limits

import svcca_torch as sv

SIZES = [(64, 10_000), (256, 10_000), (512, 10_000), (1024, 20_000)]
METHODS = ("svcca", "cca", "pwcca", "cka", "cka_debiased")


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


def interleaved(arms: Dict[str, Callable[[], object]], device: str, repeats: int, warm: bool) -> Dict[str, float]:
    """Median seconds per call of each arm, one call of every arm per round."""
    if warm:
        for fn in arms.values():
            fn()
    times: Dict[str, list] = {k: [] for k in arms}
    for _ in range(repeats):
        for k, fn in arms.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


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


def matrix_floor(layers: list[torch.Tensor]) -> None:
    """similarity_matrix's own floor: one Gram per layer, the upper triangle's cross
    products (one GEMM per row), and the singular values of every pair's block from one
    batched symmetric eigensolve, in the input dtype."""
    cs = [z - z.mean(0) for z in layers]
    for c in cs:
        c.mT @ c  # noqa: B018
    big = torch.cat(cs, 1)
    w = cs[0].shape[1]
    blocks = []
    for i, c in enumerate(cs):
        row = c.mT @ big[:, i * w :]
        blocks += [row[:, j * w : (j + 1) * w] for j in range(len(cs) - i)]
    b = torch.stack(blocks)
    torch.linalg.eigvalsh(b @ b.mT)


REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "svcca_reference"
KERNELS = {
    "svcca": lambda a, b, **kw: sv.svcca(a, b, **kw).mean,
    "cca": lambda a, b, **kw: sv.cca(a, b, **kw).mean,
    "pwcca": lambda a, b, **kw: sv.pwcca(a, b, **kw),
    "cka": lambda a, b, **kw: sv.linear_cka(a, b, **kw),
    "cka_debiased": lambda a, b, **kw: sv.linear_cka(a, b, debiased=True, **kw),
}


def accuracy(reference_dir: Path) -> None:
    """|float32 - float64| of every method on the real activations (when present) and the
    bench layers, and a layer with dead/duplicate/constant neurons against an invertible
    map of itself."""
    pairs = {}
    if (reference_dir / "svhn_model0_lay06.npy").exists():
        load = lambda name: np.load(reference_dir / name)  # noqa: E731
        pairs["mnist (10 x 10,000)"] = (load("mnist_model0_lay04.npy").T.copy(), load("mnist_model1_lay04.npy").T.copy())
        pairs["svhn (200 x 1,000)"] = (load("svhn_model0_lay06.npy"), load("svhn_model1_lay06.npy"))
    else:
        print(f"(real activations not found in {reference_dir}: skipped)")
    pairs["bench (512 x 10,000)"] = tuple(t.numpy() for t in make_layers(512, 10_000, seed=1, device="cpu"))
    # The rank threshold's justification: the float32 Gram's rounding on the correlation matrix.
    x = torch.from_numpy(pairs["bench (512 x 10,000)"][0])
    xc = x - x.mean(0)
    g32, g64 = (xc.mT @ xc).double(), xc.double().mT @ xc.double()
    d = g64.diagonal().rsqrt()
    c64 = g64 * d[:, None] * d[None, :]
    err = torch.linalg.matrix_norm((g32 - g64) * d[:, None] * d[None, :], 2) / torch.linalg.eigvalsh(c64)[-1]
    print(f"float32 Gram rounding on the correlation matrix, bench (512 x 10,000): ||dC||_2 / lambda_max = {err:.1e} "
          f"(float32 rank threshold: {3e-3 ** 2:.0e})")
    # The zero-variance threshold's justification: residues of centring a constant float32 column.
    worst = max(float((torch.full((n, 4), c) - torch.full((n, 4), c).mean(0)).abs().max()) / c
                for n in (10, 100, 1000, 10_000, 100_000) for c in (0.1, 3.7, 12345.678, 1e19, 1e-19))
    print(f"centring a constant float32 column leaves at most {worst / torch.finfo(torch.float32).eps:.1f} eps "
          "of its value (zero-variance threshold: 32 eps)")
    print("|float32 - float64| per method; similarity_matrix svcca / cca")
    for label, (a, b) in pairs.items():
        row = {k: abs(f(a, b) - f(a, b, dtype=torch.float64)) for k, f in KERNELS.items()}
        mat = [float((sv.similarity_matrix([a, b], method=m) - sv.similarity_matrix([a, b], method=m, dtype=torch.float64))
                     .abs().max()) for m in ("svcca", "cca")]
        print(f"{label:>22}: " + " ".join(f"{k} {v:.1e}" for k, v in row.items()) + f" | matrix {mat[0]:.1e} / {mat[1]:.1e}")
    a = pairs[next(iter(pairs))][0] if len(pairs) == 1 else pairs["svhn (200 x 1,000)"][0]
    a = a.astype(np.float64)
    a = np.hstack([a, np.zeros((a.shape[0], 5)), a[:, :7], np.full((a.shape[0], 2), 0.25)])
    rng = np.random.default_rng(2)
    m = rng.standard_normal((a.shape[1], a.shape[1])) / np.sqrt(a.shape[1]) + np.eye(a.shape[1])
    for dt in (np.float32, np.float64):
        x, y = a.astype(dt), (a @ m).astype(dt)
        print(f"dead + duplicate + constant neurons vs an invertible map, {np.dtype(dt).name}: 1 - similarity = "
              f"cca {1 - sv.cca(x, y).mean:.1e}, svcca {1 - sv.svcca(x, y, keep=x.shape[1]).mean:.1e}, "
              f"pwcca {1 - sv.pwcca(x, y):.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per size; the median is shown")
    p.add_argument("--sizes", default=None, help="comma list of NEURONSxDATAPOINTS, e.g. 512x10000")
    p.add_argument("--skip-reference", action="store_true", help="skip the slow numpy reference pipeline")
    p.add_argument("--skip-matrix", action="store_true", help="skip the similarity_matrix part")
    p.add_argument("--accuracy", action="store_true",
                   help="instead of timings, print float32 against float64 for every method")
    p.add_argument("--reference-dir", type=Path, default=REFERENCE_DIR,
                   help="folder of the real MNIST/SVHN activations (default ../shared/data/svcca_reference)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # numpy's BLAS too, so the reference runs on the same cores
    if args.accuracy:
        accuracy(args.reference_dir)
        return
    sizes = SIZES if not args.sizes else [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    dev = args.device
    print(f"device={dev} threads={args.threads} dtype=float32 torch={torch.__version__} "
          f"(median of {args.repeats} interleaved rounds)")
    head = (f"{'neurons':>7} {'points':>7} | {'floor':>7} {'reference':>9} | "
            + " ".join(f"{m:>12}" for m in METHODS) + " |")
    print("seconds, then ratio to the floor, then reference / method")
    print(head)
    print("-" * len(head))
    for idx, (neurons, n) in enumerate(sizes):
        x, y = make_layers(neurons, n, seed=neurons + n, device=dev)
        arms = {
            "floor": lambda: floor(x, y),
            "svcca": lambda: sv.svcca(x, y),
            "cca": lambda: sv.cca(x, y).mean,
            "pwcca": lambda: sv.pwcca(x, y),
            "cka": lambda: sv.linear_cka(x, y),
            "cka_debiased": lambda: sv.linear_cka(x, y, debiased=True),
        }
        if not args.skip_reference:
            xn, yn = x.cpu().numpy(), y.cpu().numpy()
            arms["reference"] = lambda: reference_pipeline(xn, yn)
            assert abs(reference_pipeline(xn, yn) - sv.svcca(x, y).mean) < 1e-3
        t = interleaved(arms, dev, args.repeats, warm=idx == 0)
        ref = t.get("reference", float("nan"))
        lead = f"{neurons:>7} {n:>7} | "
        print(lead + f"{t['floor']:>7.3f} {ref:>9.3f} | " + " ".join(f"{t[m]:>12.3f}" for m in METHODS) + " |")
        pad = " " * (len(lead) + 19) + "| "
        print(pad + " ".join(f"{t[m] / t['floor']:>11.2f}x" for m in METHODS) + " | / floor")
        print(pad + " ".join(f"{ref / t[m]:>11.1f}x" for m in METHODS) + " | reference /")

    if args.skip_matrix:
        return
    layers = make_layers(256, 5_000, seed=7, device=dev, count=12)

    def loop() -> torch.Tensor:
        return torch.tensor([[sv.svcca(a, b).mean for b in layers] for a in layers])

    t = interleaved({"floor": lambda: matrix_floor(layers), "matrix": lambda: sv.similarity_matrix(layers)},
                    dev, args.repeats, warm=True)
    t_loop = interleaved({"loop": loop}, dev, 1, warm=False)["loop"]
    diff = float((loop() - sv.similarity_matrix(layers)).abs().max())
    print(f"\n12 layers x 256 neurons x 5000 points, all 144 pairs: similarity_matrix {t['matrix']:.3f} s, "
          f"its floor {t['floor']:.3f} s ({t['matrix'] / t['floor']:.2f}x the floor); loop of svcca "
          f"{t_loop:.3f} s ({t_loop / t['matrix']:.1f}x slower; max |difference| {diff:.1e})")


if __name__ == "__main__":
    main()
