"""RepresentationStore: round trip, reopen/extend, atomic writes, damaged files."""
from __future__ import annotations

import json
import os

import pytest
import torch

from svcca_torch.functional.svcca import svcca, svd_reduce
from svcca_torch.store import INDEX_NAME, RepresentationStore, StoreCorruptError


def _acts(seed: int, n: int = 200):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 6, generator=g)
    return {
        "conv1": base @ torch.randn(6, 12, generator=g) + 0.01 * torch.randn(n, 12, generator=g),
        "fc": torch.randn(n, 5, generator=g),
    }


def test_round_trip_keeps_reduced_basis(tmp_path) -> None:
    store = RepresentationStore(tmp_path, keep=0.99, max_directions=8)
    acts = _acts(0)
    ck = store.add(acts, step=10, epoch=1, fraction=0.5)
    assert (ck.step, ck.epoch, ck.fraction, ck.layers) == (10, 1, 0.5, ("conv1", "fc"))
    assert store.layers == ["conv1", "fc"] and store.n_datapoints == 200
    loaded = store.load(10, "conv1")
    expected = svd_reduce(acts["conv1"], 0.99, max_directions=8)
    assert loaded.k == expected.k <= 8 and loaded.n_neurons == 12
    assert loaded.basis.dtype == torch.float32
    torch.testing.assert_close(loaded.singular_values, expected.singular_values)
    # same subspace: SVCCA from the stored basis equals SVCCA from the raw activations
    raw = svcca(acts["conv1"], acts["fc"], keep=0.99).mean
    from_store = svcca(loaded, store.load(ck, "fc"), keep=0.99).mean
    assert abs(float(raw) - float(from_store)) < 1e-4
    # only reduced data hits the disk: about n * sum(k) * 4 bytes
    sum_k = loaded.k + store.load(10, "fc").k
    assert 200 * sum_k * 4 <= ck.nbytes < 200 * sum_k * 4 + 4096


def test_reopen_and_extend(tmp_path) -> None:
    a = RepresentationStore(tmp_path, keep=4)
    a.add(_acts(0), step=0, fraction=0.0)
    a.add(_acts(1), step=50, fraction=1.0)
    b = RepresentationStore(tmp_path)  # settings come from the index
    assert b.settings["keep"] == 4
    assert [c.step for c in b.checkpoints] == [0, 50]
    b.add({"fc": torch.randn(200, 5), "head": torch.randn(200, 3)}, step=25, fraction=0.5)
    c = RepresentationStore(tmp_path)
    assert [ck.step for ck in c.checkpoints] == [0, 25, 50]
    assert c.layers == ["conv1", "fc", "head"]
    assert c.checkpoint(25).layers == ("fc", "head")
    assert c.final.step == 50 and c.nearest(0.4).step == 25
    torch.testing.assert_close(c.load(0, "fc").basis, a.load(0, "fc").basis)
    with pytest.raises(ValueError, match="`keep`"):
        RepresentationStore(tmp_path, keep=0.5)
    with pytest.raises(ValueError, match="`step` 25 is already stored"):
        c.add(_acts(2), step=25)
    with pytest.raises(ValueError, match="100 datapoints but the store holds 200"):
        c.add(_acts(2, n=100), step=60)


def test_interrupted_write_is_not_a_checkpoint(tmp_path, monkeypatch) -> None:
    store = RepresentationStore(tmp_path)
    store.add(_acts(0), step=0)
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the process dies while writing the second layer
            f.write(b"half")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        store.add(_acts(1), step=5)
    monkeypatch.setattr(torch, "save", real_save)
    assert not list(tmp_path.rglob("*.tmp"))  # no half-written file left under a real name
    reopened = RepresentationStore(tmp_path)
    assert [c.step for c in reopened.checkpoints] == [0]
    assert [c.step for c in store.checkpoints] == [0]
    # the step can be written again, and the first layer's orphan file is replaced
    reopened.add(_acts(1), step=5)
    assert [c.step for c in RepresentationStore(tmp_path).checkpoints] == [0, 5]


def test_damaged_file_is_named(tmp_path) -> None:
    store = RepresentationStore(tmp_path)
    store.add(_acts(0), step=3)
    entry = json.loads((tmp_path / INDEX_NAME).read_text())["checkpoints"][0]["files"]["fc"]
    path = tmp_path / entry["file"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(StoreCorruptError, match=entry["file"]):
        RepresentationStore(tmp_path)
    path.write_bytes(bytes(b ^ 0xFF if i == 100 else b for i, b in enumerate(data)))  # same size, altered
    reopened = RepresentationStore(tmp_path)
    reopened.load(3, "conv1")
    with pytest.raises(StoreCorruptError, match=entry["file"]):
        reopened.load(3, "fc")
    os.remove(path)
    with pytest.raises(StoreCorruptError, match="missing"):
        RepresentationStore(tmp_path)
    (tmp_path / INDEX_NAME).write_text("{not json")
    with pytest.raises(StoreCorruptError, match=INDEX_NAME):
        RepresentationStore(tmp_path)


def test_bad_input(tmp_path) -> None:
    store = RepresentationStore(tmp_path)
    with pytest.raises(ValueError, match="conv map"):
        store.add({"c": torch.randn(4, 3, 2, 2)}, step=0)
    with pytest.raises(ValueError, match="NaN"):
        store.add({"c": torch.full((10, 3), float("nan"))}, step=0)
    with pytest.raises(ValueError, match="`fraction`"):
        store.add(_acts(0), step=0, fraction=1.5)
    with pytest.raises(ValueError, match="no checkpoint at step 7"):
        store.load(7, "fc")
    assert len(RepresentationStore(tmp_path)) == 0


def test_archive_after_moves_later_checkpoints_into_their_own_store(tmp_path) -> None:
    store = RepresentationStore(tmp_path)
    for step in (0, 10, 20, 30):
        store.add(_acts(step), step=step)
    want = store.load(30, "conv1").basis.clone()
    archive = store.archive_after(10)
    assert [c.step for c in store.checkpoints] == [0, 10]
    assert archive.parent == tmp_path / "superseded"
    # nothing is lost: the later captures form a complete store of their own
    old = RepresentationStore(archive)
    assert [c.step for c in old.checkpoints] == [20, 30]
    torch.testing.assert_close(old.load(30, "conv1").basis, want)
    # the main store reopens cleanly and can store the resumed run's steps again
    again = RepresentationStore(tmp_path)
    assert [c.step for c in again.checkpoints] == [0, 10]
    again.add(_acts(99), step=20)
    assert [c.step for c in RepresentationStore(tmp_path).checkpoints] == [0, 10, 20]
    assert store.archive_after(40) is None
    everything = again.archive_after(-1)
    assert len(again) == 0 and everything.name.endswith("-all")
    assert [c.step for c in RepresentationStore(everything).checkpoints] == [0, 10, 20]


def test_archive_survives_a_crash_before_the_originals_are_removed(tmp_path, monkeypatch) -> None:
    import shutil

    store = RepresentationStore(tmp_path)
    for step in (0, 10, 20):
        store.add(_acts(step), step=step)
    want = store.load(20, "conv1").basis.clone()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        store.archive_after(10)
    monkeypatch.undo()
    (archive,) = (tmp_path / "superseded").iterdir()
    # the resumed run stores step 20 again over the leftover originals ...
    again = RepresentationStore(tmp_path)
    assert [c.step for c in again.checkpoints] == [0, 10]
    again.add(_acts(99), step=20)
    # ... and the archived capture is still complete and unaltered
    old = RepresentationStore(archive)
    torch.testing.assert_close(old.load(20, "conv1").basis, want)
    assert not torch.allclose(again.load(20, "conv1").basis, want)


def test_two_archives_in_the_same_second_do_not_clash(tmp_path) -> None:
    store = RepresentationStore(tmp_path)
    store.add(_acts(0), step=0)
    store.add(_acts(1), step=10)
    first = store.archive_after(0)
    store.add(_acts(2), step=10)
    second = store.archive_after(0)
    assert first != second and first.exists() and second.exists()
    assert [c.step for c in RepresentationStore(first).checkpoints] == [10]
    assert [c.step for c in RepresentationStore(second).checkpoints] == [10]
