"""Stateful metrics: streaming over batches equals the functional kernels on all data."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import svcca_torch as sv
from svcca_torch.metrics import CCA, PWCCA, SVCCA, LinearCKA


def layers(n=900, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 5))
    # large offsets: a naive sum-of-squares accumulation would cancel catastrophically
    x = z @ rng.standard_normal((5, 11)) + rng.standard_normal((n, 11)) + 1e4
    y = z @ rng.standard_normal((5, 8)) + rng.standard_normal((n, 8)) - 3e3
    return x.astype(np.float32), y.astype(np.float32)


def stream(metric, x, y, sizes=(1, 7, 100, 292, 500)):
    start = 0
    for b in sizes:
        metric.update(x[start : start + b], y[start : start + b])
        start += b
    assert start == len(x)
    return metric.compute()


def test_streaming_equals_functional():
    x, y = layers()
    # The metrics accumulate float64 moments: compare with float64 products (float64 claim).
    np.testing.assert_allclose(stream(CCA(), x, y).coefficients, sv.cca(x, y, dtype=torch.float64).coefficients, atol=1e-9)
    s = stream(SVCCA(0.9), x, y)
    ref = sv.svcca(x, y, 0.9, dtype=torch.float64)
    assert (s.k_x, s.k_y) == (ref.k_x, ref.k_y)
    assert s.mean == pytest.approx(ref.mean, abs=1e-9)
    assert stream(PWCCA(), x, y) == pytest.approx(sv.pwcca(x, y, dtype=torch.float64), abs=1e-9)
    assert stream(LinearCKA(), x, y) == pytest.approx(sv.linear_cka(x, y, dtype=torch.float64), abs=1e-9)


def test_state_dict_round_trip_mid_stream_and_reset():
    x, y = layers()
    m = SVCCA()
    m.update(x[:400], y[:400])
    m2 = SVCCA()
    m2.load_state_dict(m.state_dict())
    m2.update(x[400:], y[400:])
    assert m2.compute().mean == pytest.approx(sv.svcca(x, y, dtype=torch.float64).mean, abs=1e-9)
    m2.reset()
    with pytest.raises(ValueError, match="no data"):
        m2.compute()


def test_bad_batches():
    x, y = layers()
    m = CCA()
    m.update(x[:10], y[:10])
    with pytest.raises(ValueError, match="batch widths"):
        m.update(x[:10, :5], y[:10])
    with pytest.raises(ValueError, match="datapoints"):
        m.update(x[:10], y[:9])
    with pytest.raises(ValueError, match="NaN"):
        m.update(np.full((3, 11), np.nan), y[:3])


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, y = layers()
    shard = slice(rank * 300, (rank + 1) * 300 + (300 if rank == world - 1 else 0))
    m = SVCCA()
    m.update(x[shard], y[shard])
    c = CCA()
    c.update(x[shard], y[shard])
    if rank == 0:
        out.put((m.compute().mean, c.compute().mean))
    else:
        m.compute(), c.compute()
    dist.destroy_process_group()


def test_distributed_compute_merges_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, port, q), nprocs=2, start_method="spawn")
    got_svcca, got_cca = q.get()
    x, y = layers()
    assert got_svcca == pytest.approx(sv.svcca(x, y, dtype=torch.float64).mean, abs=1e-9)
    assert got_cca == pytest.approx(sv.cca(x, y, dtype=torch.float64).mean, abs=1e-9)
