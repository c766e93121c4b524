"""End-of-run analysis and disk per capture at a real user's scale, against the naive ways.

Two parts, in one run:

1. **Analysis time.** A store of C captures x L layers with the geometry of the issue's
   ResNet-18 run (1,024 probe images at a 1x1 grid when deep layers are recorded, so 1,024
   datapoints; 49 layers took 1.4 GiB for 67 captures, about 110 kept directions per layer):
   conv widths 64 to 512, a quarter of the layers each, times ``--width-scale`` (default 0.5),
   kept directions 92% of that (keep=0.99 keeps 1,826 of 1,994 on ResNet-18 in
   bench_capture.py), at most datapoints / 5 as a tracker's capture keeps them: 29, 59, 118
   and 204 directions, 103 on average. Bases converge to the last capture. The same bases go into two stores: float32 (svcca-torch 0.1's format) and
   int12 (the default now). Arms, interleaved in this order:

   - *new*: ``learning_dynamics(store, full=[the 4 captures of the heatmap grid])`` on the
     int12 store (what a run gets now): full matrices for those, the diagonal (to-final
     curves) for every capture, small eigenproblems batched; run twice, the table gives the mean;
   - *naive*: svcca-torch 0.1's analysis on the float32 store (what a run got before): one
     full layers x layers ``similarity_matrix`` per capture against the final capture, each
     capture loaded once;
   - *new, float32 store*: the new analysis on the float32 store, to separate the two changes
     (the int12 files cost a decode on load; float32 ones a torch.load);
   - *callback*: what ``DynamicsTracker``/``SVCCACallback`` run at the end of training,
     :func:`svcca_torch.tracker.shown_dynamics` on the int12 store: one pass with the
     to-final curves of every capture and full matrices for the grid's captures, then full
     matrices for the other TensorBoard heatmaps chosen from those curves (``--heatmaps``
     in all, the tracker's ``final_heatmaps``; the to-previous curves come from the values
     the tracker computed at each capture).

   ``--datapoints 4096 --width-scale 1`` is the full 2x2-grid geometry (slow on a CPU: the
   naive arm takes most of an hour at 67 x 49).

2. **Disk.** One capture at the full geometry (4,096 datapoints, the 10 layers that
   bench_capture.py records on ResNet-18: the stem, 8 residual blocks, fc), activations with a
   decaying spectrum (singular values ~ 1/i), reduced with keep=0.99 and stored both as
   float32 (0.1's format) and int12 (the default): bytes per capture, against the float32
   bases' ``datapoints x kept directions x 4 B``, and the largest difference of any SVCCA
   similarity between two captures (layers x layers, a capture against a later one) computed
   from the int12 and from the float32 bases. With the shared reference activations present
   (../shared/data/svcca_reference), the same difference on real SVHN and MNIST layers.

    python -m svcca_torch.experiments.bench_analysis                      # a few minutes on one CPU thread
    python -m svcca_torch.experiments.bench_analysis --sizes 40x30 --width-scale 0.25
    python -m svcca_torch.experiments.bench_analysis --device cuda --datapoints 4096 --width-scale 1
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from svcca_torch.dynamics import learning_dynamics
from svcca_torch.functional.matrix import similarity_matrix
from svcca_torch.functional.svcca import ReducedBasis, svcca
from svcca_torch.store import RepresentationStore
from svcca_torch.tracker import shown_dynamics
from svcca_torch.utils.validation import MIN_DATAPOINTS_PER_DIRECTION, FewDatapointsWarning

RESNET18_RECORDED = [64, 64, 64, 128, 128, 256, 256, 512, 512, 10]  # stem, 8 blocks, fc
GRID_FRACTIONS = (0.0, 0.35, 0.75, 1.0)
REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "svcca_reference"


def _widths(layers: int, scale: float) -> List[int]:
    base = [64, 128, 256, 512]
    per = [base[min(3, 4 * i // layers)] for i in range(layers)]  # a quarter of the layers per stage
    return [max(4, round(w * scale)) for w in per]


def _build_stores(folder: Path, captures: int, layers: int, n: int, scale: float,
                  device: str) -> Dict[str, RepresentationStore]:
    """Captures converging to the last one: basis of capture c = QR(G + (1 - c/C) noise)."""
    g = torch.Generator().manual_seed(0)
    # kept directions as a DynamicsTracker capture keeps them: at most datapoints // 5
    ks = [max(2, min(round(0.92 * w), n // MIN_DATAPOINTS_PER_DIRECTION)) for w in _widths(layers, scale)]
    finals = [torch.randn(n, k, generator=g) for k in ks]
    spectra = [torch.logspace(0, -1, k) for k in ks]
    stores = {enc: RepresentationStore(folder / enc, encoding=enc) for enc in ("int12", "float32")}
    for c in range(captures):
        t = 1.0 - c / max(1, captures - 1)
        bases = {}
        for i, (f, s) in enumerate(zip(finals, spectra)):
            q = torch.linalg.qr((f + 0.6 * t * torch.randn(f.shape, generator=g)).to(device)).Q
            bases[f"layer{i:02d}"] = ReducedBasis(basis=q, singular_values=s.to(device), n_neurons=q.shape[1])
        for st in stores.values():
            st.add(bases, step=c * 100, fraction=c / max(1, captures - 1))
    return stores


def _naive(store: RepresentationStore, device: str) -> torch.Tensor:
    """svcca-torch 0.1's learning_dynamics: a full similarity_matrix per capture vs final."""
    names = store.layers
    fin = store.load_checkpoint(store.final, device=device)
    out = torch.empty(len(store), len(names), len(names), dtype=torch.float64)
    for c, ck in enumerate(store.checkpoints):
        cur = store.load_checkpoint(ck, device=device)
        out[c] = similarity_matrix([fin[n] for n in names], [cur[n] for n in names])
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_analysis(sizes: Sequence[Tuple[int, int]], n: int, scale: float, device: str,
                   heatmaps: int = 6) -> List[Dict]:
    rows = []
    for captures, layers in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            stores = _build_stores(Path(tmp), captures, layers, n, scale, device)
            build = time.perf_counter() - t0
            q12, f32 = stores["int12"], stores["float32"]
            shown = [q12.nearest(f) for f in GRID_FRACTIONS]
            times: Dict[str, List[float]] = {"new": [], "naive": [], "new_f32": [], "shown": []}
            results = {}
            for arm in ("new", "naive", "new_f32", "shown", "new"):
                _sync(device)
                t0 = time.perf_counter()
                if arm == "naive":
                    results[arm] = _naive(f32, device)
                elif arm == "shown":
                    results[arm] = shown_dynamics(q12, device=device, max_images=heatmaps)
                else:
                    results[arm] = learning_dynamics(q12 if arm == "new" else f32, full=shown, device=device)
                _sync(device)
                times[arm].append(time.perf_counter() - t0)
            new, naive, exact = results["new"], results["naive"], results["new_f32"]
            diag_exact = float((exact.to_final() - torch.diagonal(naive, dim1=1, dim2=2)).abs().max())
            full_exact = float((exact.matrices[exact.full] - naive[exact.full]).abs().max())
            diag_q12 = float((new.to_final() - torch.diagonal(naive, dim1=1, dim2=2)).abs().max())
            full_q12 = float((new.matrices[new.full] - naive[new.full]).abs().max())
            t_new = sum(times["new"]) / len(times["new"])
            t_naive, t_f32 = times["naive"][0], times["new_f32"][0]
            sum_k = sum(q12.load(q12.final, name).k for name in q12.layers)
            row = dict(captures=captures, layers=layers, datapoints=n, sum_k=sum_k, naive_s=t_naive, new_s=t_new,
                       new_runs=times["new"], new_f32_s=t_f32, ratio=t_new / t_naive, ratio_f32=t_f32 / t_naive,
                       diff_same_format=max(diag_exact, full_exact), diff_int12=max(diag_q12, full_q12),
                       build_s=build, full=len(new.full), shown_s=times["shown"][0],
                       shown_full=len(results["shown"].full), ratio_shown=times["shown"][0] / t_naive)
            rows.append(row)
            for st in stores.values():
                st.close()
        print(f"  {captures} x {layers}: {n} datapoints, {sum_k} kept directions per capture; naive {t_naive:.1f} s, "
              f"new {t_new:.1f} s ({' / '.join(f'{t:.1f}' for t in times['new'])}), new on float32 {t_f32:.1f} s; "
              f"new/naive {row['ratio']:.3f}; callback's analysis {row['shown_s']:.1f} s with {row['shown_full']} "
              f"full matrices ({row['ratio_shown']:.3f} of naive); max difference {row['diff_same_format']:.0e} (same bases), "
              f"{row['diff_int12']:.0e} (int12 vs float32) (stores built in {build:.0f} s)", flush=True)
    return rows


def _activations(n: int, width: int, g: torch.Generator) -> torch.Tensor:
    """``(n, width)`` with singular values ~ 1/i: a realistic decaying spectrum."""
    left = torch.linalg.qr(torch.randn(n, width, generator=g)).Q
    right = torch.linalg.qr(torch.randn(width, width, generator=g)).Q
    s = 1.0 / torch.arange(1, width + 1, dtype=torch.float32)
    return (left * s) @ right.mT * math.sqrt(n)


def bench_disk(device: str) -> Dict:
    g = torch.Generator().manual_seed(1)
    n = 4096
    first = {f"layer{i}": _activations(n, w, g) for i, w in enumerate(RESNET18_RECORDED)}
    later = {k: v + 0.5 * _activations(n, v.shape[1], g) for k, v in first.items()}  # a capture further on
    out: Dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {}
        for enc in ("float32", "int12"):
            st = RepresentationStore(Path(tmp) / enc, encoding=enc)
            t0 = time.perf_counter()
            st.add({k: v.to(device) for k, v in first.items()}, step=0)
            out[f"add_{enc}_s"] = time.perf_counter() - t0
            st.add({k: v.to(device) for k, v in later.items()}, step=1)
            stores[enc] = st
        f32, q12 = stores["float32"], stores["int12"]
        sum_k = sum(f32.load(0, name).k for name in f32.layers)
        m = {enc: similarity_matrix(list(st.load_checkpoint(0).values()), list(st.load_checkpoint(1).values()))
             for enc, st in stores.items()}
        out.update(datapoints=n, layers=len(RESNET18_RECORDED), sum_k=sum_k, bases_f32_bytes=n * sum_k * 4,
                   float32_bytes=f32.checkpoint(0).nbytes, int12_bytes=q12.checkpoint(0).nbytes,
                   max_diff=float((m["float32"] - m["int12"]).abs().max()),
                   similarity_range=(float(m["float32"].min()), float(m["float32"].max())))
        for st in stores.values():
            st.close()
    real = {}
    for name, files, transpose in (("svhn fc (1,000 x 200)", ("svhn_model0_lay06.npy", "svhn_model1_lay06.npy"), False),
                                   ("mnist logits (10,000 x 10)", ("mnist_model0_lay04.npy", "mnist_model1_lay04.npy"),
                                    True)):
        if not all((REFERENCE / f).exists() for f in files):
            continue
        a, b = (torch.from_numpy(np.load(REFERENCE / f).T.copy() if transpose else np.load(REFERENCE / f)).float()
                for f in files)
        with tempfile.TemporaryDirectory() as tmp:
            vals = {}
            for enc in ("float32", "int12"):
                with RepresentationStore(Path(tmp) / enc, encoding=enc) as st:
                    st.add({"a": a, "b": b}, step=0)
                    vals[enc] = float(svcca(st.load(0, "a"), st.load(0, "b")).mean)
            real[name] = (vals["float32"], abs(vals["float32"] - vals["int12"]))
    out["real"] = real
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--sizes", nargs="+", default=["40x30", "67x49"], help="CAPTURESxLAYERS (default 40x30 67x49)")
    p.add_argument("--datapoints", type=int, default=1024, help="rows of every basis (default 1,024)")
    p.add_argument("--width-scale", type=float, default=0.5,
                   help="layer widths relative to ResNet-18's 64-512 (default 0.5: 110 kept directions per layer "
                   "on average, as in the issue's 67 x 49 run)")
    p.add_argument("--device", default="cpu", help="where stores reduce and the analysis runs (cpu, cuda)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--skip-disk", action="store_true", help="only the analysis timings")
    p.add_argument("--heatmaps", type=int, default=6,
                   help="the callback arm's full matrices (the tracker's final_heatmaps, default 6)")
    return p


def main(argv=None) -> Dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if not 0 < args.width_scale <= 1 or args.datapoints < 16:
        raise SystemExit("--width-scale must be in (0, 1] and --datapoints at least 16")
    sizes = []
    for s in args.sizes:
        try:
            c, l = (int(v) for v in s.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--sizes: {s!r} is not CAPTURESxLAYERS, e.g. 40x30") from None
        sizes.append((c, l))
    warnings.simplefilter("ignore", FewDatapointsWarning)  # synthetic bases: timing only
    print(f"analysis: device {args.device}, {args.threads} thread(s), {args.datapoints:,} datapoints, widths x "
          f"{args.width_scale}, full matrices for the heatmap grid at {list(GRID_FRACTIONS)}")
    res: Dict = {"analysis": bench_analysis(sizes, args.datapoints, args.width_scale, args.device, args.heatmaps)}
    print("\n| captures x layers | datapoints | kept directions / capture | naive (0.1, float32 store) | new (int12 store) "
          "| new / naive | new on the float32 store | callback (grid + heatmaps) / naive | max difference, same bases / int12 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in res["analysis"]:
        print(f"| {r['captures']} x {r['layers']} | {r['datapoints']:,} | {r['sum_k']:,} | {r['naive_s']:.1f} s | "
              f"{r['new_s']:.1f} s | {r['ratio']:.3f} | {r['new_f32_s']:.1f} s ({r['ratio_f32']:.3f}) | "
              f"{r['shown_s']:.1f} s, {r['shown_full']} full ({r['ratio_shown']:.3f}) | "
              f"{r['diff_same_format']:.0e} / {r['diff_int12']:.0e} |")
    if not args.skip_disk:
        d = bench_disk(args.device)
        res["disk"] = d
        mib = 2**20
        print(f"\ndisk, one capture: {d['datapoints']:,} datapoints x {d['layers']} layers (ResNet-18 widths), "
              f"{d['sum_k']:,} kept directions (keep=0.99)")
        print("| encoding | bytes per capture | / float32 bases (n x sum k x 4 B) | max similarity difference |")
        print("|---|---|---|---|")
        print(f"| float32 bases | {d['bases_f32_bytes'] / mib:.2f} MiB | 1 | - |")
        print(f"| float32 (0.1) | {d['float32_bytes'] / mib:.2f} MiB | {d['float32_bytes'] / d['bases_f32_bytes']:.3f} "
              "| 0 |")
        print(f"| int12 (default) | {d['int12_bytes'] / mib:.2f} MiB | {d['int12_bytes'] / d['bases_f32_bytes']:.3f} | "
              f"{d['max_diff']:.1e} (similarities {d['similarity_range'][0]:.3f} to {d['similarity_range'][1]:.3f}) |")
        print(f"store.add of the capture: float32 {d['add_float32_s']:.2f} s, int12 {d['add_int12_s']:.2f} s")
        for name, (value, diff) in d["real"].items():
            print(f"real activations, {name}: svcca {value:.6f}, int12 - float32 difference {diff:.1e}")
    return res


if __name__ == "__main__":
    main()
