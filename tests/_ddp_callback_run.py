"""Launched by tests/test_callback.py: one freeze-training run of SVCCACallback on digits,
single-process (``--devices 1``) or DDP on CPU with gloo (``--devices 2``; Lightning starts
rank 1 by re-running this script). Each rank writes ``rank<r>.json`` to ``--out``.

The 2-process run sees the same global batches as the 1-process run (batches of 32 per
rank, interleaved by an unshuffled DistributedSampler, against batches of 64; Lightning's
own sampler would shuffle the training set under DDP), and the model has no
BatchNorm (per-rank batch statistics would differ), so both runs follow the same
trajectory up to float rounding. Under DDP each rank records half of the probe and rank 0
gathers the rows (then subsamples 500 of the 200 x 2 x 2 image-cell rows), which must equal
the single-process recording."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

torch.set_num_threads(1)

from _lightning_helpers import DigitsModule, digits_loaders  # noqa: E402
from svcca_torch.callbacks import SVCCACallback  # noqa: E402
from svcca_torch.freeze import is_frozen  # noqa: E402
from svcca_torch.store import RepresentationStore  # noqa: E402


class FrozenWatch(pl.Callback):
    """Copies each group's parameters when first seen frozen; checks them at the end."""

    def __init__(self, svcca: SVCCACallback) -> None:
        self.svcca = svcca
        self.saved = {}
        self.find_unused_parameters = None

    def on_train_start(self, trainer, pl_module):
        # the wrapped model's public attribute (what the callback checks)
        self.find_unused_parameters = getattr(trainer.strategy.model, "find_unused_parameters", None)

    def on_train_epoch_end(self, trainer, pl_module):
        for g in self.svcca.groups:
            if g.name not in self.saved and is_frozen(g):
                self.saved[g.name] = [p.detach().clone() for p in g.parameters()]

    def unchanged(self) -> bool:
        by_name = {g.name: g for g in self.svcca.groups}
        return bool(self.saved) and all(
            torch.equal(a, b) for n, ps in self.saved.items() for a, b in zip(ps, by_name[n].parameters()))


def _row_norms(folder: Path) -> dict:
    store = RepresentationStore(folder)
    return {layer: (b.basis * b.singular_values).norm(dim=1).tolist()
            for layer, b in store.load_checkpoint(0).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    pl.seed_everything(0)
    loader, probe = digits_loaders(batch_size=64, shuffle=False)
    model = DigitsModule(batch_norm=False, lr=0.05)
    cb = SVCCACallback(probe, freeze_training=True, freeze_threshold=0.98, freeze_patience=1,
                       max_frozen_fraction=0.5, max_datapoints=500, progress=False)
    watch = FrozenWatch(cb)
    # freeze training under DDP: the strategy lets parameters go without gradients
    strategy = "ddp_find_unused_parameters_true" if args.devices > 1 else "auto"
    trainer = pl.Trainer(
        default_root_dir=str(args.out), max_epochs=4, accelerator="cpu", devices=args.devices, strategy=strategy,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[cb, watch], use_distributed_sampler=False,
    )
    if args.devices > 1:
        sampler = DistributedSampler(loader.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                     shuffle=False)
        loader = DataLoader(loader.dataset, batch_size=64 // args.devices, sampler=sampler)
    trainer.fit(model, loader)
    digest = hashlib.sha1()
    for p in model.parameters():
        digest.update(p.detach().contiguous().numpy().tobytes())
    summary_path = cb.run_dir / "svcca_summary.json"
    rank = trainer.global_rank
    result = {
        "events": cb.policy.events,
        "captured_steps": cb.captured_steps,
        "param_digest": digest.hexdigest(),
        "frozen_unchanged": watch.unchanged(),
        "find_unused_parameters": watch.find_unused_parameters,
        "matrices": json.loads(summary_path.read_text())["matrices"] if rank == 0 else None,
        "sharded": cb.sharded,
        # per-datapoint norms of each stored layer at step 0 (before any training): invariant to
        # the basis' signs and rotation, but not to the order of the rows
        "row_norms_step0": _row_norms(cb.run_dir / "store") if rank == 0 else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
