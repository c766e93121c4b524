"""Screenshots of TensorBoard's tabs in headless Chromium, at TensorBoard's default settings.

Each shot loads the page in a fresh Chromium profile, so TensorBoard shows what a first-time
user sees: smoothing 0.6, "Ignore outliers in chart scaling" on. Charts are drawn as SVG
(``?forceSVG=true``, TensorBoard's own fallback renderer: headless Chromium draws its WebGL
charts unreliably, some cards came out blank). Either shoot a log folder::

    python docs/tensorboard_screenshots.py LOGDIR docs/images

or let the script make a real run and shoot it twice, mid-run and at the end::

    python docs/tensorboard_screenshots.py --train runs/screenshots docs/images

``--train`` trains the digits ConvNet (20 epochs) with ``SVCCACallback(probe,
freeze_training=True, max_overhead=None)`` and a ``TensorBoardLogger`` in a child process;
at half of training the child flushes the logs and waits while ``tensorboard_<tab>_midrun.png``
are taken (the pause is taken out of the callback's clock), then finishes, and
``tensorboard_<tab>.png`` are taken. Needs Debian's ``chromium``
(``apt-get install -y chromium fonts-dejavu-core``).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TABS = ("timeseries", "scalars", "custom_scalars", "images", "text")
MIDRUN_TABS = ("timeseries", "images")


def _tensorboard(logdir: Path, port: int) -> subprocess.Popen:
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                           "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(90):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugins_listing", timeout=2)
            break
        except OSError:
            time.sleep(1)
    time.sleep(3)  # the first scan of the log folder
    return tb


def _loaded(png: Path) -> bool:
    """Whether the page's cards were drawn: an unloaded page is a few flat colours where the
    cards are (TensorBoard fetches their data after the page itself; on a busy machine the
    shot can come first)."""
    from PIL import Image

    with Image.open(png) as im:
        w, h = im.size
        region = im.convert("RGB").crop((int(0.2 * w), int(0.12 * h), int(0.8 * w), int(0.6 * h)))
        return len(region.getcolors(maxcolors=1 << 20) or ()) > 100


def _crop_below_cards(png: Path, keep: int = 1200, margin: int = 24) -> None:
    """Cut the empty page below the last card of a tall shot (at least ``keep`` px stay)."""
    from PIL import Image

    with Image.open(png) as im:
        rgb = im.convert("RGB")
    w, h = rgb.size
    panel = rgb.crop((int(0.25 * w), 0, int(0.75 * w), h))  # the cards, not the side panels
    background = panel.getpixel((panel.width // 2, h - 1))
    last = next((y for y in range(h - 1, -1, -1)
                 if any(panel.getpixel((x, y)) != background for x in range(0, panel.width, 4))), h - 1)
    bottom = min(h, max(keep, last + margin))
    if bottom < h:
        rgb.crop((0, 0, w, bottom)).save(png)


def shoot(logdir: Path, out: Path, tabs, suffix: str = "", port: int = 6177, budget_ms: int = 25000,
          size: str = "1600,1200", tag_filter: str = "", timeseries_height: int = 2000, tries: int = 4) -> None:
    """Start TensorBoard on ``logdir`` and take ``out/tensorboard_<tab><suffix>.png`` per tab
    (again, with twice the time, while the cards come out blank)."""
    out.mkdir(parents=True, exist_ok=True)
    tb = _tensorboard(logdir, port)
    try:
        for tab in tabs:
            target = out / f"tensorboard_{tab}{suffix}.png"
            query = "?forceSVG=true" + (f"&tagFilter={tag_filter}" if tag_filter and tab == "timeseries" else "")
            window = size if tab != "timeseries" else f"{size.split(',')[0]},{timeseries_height}"
            for attempt in range(tries):
                profile = tempfile.mkdtemp(prefix="chromium-")  # a fresh profile: TensorBoard's default settings
                try:
                    subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                    f"--user-data-dir={profile}", f"--window-size={window}",
                                    f"--virtual-time-budget={budget_ms << attempt}", f"--screenshot={target}",
                                    f"http://127.0.0.1:{port}/{query}#{tab}"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300, check=True)
                finally:
                    shutil.rmtree(profile, ignore_errors=True)
                if tab == "text" or _loaded(target):
                    if tab == "timeseries":
                        _crop_below_cards(target)
                    break
                time.sleep(5)
            else:
                print(f"warning: {target}: the cards still look blank after {tries} tries", file=sys.stderr)
            print(target, flush=True)
    finally:
        tb.terminate()
        tb.wait(timeout=30)


def _child(root: Path, epochs: int, pause_at: float) -> None:
    """The real run (in its own process): digits ConvNet, SVCCACallback at its defaults but
    max_overhead=None, paused at ``pause_at`` of training until ``root/resume`` exists."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import Callback
    from pytorch_lightning.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    from svcca_torch.callbacks import SVCCACallback
    from svcca_torch.data import load_digits_dataset, probe_set
    from svcca_torch.experiments.common import Classifier
    from svcca_torch.models import ConvNet

    class Pause(Callback):
        def __init__(self, svcca: SVCCACallback, at: int) -> None:
            self.svcca, self.at = svcca, at

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            if trainer.global_step != self.at:
                return
            t0 = time.perf_counter()
            trainer.logger.experiment.flush()
            for board in self.svcca._boards:
                board.flush()
            (root / "paused").write_text(str(trainer.global_step))
            while not (root / "resume").exists():
                time.sleep(0.5)
            # the pause is not training time: keep it out of the callback's budget
            if self.svcca.tracker is not None and self.svcca.tracker._origin is not None:
                self.svcca.tracker._origin += time.perf_counter() - t0

    torch.set_num_threads(1)
    pl.seed_everything(0)
    train, _ = load_digits_dataset(seed=0)
    probe = probe_set(train, 1024, seed=0)
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    module = Classifier(ConvNet(in_channels=1, num_classes=10, width=16), lr=0.05, epochs=epochs)
    svcca = SVCCACallback(probe, freeze_training=True, max_overhead=None, progress=False)
    logger = TensorBoardLogger(str(root), name="digits-convnet", default_hp_metric=False)
    trainer = pl.Trainer(max_epochs=epochs, logger=logger, callbacks=[svcca, Pause(svcca, int(pause_at * epochs
                                                                                               * len(loader)))],
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                         log_every_n_steps=10, accelerator="cpu")
    trainer.fit(module, loader)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logdir", help="TensorBoard log folder (with --train: the folder the run is written to)")
    p.add_argument("out", nargs="?", default="docs/images", help="folder for tensorboard_<tab>.png")
    p.add_argument("--train", action="store_true", help="make a real run in LOGDIR and shoot it mid-run and at the end")
    p.add_argument("--epochs", type=int, default=20, help="with --train: training epochs")
    p.add_argument("--pause-at", type=float, default=0.5, help="with --train: fraction of training of the mid-run shots")
    p.add_argument("--port", type=int, default=6177, help="TensorBoard's port")
    p.add_argument("--tabs", nargs="+", default=list(TABS), choices=list(TABS))
    p.add_argument("--tag-filter", default="svcca", help="the Time Series tab's tag filter ('' for none)")
    p.add_argument("--timeseries-height", type=int, default=2000, help="the Time Series window's height (px)")
    p.add_argument("--budget-ms", type=int, default=25000, help="Chromium's --virtual-time-budget")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    root, out = Path(args.logdir), Path(args.out)
    if args.child:
        _child(root, args.epochs, args.pause_at)
        return 0
    common = dict(port=args.port, budget_ms=args.budget_ms, tag_filter=args.tag_filter,
                  timeseries_height=args.timeseries_height)
    if not args.train:
        shoot(root, out, args.tabs, **common)
        return 0
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, __file__, str(root), "--child", "--epochs", str(args.epochs),
                              "--pause-at", str(args.pause_at)])
    try:
        while not (root / "paused").exists():
            if child.poll() is not None:
                raise SystemExit(f"the training run ended before its pause (exit code {child.returncode})")
            time.sleep(0.5)
        shoot(root, out, [t for t in args.tabs if t in MIDRUN_TABS], suffix="_midrun", **common)
    finally:
        (root / "resume").write_text("")
    if child.wait() != 0:
        raise SystemExit(f"the training run failed (exit code {child.returncode})")
    shoot(root, out, args.tabs, **common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
