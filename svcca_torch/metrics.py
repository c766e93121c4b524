"""Stateful similarity metrics that accumulate over batches (the torchmetrics split).

``metric.update(x_batch, y_batch)`` for every batch of a probe set, then ``metric.compute()``.
Only the sufficient statistics are kept -- neuron means and the three centred Gram
matrices, in float64 -- so memory is ``O(neurons²)`` whatever the number of datapoints,
and a probe set far larger than memory can be compared. Under ``torch.distributed``,
``compute()`` merges every rank's statistics (each rank updates with its own shard).

Activations are ``(datapoints, neurons)``; ``(N, C, H, W)`` batches are folded per
:func:`svcca_torch.conv_pair_to_datapoints`.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from .functional.cca import CCAResult, Moments, cca_from_moments, prepare_pair
from .functional.cca import moments as batch_moments
from .functional.cka import linear_cka_from_moments
from .functional.pwcca import pwcca_from_moments
from .functional.svcca import SVCCAResult, svcca_from_moments
from .utils.validation import check_keep_rule, check_rtol

_STATE = ("n", "mean_x", "mean_y", "sxx", "syy", "sxy")


class _MomentMetric(nn.Module):
    """Accumulates :class:`Moments` with Chan et al.'s pairwise update (no cancellation).

    The state is registered as buffers, so ``.to(device)`` and ``state_dict()`` work; it is
    created on the first ``update`` (the widths are not known before).
    """

    def __init__(self, sync_on_compute: bool = True) -> None:
        super().__init__()
        self.sync_on_compute = sync_on_compute
        for name in _STATE:
            self.register_buffer(name, None)

    def reset(self) -> None:
        """Forget every batch seen so far."""
        for name in _STATE:
            setattr(self, name, None)

    @torch.no_grad()
    def update(self, x: Any, y: Any) -> None:
        """Add a batch: ``x`` ``(batch, neurons_x)`` and ``y`` ``(batch, neurons_y)``, same datapoints."""
        xt, yt = prepare_pair(x, y, None, min_datapoints=1)
        bm = _unit_scale(batch_moments(xt.to(torch.float64), yt.to(torch.float64), torch.float64))
        b, bx, by, batch = bm.n, bm.mx, bm.my, (bm.sxx, bm.syy, bm.sxy)
        if self.n is None:
            self.n = torch.tensor(b, dtype=torch.float64, device=xt.device)
            self.mean_x, self.mean_y = bx, by
            self.sxx, self.syy, self.sxy = batch
            return
        if self.sxx.shape != batch[0].shape or self.syy.shape != batch[1].shape:
            raise ValueError(
                f"batch widths {xt.shape[1]} and {yt.shape[1]} differ from earlier batches "
                f"({self.sxx.shape[0]} and {self.syy.shape[0]}): every batch must come from the same two layers."
            )
        self._merge(torch.tensor(b, dtype=torch.float64, device=xt.device), bx, by, *batch)

    def _merge(self, n2, mx2, my2, sxx2, syy2, sxy2) -> None:
        n1 = self.n
        n = n1 + n2
        dx, dy = mx2 - self.mean_x, my2 - self.mean_y
        f = n1 * n2 / n
        self.sxx = self.sxx + sxx2 + f * torch.outer(dx, dx)
        self.syy = self.syy + syy2 + f * torch.outer(dy, dy)
        self.sxy = self.sxy + sxy2 + f * torch.outer(dx, dy)
        self.mean_x = self.mean_x + dx * (n2 / n)
        self.mean_y = self.mean_y + dy * (n2 / n)
        self.n = n

    def moments(self) -> Moments:
        """The accumulated statistics, merged across ranks when distributed."""
        if self.n is None:
            raise ValueError("no data: call update(x, y) with at least one batch before compute().")
        n, mx, my, sxx, syy, sxy = (getattr(self, k) for k in _STATE)
        if self.sync_on_compute and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            n, mx, my, sxx, syy, sxy = _all_reduce_moments(n, mx, my, sxx, syy, sxy)
        if float(n) < 2:
            raise ValueError(f"only {int(n)} datapoint seen; at least 2 are needed.")
        return Moments(int(n), mx, my, sxx, syy, sxy)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # materialise the lazily created buffers so that a saved state can be loaded
        for name in _STATE:
            if prefix + name in state_dict:
                setattr(self, name, state_dict[prefix + name].clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _unit_scale(m: Moments) -> Moments:
    """A batch's moments at the activations' own scale (the running sums need one scale)."""
    if m.scale_x == 1.0 and m.scale_y == 1.0:
        return m
    sx, sy = m.scale_x, m.scale_y
    out = Moments(m.n, m.mx / sx, m.my / sy, m.sxx / sx**2, m.syy / sy**2, m.sxy / (sx * sy))
    if not all(bool(torch.isfinite(t).all()) for t in out[1:6]):
        raise ValueError(
            "the batch's values are too large for float64 running sums (|value| beyond ~1e150); "
            "rescale the activations, or use the functional kernels, which rescale internally."
        )
    return out


def _all_reduce_moments(n, mx, my, sxx, syy, sxy):
    """Merge per-rank moments exactly: global mean first, then each rank's centred Grams
    shifted to the global mean, summed."""
    total = n.clone()
    dist.all_reduce(total)
    mean_x, mean_y = mx * n, my * n
    dist.all_reduce(mean_x)
    dist.all_reduce(mean_y)
    mean_x, mean_y = mean_x / total, mean_y / total
    dx, dy = mx - mean_x, my - mean_y
    grams = [sxx + n * torch.outer(dx, dx), syy + n * torch.outer(dy, dy), sxy + n * torch.outer(dx, dy)]
    for g in grams:
        dist.all_reduce(g)
    return (total, mean_x, mean_y, *grams)


class CCA(_MomentMetric):
    """Streaming CCA; ``compute()`` returns a :class:`CCAResult` (coefficients, weights, means)."""

    def __init__(self, rtol: Optional[float] = None, sync_on_compute: bool = True) -> None:
        super().__init__(sync_on_compute)
        self.rtol = check_rtol(rtol)

    def compute(self) -> CCAResult:
        """CCA of every batch seen (all ranks merged when distributed)."""
        return cca_from_moments(self.moments(), self.rtol)


class SVCCA(_MomentMetric):
    """Streaming SVCCA; ``compute()`` returns an :class:`SVCCAResult`. ``keep`` and
    ``keep_rule`` as in :func:`svcca_torch.svcca`."""

    def __init__(
        self, keep: Union[int, float] = 0.99, keep_rule: str = "singular_values", sync_on_compute: bool = True
    ) -> None:
        super().__init__(sync_on_compute)
        self.keep, self.keep_rule = check_keep_rule(keep, keep_rule)

    def compute(self) -> SVCCAResult:
        """SVCCA of every batch seen (all ranks merged when distributed)."""
        return svcca_from_moments(self.moments(), self.keep, self.keep_rule)


class PWCCA(_MomentMetric):
    """Streaming projection-weighted CCA, the ``"reference"`` method of
    :func:`svcca_torch.pwcca` (asymmetric); ``compute()`` returns a float."""

    def compute(self) -> float:
        """PWCCA of every batch seen (all ranks merged when distributed)."""
        return pwcca_from_moments(self.moments())


class LinearCKA(_MomentMetric):
    """Streaming linear CKA (the biased estimator; the debiased one needs per-datapoint
    kernel diagonals: use :func:`svcca_torch.linear_cka` with ``debiased=True``)."""

    def compute(self) -> float:
        """Linear CKA of every batch seen (all ranks merged when distributed)."""
        return linear_cka_from_moments(self.moments())
