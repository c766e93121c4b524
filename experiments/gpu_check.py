"""One short, prepared GPU check (CI has no GPU; run this when a machine with one is lent).

    python -m svcca_torch.experiments.gpu_check            # checks, then the kernel benchmark on cuda
    python -m svcca_torch.experiments.gpu_check --no-bench # checks only (about a minute)

Checks that every kernel keeps CUDA tensors on the GPU and agrees with the CPU, that the
recorder captures a CUDA model, and that a short Lightning fit with SVCCACallback and
freeze training runs on the GPU, that the freeze signal's kept prefix and the frozen-output
cache give what running in full gives. Then a capture on the device against the CPU on the same
model and probe (torchvision ``resnet18(num_classes=10)``, ImageNet stem, ``--probe``
32x32 images): both timed, results checked to agree within 1e-4 (relative to each layer's
scale, TF32 off for the comparison), the result's device, and the peak device memory of a
capture against that of a plain forward of the probe; then the end-of-run analysis (40
captures x 30 layers, 4 full heatmaps) on the device against the CPU, timed and checked
to agree within 1e-4. Exits non-zero on the first failure.

    python -m svcca_torch.experiments.gpu_check --device cpu --probe 64 --no-bench   # dry run of the CPU path
"""
from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"[{'PASS' if ok else 'FAIL'}] {name} {detail}", flush=True)
    if not ok:
        sys.exit(1)


def kernels(dev: str) -> None:
    import svcca_torch as sv

    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 16, generator=g)
    x = (z @ torch.randn(16, 96, generator=g) + torch.randn(4000, 96, generator=g)).relu()
    y = (z @ torch.randn(16, 64, generator=g) + torch.randn(4000, 64, generator=g)).relu()
    xg, yg = x.to(dev), y.to(dev)
    res = sv.svcca(xg, yg)
    check("svcca result stays on the device", res.coefficients.device.type == xg.device.type, str(res.coefficients.device))
    check("svcca variates on the device", res.x_variates.device.type == xg.device.type)
    pairs = {
        "svcca": (sv.svcca(x, y).mean, res.mean),
        "cca": (sv.cca(x, y).mean, sv.cca(xg, yg).mean),
        "pwcca": (sv.pwcca(x, y), sv.pwcca(xg, yg)),
        "linear_cka": (sv.linear_cka(x, y), sv.linear_cka(xg, yg)),
        "linear_cka debiased": (sv.linear_cka(x, y, debiased=True), sv.linear_cka(xg, yg, debiased=True)),
    }
    for name, (cpu, gpu) in pairs.items():
        check(f"{name} cuda == cpu", abs(cpu - gpu) < 1e-4, f"cpu={cpu:.6f} gpu={gpu:.6f}")
    layers = [x, y, x[:, :40]]
    m_cpu = sv.similarity_matrix(layers)
    m_gpu = sv.similarity_matrix([t.to(dev) for t in layers])
    check("similarity_matrix cuda == cpu", float((m_cpu - m_gpu).abs().max()) < 1e-4)
    conv_x = torch.randn(64, 8, 6, 6, generator=g)
    conv_y = torch.roll(conv_x, 1, dims=-1) @ torch.eye(6) + 0.1 * torch.randn(64, 8, 6, 6, generator=g)
    d_cpu, d_gpu = sv.dft_cca(conv_x, conv_y).mean, sv.dft_cca(conv_x.to(dev), conv_y.to(dev)).mean
    check("dft_cca cuda == cpu", abs(d_cpu - d_gpu) < 1e-4, f"cpu={d_cpu:.6f} gpu={d_gpu:.6f}")
    metric = sv.SVCCA().to(dev)
    for i in range(0, 4000, 1000):
        metric.update(xg[i : i + 1000], yg[i : i + 1000])
    check("streaming SVCCA on cuda", abs(metric.compute().mean - res.mean) < 1e-4)


def recorder_and_callback(dev: str) -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    import svcca_torch as sv
    from svcca_torch.callbacks import SVCCACallback
    from svcca_torch.data import load_digits_dataset, probe_set
    from svcca_torch.models import ConvNet

    train, _ = load_digits_dataset(size=16)
    probe = probe_set(train, 256, seed=0)
    model = ConvNet(in_channels=1, num_classes=10, image_size=16).to(dev)
    acts = sv.ActivationRecorder(model).record(probe.to(dev))
    check("recorder on a CUDA model", len(acts) > 0 and all(t.shape[0] > 0 for t in acts.values()))
    low = torch.float16 if dev == "cuda" else torch.bfloat16  # float16 convs need CUDA
    acts_low = sv.ActivationRecorder(copy.deepcopy(model).to(low)).record(probe.to(dev))
    worst = max(float((acts_low[n] - acts[n]).abs().max() / acts[n].abs().max()) for n in acts)
    check(f"recorder on a {low} model (float32 probe cast to it)", worst < 0.05, f"max rel. diff {worst:.4f}")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = ConvNet(in_channels=1, num_classes=10, image_size=16)

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, _):
            x, t = batch
            return torch.nn.functional.cross_entropy(self.model(x), t)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    with tempfile.TemporaryDirectory() as tmp:
        cb = SVCCACallback(probe=probe, freeze_training="schedule", run_dir=tmp, progress=False)
        trainer = pl.Trainer(accelerator="gpu" if dev == "cuda" else "cpu", devices=1, max_epochs=4, callbacks=[cb], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False)
        t0 = time.perf_counter()
        trainer.fit(Module(), DataLoader(train, batch_size=64, shuffle=True))
        check("Lightning fit on GPU with SVCCACallback + freeze", (Path(tmp) / "learning_dynamics.png").exists(),
              f"{time.perf_counter() - t0:.1f} s")


def signal_prefix_on_device(dev: str) -> None:
    """The freeze signal's kept frozen prefix (host memory, copied to the device per batch)
    gives the similarities of full recordings on the device."""
    from svcca_torch.frozen_prefix import FrozenPrefix
    from svcca_torch.data import load_digits_dataset, probe_set
    from svcca_torch.models import ConvNet
    from svcca_torch.tracker import DynamicsTracker

    train, _ = load_digits_dataset()
    x, y = (t.to(dev) for t in train.tensors)
    probe = probe_set(train, 300, seed=0).to(dev)
    logs = []
    for max_bytes in (FrozenPrefix.PROBE_BYTES, 0):
        torch.manual_seed(0)
        model = ConvNet(width=8, depth=4, hidden=32).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        with tempfile.TemporaryDirectory() as tmp:
            # patience 2: one group at a time, so later recordings start from a frozen prefix (at
            # patience 1 every group settles at the first window and freezes at once)
            tr = DynamicsTracker(model, probe, run_dir=tmp, freeze="adaptive", freeze_window=5, freeze_threshold=1e-6,
                                 freeze_patience=2, max_overhead=None, final_analysis=False)
            default, FrozenPrefix.PROBE_BYTES = FrozenPrefix.PROBE_BYTES, max_bytes  # read by start()
            try:
                tr.start()
            finally:
                FrozenPrefix.PROBE_BYTES = default
            g = torch.Generator().manual_seed(0)
            for step in range(1, 31):
                idx = torch.randint(0, len(x), (64,), generator=g).to(dev)
                model.train()
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                tr.maybe_capture(step)
            tr.finish(30)
        logs.append((tr.signal_log, tr.frozen_prefix.stats().probe.forwards_served, tr.freeze_log))
    (kept, hits, frozen), (full, _, frozen_full) = logs
    worst = max((abs(e[k] - f[k]) for e, f in zip(kept, full) for k in e if k != "step"), default=0.0)
    same = [(e["step"], e["groups"]) for e in frozen] == [(e["step"], e["groups"]) for e in frozen_full]
    check("freeze signal reuses the frozen prefix on the device", hits > 0 and same and worst <= 1e-4,
          f"{hits} reuses, max similarity difference {worst:.1e}")


def frozen_cache_on_device(dev: str) -> None:
    """Training with the frozen-output cache (keys hashed on the device, kept rows in host
    memory, copied back per batch) gives the losses of training without it."""
    from svcca_torch.data import load_digits_dataset, probe_set
    from svcca_torch.models import ConvNet
    from svcca_torch.tracker import DynamicsTracker

    train, _ = load_digits_dataset()
    x, y = (t[:640].to(dev) for t in train.tensors)
    probe = probe_set(train, 300, seed=0).to(dev)
    runs = []
    # deterministic float32 kernels: two runs may then differ only by what the cache serves
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for cache in (True, False):
            torch.manual_seed(0)
            model = ConvNet(width=8, depth=6, hidden=32).to(dev)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            losses = []
            with tempfile.TemporaryDirectory() as tmp:
                tr = DynamicsTracker(model, probe, run_dir=tmp, freeze="adaptive", freeze_window=5, freeze_threshold=1e-6,
                                     max_overhead=None, final_analysis=False, frozen_cache=cache)
                tr.start()
                g = torch.Generator().manual_seed(0)
                step = 0
                for epoch in range(6):
                    for idx in torch.randperm(len(x), generator=g).split(64):
                        idx = idx.to(dev)
                        model.train()
                        opt.zero_grad()
                        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                        loss.backward()
                        opt.step()
                        losses.append(float(loss.detach()))
                        step += 1
                        tr.maybe_capture(step, epoch=epoch)
                tr.finish(step)
            runs.append((torch.tensor(losses), tr.frozen_cache_stats or {}))
    finally:  # the later checks run with the flags as they were
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = flags
    (cached, stats), (plain, _) = runs
    worst = float(((cached - plain).abs() / plain.abs()).max())
    check("frozen-output cache on the device", stats.get("served", 0) > 0 and stats.get("off") is None
          and worst <= 1e-4, f"{stats.get('served')} samples served, max relative loss difference {worst:.1e}")


def capture_on_device(dev: str, n_probe: int) -> None:
    """Time a capture on ``dev`` and on the CPU, same model and probe; check agreement."""
    import torchvision

    from svcca_torch.recorder import ActivationRecorder

    device = torch.device(dev)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    probe = torch.randn(n_probe, 3, 32, 32)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 vs float32
    try:
        cpu_rec = ActivationRecorder(net, example_input=probe[:8])
        cpu_rec.record(probe[:8])  # warm-up
        ref = cpu_rec.record(probe)
        cpu_s = cpu_rec.last_seconds
        net_dev, probe_dev = copy.deepcopy(net).to(device), probe.to(device)
        rec = ActivationRecorder(net_dev, example_input=probe_dev[:8])
        rec.record(probe_dev[:8])
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        got = rec.record(probe_dev)
        dev_s = rec.last_seconds
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
        check("capture result on the model's device", all(t.device.type == device.type for t in got.values()))
        worst = max(float((got[n].cpu() - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30)) for n in ref)
        check(f"capture on {dev} == capture on cpu (1e-4 of each layer's scale)", worst < 1e-4,
              f"max rel. diff {worst:.1e}")
        sub = rec.layers[: max(1, len(rec.layers) // 4)]
        rec.record(probe_dev, layers=sub)
        sub_s = rec.last_seconds
        fwd_peak = None
        sync()
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            for batch in probe_dev.split(rec.batch_size):
                net_dev(batch)
        sync()
        fwd_s = time.perf_counter() - t0
        if device.type == "cuda":
            fwd_peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    print(f"capture of {len(ref)} layers on {n_probe} images (resnet18, ImageNet stem, 32x32, TF32 off): "
          f"cpu {cpu_s:.3f} s ({torch.get_num_threads()} thread(s)), {dev} {dev_s:.3f} s "
          f"({cpu_s / dev_s:.1f}x); lowest quarter ({', '.join(sub)}) {sub_s:.3f} s; plain forward {fwd_s:.3f} s")
    if peak is not None:
        print(f"peak device memory above model + probe: capture {peak:.1f} MiB, plain forward {fwd_peak:.1f} MiB "
              f"(batch {rec.batch_size})")


def analysis_on_device(dev: str, captures: int = 40, layers: int = 30, n: int = 1024) -> None:
    """The end-of-run analysis a tracker runs (``shown_dynamics``: every to-final diagonal, the
    grid's and the heatmaps' full matrices) on ``dev`` vs the CPU."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_analysis import _build_stores, _sync

    from svcca_torch.tracker import shown_dynamics

    with tempfile.TemporaryDirectory() as tmp:
        store = _build_stores(Path(tmp), captures, layers, n, 0.5, dev)["int12"]
        times, results = {}, {}
        for where in ("cpu", dev, "cpu", dev):  # the second round is the one timed (warm)
            _sync(where)
            t0 = time.perf_counter()
            results[where] = shown_dynamics(store, device=where)
            _sync(where)
            times[where] = time.perf_counter() - t0
        store.close()
    a, b = results["cpu"], results[dev]
    check(f"end-of-run analysis on {dev} picks the cpu's heatmaps", a.full == b.full, f"{a.full} vs {b.full}")
    diff = max(float((a.to_final() - b.to_final()).abs().max()),
               float((a.matrices[a.full] - b.matrices[a.full]).abs().max()))
    check(f"end-of-run analysis on {dev} == cpu (1e-4)", diff < 1e-4, f"max diff {diff:.1e}")
    print(f"end-of-run analysis, {captures} captures x {layers} layers, {n} datapoints, {len(a.full)} full matrices: "
          f"cpu {times['cpu']:.2f} s ({torch.get_num_threads()} thread(s)), {dev} {times[dev]:.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-bench", action="store_true", help="skip the kernel benchmark")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only to dry-run this script")
    p.add_argument("--probe", type=int, default=4096, help="probe images of the capture check (default: %(default)s)")
    p.add_argument("--analysis", default="40x30", help="CAPTURESxLAYERS of the analysis check (default: %(default)s)")
    args = p.parse_args()
    if args.device == "cuda":
        check("CUDA available", torch.cuda.is_available(), torch.__version__)
        print(torch.cuda.get_device_name(0))
    kernels(args.device)
    recorder_and_callback(args.device)
    signal_prefix_on_device(args.device)
    frozen_cache_on_device(args.device)
    capture_on_device(args.device, args.probe)
    c, l = (int(v) for v in args.analysis.split("x"))
    analysis_on_device(args.device, c, l)
    if not args.no_bench:
        subprocess.run([sys.executable, "-m", "svcca_torch.experiments.bench_kernels", "--device", args.device,
                        "--repeats", "5"], check=True)


if __name__ == "__main__":
    main()
