"""Recording the probe across DDP ranks with ``trainer.strategy`` collectives (the callback's
``sharded_record`` for :class:`~svcca_torch.tracker.DynamicsTracker`)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch

from svcca_torch.functional.conv import conv_datapoint_indices
from svcca_torch.recorder import ActivationRecorder, Inputs

__all__ = ["record_sharded"]


def record_sharded(trainer: Any, rec: ActivationRecorder, probe: Union[torch.Tensor, Inputs]
                   ) -> Optional[Dict[str, torch.Tensor]]:
    """Every rank records a contiguous slice of the probe inputs (every input of a model of
    several sliced alike, ``probe`` an :class:`~svcca_torch.recorder.Inputs`); the rows are
    gathered with ``trainer.strategy.all_gather`` (all ranks) and assembled on rank 0 in
    probe order. Rows are input-major, so the concatenation equals a single-process
    recording without ``max_datapoints`` (each rank's row count is gathered first: token
    layers keep as many rows per input as it has real tokens); ``rec.max_datapoints`` is
    then applied as the recorder applies it (a fixed-seed subsample of all the rows)."""
    shard = ActivationRecorder(rec.model, rec.layers, grid=rec.grid, resize=rec.resize, max_datapoints=None,
                               batch_size=rec.batch_size, device=rec.device, max_tokens=rec.max_tokens,
                               layouts=dict(rec.layouts), padding_mask=rec.padding_mask)
    inputs = probe if isinstance(probe, Inputs) else Inputs((probe,))
    n, world, rank = inputs.rows, trainer.world_size, trainer.global_rank
    chunk = -(-n // world)
    counts = [max(0, min(n, (r + 1) * chunk) - r * chunk) for r in range(world)]
    lo = rank * chunk
    # a rank with no slice still runs one input, so every rank joins the same collectives
    part = inputs.slice(lo, lo + counts[rank]) if counts[rank] else inputs.slice(0, 1)
    acts = shard.record(part if isinstance(probe, Inputs) else part.args[0])
    device = next((t.device for t in rec.model.parameters()), torch.device("cpu"))
    mine = next(iter(acts.values())).shape[0] if counts[rank] else 0  # common rows: alike in every layer
    rows = trainer.strategy.all_gather(torch.tensor([mine], device=device)).reshape(-1).tolist()
    most = max(1, max(int(r) for r in rows))
    out: Dict[str, torch.Tensor] = {}
    for name, t in acts.items():
        padded = torch.zeros(most, t.shape[1], dtype=t.dtype)
        padded[:mine] = t[:mine]
        parts = trainer.strategy.all_gather(padded.to(device))
        if trainer.is_global_zero:
            out[name] = torch.cat([parts[r, : int(rows[r])].cpu() for r in range(world)])
    if not trainer.is_global_zero:
        return None
    total = int(sum(rows))
    kept = conv_datapoint_indices(total, (1, 1), max_datapoints=rec.max_datapoints, seed=rec.seed)
    return {k: v[kept] for k, v in out.items()} if kept is not None else out
