"""RepresentationStore: round trip, reopen/extend, atomic writes, damaged files."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from svcca_torch.functional.svcca import svcca, svd_reduce
from svcca_torch.store import INDEX_NAME, LOCK_NAME, RepresentationStore, StoreCorruptError, StoreLockedError

F32 = torch.finfo(torch.float32).eps


def _acts(seed: int, n: int = 200):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 6, generator=g)
    return {
        "conv1": base @ torch.randn(6, 12, generator=g) + 0.01 * torch.randn(n, 12, generator=g),
        "fc": torch.randn(n, 5, generator=g),
    }


@pytest.mark.parametrize("encoding, claim", [("float32", 1e-4), ("int12", 1e-3)])
def test_round_trip_keeps_reduced_basis(tmp_path, encoding, claim) -> None:
    """float32 bases give SVCCA to the kernels' float32 accuracy (1e-4, docs/kernels.md); int12
    bases to the encoding's claim (1e-3)."""
    store = RepresentationStore(tmp_path, keep=0.99, max_directions=8, encoding=encoding)
    acts = _acts(0)
    ck = store.add(acts, step=10, epoch=1, fraction=0.5)
    assert (ck.step, ck.epoch, ck.fraction, ck.layers) == (10, 1, 0.5, ("conv1", "fc"))
    assert store.layers == ["conv1", "fc"] and store.n_datapoints == 200
    loaded = store.load(10, "conv1")
    expected = svd_reduce(acts["conv1"], 0.99, max_directions=8)
    assert loaded.k == expected.k <= 8 and loaded.n_neurons == 12
    assert loaded.basis.dtype == torch.float32
    # orthonormal columns to float32 precision (re-orthonormalised after decoding)
    eye = torch.eye(loaded.k)
    torch.testing.assert_close(loaded.basis.mT @ loaded.basis, eye, atol=8 * 200**0.5 * F32, rtol=0)
    torch.testing.assert_close(loaded.singular_values, expected.singular_values, atol=0, rtol=0)  # stored as is
    # same subspace: SVCCA from the stored basis equals SVCCA from the raw activations
    raw = svcca(acts["conv1"], acts["fc"], keep=0.99).mean
    from_store = svcca(loaded, store.load(ck, "fc"), keep=0.99).mean
    assert abs(float(raw) - float(from_store)) < claim
    # only reduced data hits the disk: n * sum(k) * (4 or 1.5) bytes plus a small header per file
    sum_k = loaded.k + store.load(10, "fc").k
    per_entry = 4 if encoding == "float32" else 1.5
    assert 200 * sum_k * per_entry <= ck.nbytes < 200 * sum_k * per_entry + 2 * 3072  # 2 files


def test_int12_bytes_and_similarity_at_capture_scale(tmp_path) -> None:
    """At a real capture's size the encoded bases take at most half (3/8 + headers) of the
    float32 bases' n x k x 4 bytes, and SVCCA between them moves by less than 1e-3."""
    g = torch.Generator().manual_seed(3)
    n = 2048
    z = torch.randn(n, 40, generator=g)
    spectrum = torch.logspace(0, -2, 64)  # decaying, as real layers
    layers = {f"l{i}": (z @ torch.randn(40, 64, generator=g) + torch.randn(n, 64, generator=g)) * spectrum
              for i in range(3)}
    exact = RepresentationStore(tmp_path / "f32", encoding="float32", max_directions=48)
    small = RepresentationStore(tmp_path / "int12", max_directions=48)
    ce, cs = exact.add(layers, step=0), small.add(layers, step=0)
    sum_k = sum(exact.load(0, name).k for name in layers)
    assert cs.nbytes <= 0.5 * n * sum_k * 4, (cs.nbytes, n * sum_k * 4)
    for a in layers:
        for b in layers:
            d = svcca(exact.load(0, a), exact.load(0, b)).mean - svcca(small.load(0, a), small.load(0, b)).mean
            assert abs(float(d)) < 1e-3


def test_int12_similarity_on_real_activations(svhn_pair, mnist_pair, tmp_path) -> None:
    """The 1e-3 claim of the int12 encoding on real layers (SVHN fc 200 neurons x 1,000
    images, MNIST logits x 10,000 images, two networks each), keep 0.99 and every direction."""
    for name, (a, b) in {"svhn": svhn_pair, "mnist": mnist_pair}.items():
        for keep in (0.99, 10**6):
            exact = RepresentationStore(tmp_path / f"{name}{keep}f", encoding="float32", keep=keep)
            small = RepresentationStore(tmp_path / f"{name}{keep}q", keep=keep)
            acts = {"a": torch.from_numpy(a).float(), "b": torch.from_numpy(b).float()}
            exact.add(acts, step=0)
            small.add(acts, step=0)
            ref = svcca(exact.load(0, "a"), exact.load(0, "b")).mean
            got = svcca(small.load(0, "a"), small.load(0, "b")).mean
            assert abs(float(ref) - float(got)) < 1e-3, (name, keep, float(ref), float(got))


def test_reopen_and_extend(tmp_path) -> None:
    a = RepresentationStore(tmp_path, keep=4)
    a.add(_acts(0), step=0, fraction=0.0)
    a.add(_acts(1), step=50, fraction=1.0)
    a.close()
    b = RepresentationStore(tmp_path)  # settings come from the index
    assert b.settings["keep"] == 4
    assert [c.step for c in b.checkpoints] == [0, 50]
    b.add({"fc": torch.randn(200, 5), "head": torch.randn(200, 3)}, step=25, fraction=0.5)
    b.close()
    with pytest.raises(ValueError, match="`keep`"):
        RepresentationStore(tmp_path, keep=0.5)
    c = RepresentationStore(tmp_path)
    assert [ck.step for ck in c.checkpoints] == [0, 25, 50]
    assert c.layers == ["conv1", "fc", "head"]
    assert c.checkpoint(25).layers == ("fc", "head")
    assert c.final.step == 50 and c.nearest(0.4).step == 25
    torch.testing.assert_close(c.load(0, "fc").basis, a.load(0, "fc").basis)  # a closed store still reads
    with pytest.raises(ValueError, match="`step` 25 is already stored"):
        c.add(_acts(2), step=25)
    with pytest.raises(ValueError, match="100 datapoints but the store holds 200"):
        c.add(_acts(2, n=100), step=60)


def test_interrupted_write_is_not_a_checkpoint(tmp_path, monkeypatch) -> None:
    import svcca_torch.store as store_module

    store = RepresentationStore(tmp_path)
    store.add(_acts(0), step=0)
    real_write = store_module._write_payload
    calls = {"n": 0}

    def dying_write(f, payload):
        calls["n"] += 1
        if calls["n"] == 2:  # the process dies while writing the second layer
            f.write(b"half")
            raise KeyboardInterrupt
        return real_write(f, payload)

    monkeypatch.setattr(store_module, "_write_payload", dying_write)
    with pytest.raises(KeyboardInterrupt):
        store.add(_acts(1), step=5)
    monkeypatch.setattr(store_module, "_write_payload", real_write)
    assert not list(tmp_path.rglob("*.tmp"))  # no half-written file left under a real name
    store.close()
    reopened = RepresentationStore(tmp_path)
    assert [c.step for c in reopened.checkpoints] == [0]
    assert [c.step for c in store.checkpoints] == [0]
    # the step can be written again, and the first layer's orphan file is replaced
    reopened.add(_acts(1), step=5)
    assert [c.step for c in RepresentationStore(tmp_path, read_only=True).checkpoints] == [0, 5]


def test_damaged_file_is_named(tmp_path) -> None:
    store = RepresentationStore(tmp_path)
    store.add(_acts(0), step=3)
    store.close()
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
    reopened.close()
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
    store.close()
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
    assert store.archive_after(40) is None
    store.close()
    # the main store reopens cleanly and can store the resumed run's steps again
    again = RepresentationStore(tmp_path)
    assert [c.step for c in again.checkpoints] == [0, 10]
    again.add(_acts(99), step=20)
    assert [c.step for c in RepresentationStore(tmp_path, read_only=True).checkpoints] == [0, 10, 20]
    everything = again.archive_after(-1)
    assert len(again) == 0 and everything.name.endswith("-all")
    assert [c.step for c in RepresentationStore(everything).checkpoints] == [0, 10, 20]


def test_archive_survives_a_crash_before_the_originals_are_removed(tmp_path, monkeypatch) -> None:
    import svcca_torch.store as store_module

    store = RepresentationStore(tmp_path)
    for step in (0, 10, 20):
        store.add(_acts(step), step=step)
    want = store.load(20, "conv1").basis.clone()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(store_module, "_remove_originals", crash)
    with pytest.raises(KeyboardInterrupt):
        store.archive_after(10)
    monkeypatch.undo()
    store.close()
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


# ----------------------------------------------------------------------------- one writer
_HOLD = """
import sys, time
from svcca_torch.store import RepresentationStore
store = RepresentationStore(sys.argv[1])
print("ready", flush=True)
time.sleep(120)
"""


def test_a_second_writer_process_is_refused_with_the_holders_pid(tmp_path) -> None:
    """Two processes writing one store lost one's checkpoints silently; now the second is
    refused, naming the first's PID, while readers still open it. A killed writer's lock
    goes with it."""
    import subprocess
    import sys

    RepresentationStore(tmp_path).add(_acts(0), step=0)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError, match=rf"open for writing by process {proc.pid}\b.*read_only=True"):
            RepresentationStore(tmp_path)
        reader = RepresentationStore(tmp_path, read_only=True)  # never blocks
        assert [c.step for c in reader.checkpoints] == [0]
        reader.load(0, "fc")
        with pytest.raises(ValueError, match="read_only=True"):
            reader.add(_acts(1), step=5)
    finally:
        proc.kill()
        proc.wait()
    store = RepresentationStore(tmp_path)  # the kernel dropped the killed holder's lock
    store.add(_acts(1), step=5)
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    store.close()


def test_a_second_writer_in_one_process_is_refused_naming_the_holder(tmp_path) -> None:
    """Two store objects of one process shared the lock: two DynamicsTrackers on one run
    folder mixed the captures of two models. Now the second is refused while the first is
    open (whatever path spelling reaches the folder), naming the folder and where the first
    was opened; readers are unaffected, and closing (or dropping) the first lets one in."""
    import gc

    a = RepresentationStore(tmp_path / "store")
    a.add(_acts(0), step=0)
    (tmp_path / "alias").symlink_to(tmp_path / "store")
    for spelling in (tmp_path / "store", tmp_path / "alias", tmp_path / "store" / ".." / "store"):
        with pytest.raises(StoreLockedError, match=r"already open for writing in this process") as err:
            RepresentationStore(spelling)
        assert str(spelling) in str(err.value) and "test_store.py" in str(err.value)  # where `a` was opened
    reader = RepresentationStore(tmp_path / "alias", read_only=True)
    assert [c.step for c in reader.checkpoints] == [0]
    a.close()
    b = RepresentationStore(tmp_path / "alias")
    b.add(_acts(1), step=10)
    a.close()  # closing the first again does not release the second's lock
    with pytest.raises(StoreLockedError):
        RepresentationStore(tmp_path / "store")
    del b
    gc.collect()
    c = RepresentationStore(tmp_path / "store")
    assert [ck.step for ck in c.checkpoints] == [0, 10]
    c.close()
    with pytest.raises(ValueError, match="closed"):
        a.add(_acts(3), step=30)


def test_writer_removes_what_killed_writes_left(tmp_path) -> None:
    store = RepresentationStore(tmp_path)
    store.add(_acts(0), step=0)
    store.add(_acts(1), step=10)
    archive = store.archive_after(0)
    store.close()
    entry = json.loads((tmp_path / INDEX_NAME).read_text())["checkpoints"][0]["files"]["fc"]
    step_dir = (tmp_path / entry["file"]).parent
    leftovers = [
        step_dir / ".001-fc.q12.99999999.tmp",  # a kill during a layer file's write
        tmp_path / ".index.json.99999998.tmp",  # a kill during the index's write
        step_dir / "007-gone.pt",  # a layer written by an add that never reached the index
        tmp_path / "step_000000500" / "000-conv1.pt",  # a whole unlisted checkpoint
    ]
    for p in leftovers:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x" * 10)
    half_archive = tmp_path / "superseded" / "20260101T000000Z-after-3"  # a killed archive_after
    (half_archive / "step_000000010").mkdir(parents=True)
    (half_archive / "step_000000010" / "000-conv1.pt").write_bytes(b"x")
    RepresentationStore(tmp_path, read_only=True)  # a reader changes nothing
    assert all(p.exists() for p in leftovers) and half_archive.exists()
    reopened = RepresentationStore(tmp_path)
    assert not any(p.exists() for p in leftovers)
    assert not half_archive.exists() and not (tmp_path / "step_000000500").exists()
    assert [c.step for c in reopened.checkpoints] == [0]
    reopened.load(0, "fc")
    reopened.load(0, "conv1")
    assert [c.step for c in RepresentationStore(archive).checkpoints] == [10]  # complete archives stay


# ----------------------------------------------------------------------------- index schema
def _edit(folder, edit) -> None:
    path = folder / INDEX_NAME
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))


def _no_files(i):
    del i["checkpoints"][0]["files"]


def _short_layers(i):
    i["layers"] = i["layers"][:1]


def _outside(i):
    i["checkpoints"][0]["files"]["fc"]["file"] = "../../x"


def _absolute(i):
    i["checkpoints"][0]["files"]["fc"]["file"] = "/etc/passwd"


def _duplicate(i):
    i["checkpoints"][1]["step"] = i["checkpoints"][0]["step"]


def _text_step(i):
    i["checkpoints"][0]["step"] = "0"


def _float_step(i):
    i["checkpoints"][0]["step"] = 1.5


def _bad_keep(i):
    i["settings"]["keep"] = "all"


def _not_a_dict(i):
    i["checkpoints"][0] = [1, 2]


def _more_directions_than_datapoints(i):  # what a crafted file would need to make decoding allocate k x k
    i["checkpoints"][0]["files"]["fc"]["k"] = i["checkpoints"][0]["files"]["fc"]["n"] + 1


BAD_INDEXES = {
    "no files": (_no_files, "no 'files'"),
    "shortened layers": (_short_layers, "(not in|missing from) 'layers'"),
    "path outside": (_outside, "inside the store"),
    "absolute path": (_absolute, "inside the store"),
    "duplicate steps": (_duplicate, "listed twice"),
    "text step": (_text_step, "not an int"),
    "float step": (_float_step, "not an int"),
    "bad keep": (_bad_keep, "settings"),
    "checkpoint not an object": (_not_a_dict, "not an object"),
    "more directions than datapoints": (_more_directions_than_datapoints, "more directions than its 200 datapoints"),
}


def _two_checkpoints(folder):
    store = RepresentationStore(folder)
    store.add(_acts(0), step=0)
    store.add(_acts(1), step=10)
    store.close()


@pytest.mark.parametrize("case", list(BAD_INDEXES))
def test_structurally_edited_index_is_one_clear_error(tmp_path, case) -> None:
    """A damaged index raised KeyError/TypeError deep inside (or read a file outside the
    store); now opening it says what is wrong, in one line, for readers and writers."""
    edit, needle = BAD_INDEXES[case]
    _two_checkpoints(tmp_path)
    _edit(tmp_path, edit)
    for read_only in (True, False):
        with pytest.raises(StoreCorruptError, match=needle) as err:
            RepresentationStore(tmp_path, read_only=read_only)
        assert INDEX_NAME in str(err.value) and "\n" not in str(err.value)


def test_a_link_out_of_the_store_is_not_read(tmp_path) -> None:
    _two_checkpoints(tmp_path)
    entry = json.loads((tmp_path / INDEX_NAME).read_text())["checkpoints"][0]["files"]["fc"]
    path = tmp_path / entry["file"]
    outside = tmp_path.parent / f"{tmp_path.name}-outside.pt"
    outside.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(outside)
    store = RepresentationStore(tmp_path, read_only=True)
    with pytest.raises(StoreCorruptError, match="outside the store"):
        store.load(0, "fc")


# ----------------------------------------------------------------------------- nothing outside the folder
def _files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _precious(folder) -> dict:
    """A folder outside the store, with files and a sub-folder (no index.json) of its own."""
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_bytes(b"my notes")
    (folder / "000-conv1.pt").write_bytes(b"named like a layer file")
    (folder / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return _files(folder)


def _link_fc_file_out(store_dir, outside) -> None:
    entry = json.loads((store_dir / INDEX_NAME).read_text())["checkpoints"][0]["files"]["fc"]
    path = store_dir / entry["file"]
    (outside / "fc-copy.q12").write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(outside / "fc-copy.q12")


LINKS = {
    "step dir": lambda d, out: (d / "step_000000500").symlink_to(out),
    "superseded": lambda d, out: (d / "superseded").symlink_to(out),
    "archive": lambda d, out: ((d / "superseded").mkdir(), (d / "superseded" / "20260101T000000Z-all").symlink_to(out)),
    "listed layer file": _link_fc_file_out,
    "unlisted layer file": lambda d, out: (d / "step_000000000" / "009-extra.q12").symlink_to(out / "000-conv1.pt"),
    "temporary file": lambda d, out: (d / ".index.json.99999999.tmp").symlink_to(out / "notes.txt"),
    "index": lambda d, out: ((out / "index.json").write_bytes((d / INDEX_NAME).read_bytes()),
                             (d / INDEX_NAME).unlink(), (d / INDEX_NAME).symlink_to(out / "index.json")),
    "lock": lambda d, out: ((d / LOCK_NAME).unlink(), (d / LOCK_NAME).symlink_to(out / "notes.txt")),
}


@pytest.mark.parametrize("link", list(LINKS))
def test_a_link_in_the_store_is_refused_and_nothing_outside_changes(tmp_path, link) -> None:
    """Opening for writing followed links: a `step_*` link to an outside folder had every
    file there deleted, a `superseded` link every sub-folder without an index.json. Now a
    link where the store keeps its files makes opening for writing fail with one line naming
    it and the fix; the outside files stay byte-identical and readers still open the store."""
    store_dir, outside = tmp_path / "store", tmp_path / "outside"
    _precious(outside)
    _two_checkpoints(store_dir)
    LINKS[link](store_dir, outside)
    before = _files(outside)
    for _ in range(2):  # the second try is refused alike: the first released its lock
        with pytest.raises(StoreCorruptError, match=r"cannot be opened for writing: .* is a symbolic link .*"
                                                    r"Remove it or use another folder") as err:
            RepresentationStore(store_dir)
        assert "\n" not in str(err.value)
    assert _files(outside) == before
    if link not in ("listed layer file", "index"):
        assert [c.step for c in RepresentationStore(store_dir, read_only=True).checkpoints] == [0, 10]


def test_writes_never_reach_a_file_hard_linked_or_linked_into_the_store(tmp_path) -> None:
    """The writer wrote its PID into a hard-linked `.lock`, changing the file elsewhere
    (refused now), and wrote through a link at its own temporary file name. Layer files and
    the index are written to a new temporary file and renamed, which replaces the store's
    directory entry: a file hard-linked there keeps its bytes."""
    store_dir, outside = tmp_path / "store", tmp_path / "outside"
    _precious(outside)
    _two_checkpoints(store_dir)
    (store_dir / LOCK_NAME).unlink()
    os.link(outside / "notes.txt", store_dir / LOCK_NAME)
    with pytest.raises(StoreCorruptError, match=r"\.lock' has 2 hard links .*Remove it or use another folder"):
        RepresentationStore(store_dir)
    (store_dir / LOCK_NAME).unlink()
    # hard links to outside files where the store writes next: the index and an unlisted layer file
    (outside / "index.json").write_bytes((store_dir / INDEX_NAME).read_bytes())
    (store_dir / INDEX_NAME).unlink()
    os.link(outside / "index.json", store_dir / INDEX_NAME)
    (store_dir / "step_000000020").mkdir()
    os.link(outside / "000-conv1.pt", store_dir / "step_000000020" / "000-conv1.q12")
    before = _files(outside)
    store = RepresentationStore(store_dir)
    # a link at this process's temporary name for the index
    (store_dir / f".{INDEX_NAME}.{os.getpid()}.tmp").symlink_to(outside / "notes.txt")
    store.add(_acts(2), step=20)
    store.archive_after(10)
    store.add(_acts(3), step=20)
    store.close()
    assert _files(outside) == before
    reader = RepresentationStore(store_dir, read_only=True)
    assert [c.step for c in reader.checkpoints] == [0, 10, 20]
    reader.load(20, "conv1")


def test_entries_the_store_did_not_write_are_left_alone_with_one_warning(tmp_path) -> None:
    """Opening for writing deleted every unlisted file in a step folder and every folder
    without an index.json in `superseded/`, whatever their names. Now only entries named as
    the store names them are cleaned; the rest stays, reported in one warning."""
    _two_checkpoints(tmp_path)
    odd = {
        tmp_path / "step_000000000" / "notes.txt": b"notes",
        tmp_path / "step_000000000" / ".DS_Store": b"finder",
        tmp_path / "step_000000000" / "mine" / "x.bin": b"x",
        tmp_path / "step_000000700" / "README": b"readme",
        tmp_path / "superseded" / "my-results" / "table.csv": b"1,2",
        tmp_path / "superseded" / "20260101T000000Z-after-3" / "step_000000010" / "keep me.txt": b"kept",
        tmp_path / "my_notes.md": b"the user's own file, not the store's business",
    }
    for path, data in odd.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with pytest.warns(UserWarning, match=r"left alone 6 entries .* that the store did not write") as caught:
        store = RepresentationStore(tmp_path)
    assert len([w for w in caught if "left alone" in str(w.message)]) == 1
    archive = store.archive_after(-1)  # moves only the listed layer files
    store.close()
    assert all(path.read_bytes() == data for path, data in odd.items())
    assert [c.step for c in RepresentationStore(archive, read_only=True).checkpoints] == [0, 10]


# ----------------------------------------------------------------------------- reading
def test_a_file_declaring_another_shape_is_refused_before_it_is_decoded(tmp_path, monkeypatch) -> None:
    """A 380 KB .q12 file declaring k = 40,000 made load() decode it (a 6.4 GB, then a
    12.8 GB Gram matrix) before comparing with the index; now its declared shape is checked
    against the index first, and decoding is never reached."""
    import svcca_torch.store as store_module

    store = RepresentationStore(tmp_path)
    store.add(_acts(0), step=0)
    store.close()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    entry = index["checkpoints"][0]["files"]["fc"]
    n, k = 1, 40_000
    data = (store_module._MAGIC + json.dumps({"shape": [n, k], "n_neurons": 5, "k": k}).encode() + b"\n"
            + bytes(8 * k + 3 * ((n * k + 1) // 2)))  # consistent with its own header
    (tmp_path / entry["file"]).write_bytes(data)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))

    class Decoded(BaseException):  # not an Exception: load() cannot report it as damage
        pass

    def decode(*args, **kwargs):
        raise Decoded

    monkeypatch.setattr(store_module, "decode_basis", decode)
    reader = RepresentationStore(tmp_path, read_only=True)
    with pytest.raises(StoreCorruptError, match=rf"{entry['file']}' is damaged: it declares a basis of shape "
                                                rf"\(1, 40000\) where the index says \(200, {entry['k']}\)"):
        reader.load(0, "fc")


def test_a_reader_opening_while_a_writer_archives_reads_the_new_index(tmp_path, monkeypatch) -> None:
    """A read-only open racing archive_after reported damage (2 of 2,000 opens): it read the
    index, the writer then rewrote it and removed the moved files, and the reader found them
    missing. The same interleaving, made deterministic: the archive runs right after the
    reader has read the index."""
    writer = RepresentationStore(tmp_path)
    for step in (0, 10, 20, 30):
        writer.add(_acts(step), step=step)
    real = RepresentationStore._read_index
    archived = []

    def read_then_archive(self, path):
        index = real(self, path)
        if self.read_only and not archived:
            archived.append(writer.archive_after(10))
        return index

    monkeypatch.setattr(RepresentationStore, "_read_index", read_then_archive)
    reader = RepresentationStore(tmp_path, read_only=True)
    assert archived[0] is not None
    assert [c.step for c in reader.checkpoints] == [0, 10]
    reader.load(10, "fc")


def test_a_reader_loading_what_a_writer_moved_or_rewrote_is_not_told_damage(tmp_path) -> None:
    """A reader opened before archive_after (and a step stored again) found a missing file
    or another SHA-256 and reported damage; now it rereads the index and loads the current
    file, or says the checkpoint left the store. Damage under an unchanged index is still damage."""
    writer = RepresentationStore(tmp_path)
    for step in (0, 10, 20, 30):
        writer.add(_acts(step), step=step)
    reader = RepresentationStore(tmp_path, read_only=True)
    writer.archive_after(10)
    writer.add(_acts(99), step=20)
    with pytest.raises(ValueError, match=r"step 30 left the store .* archive_after") as err:
        reader.load(30, "fc")
    assert not isinstance(err.value, StoreCorruptError)
    assert [c.step for c in reader.checkpoints] == [0, 10, 20]  # the reader now holds the new index
    writer.archive_after(10)
    writer.add(_acts(98), step=20)
    torch.testing.assert_close(reader.load(20, "fc").basis, writer.load(20, "fc").basis, atol=0, rtol=0)
    entry = json.loads((tmp_path / INDEX_NAME).read_text())["checkpoints"][0]["files"]["fc"]
    path = tmp_path / entry["file"]
    data = path.read_bytes()
    path.write_bytes(bytes(b ^ 0xFF if i == 100 else b for i, b in enumerate(data)))
    with pytest.raises(StoreCorruptError, match="SHA-256 does not match"):
        reader.load(0, "fc")


def test_an_unusable_device_is_blamed_on_the_device_not_the_store(tmp_path) -> None:
    """`learning_dynamics(store, device="cuda")` without a GPU said a store file was damaged
    (the decoding's RuntimeError); now the device is checked where it enters."""
    from svcca_torch.dynamics import learning_dynamics, similarity_to_previous

    store = RepresentationStore(tmp_path)
    store.add(_acts(0), step=0)
    store.add(_acts(1), step=10)
    bad = f"cuda:{torch.cuda.device_count() + 7}"  # on no machine this runs on
    calls = {
        "load": lambda: store.load(0, "fc", device=bad),
        "learning_dynamics": lambda: learning_dynamics(store, device=bad),
        "similarity_to_previous": lambda: similarity_to_previous(store, device=bad),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"`device` '{bad}' cannot be used .*'cpu'") as err:
            call()
        assert not isinstance(err.value, StoreCorruptError) and "damaged" not in str(err.value), name
    with pytest.raises(ValueError, match="`device` must be a torch.device"):
        store.load(0, "fc", device="gpu0")


# ----------------------------------------------------------------------------- formats
def test_a_0_1_store_opens_reads_and_extends(tmp_path) -> None:
    """A store written by svcca-torch 0.1 (format 1: float32 bases, one datapoint count)
    opens and reads exactly; adding to it upgrades the index to format 2 and keeps float32."""
    store = RepresentationStore(tmp_path, encoding="float32")
    store.add(_acts(0), step=0)
    want = store.load(0, "conv1").basis.clone()
    store.close()

    def to_v1(index):  # what 0.1 wrote
        index["version"] = 1
        del index["settings"]["encoding"]
        index["n_datapoints"] = 200
        for ck in index["checkpoints"]:
            for e in ck["files"].values():
                del e["encoding"], e["n"]

    _edit(tmp_path, to_v1)
    old = RepresentationStore(tmp_path, read_only=True)
    assert old.settings["encoding"] == "float32" and old.datapoints == {"conv1": 200, "fc": 200}
    assert torch.equal(old.load(0, "conv1").basis, want)
    writer = RepresentationStore(tmp_path)
    writer.add(_acts(1), step=10)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["version"] == 2 and index["n_datapoints"] == {"conv1": 200, "fc": 200}
    assert torch.equal(RepresentationStore(tmp_path, read_only=True).load(0, "conv1").basis, want)


def test_a_store_of_a_newer_format_says_upgrade_not_damaged(tmp_path) -> None:
    """A store written by a newer svcca-torch was reported as damaged; now the error says
    which format and to upgrade. An unknown version that is no newer format stays damage."""
    from svcca_torch.store import FORMAT_VERSION, StoreVersionError

    _two_checkpoints(tmp_path)
    _edit(tmp_path, lambda i: i.update(version=FORMAT_VERSION + 1))
    for read_only in (True, False):
        newer = rf"newer svcca-torch \(format {FORMAT_VERSION + 1}.*upgrade"
        with pytest.raises(StoreVersionError, match=newer) as err:
            RepresentationStore(tmp_path, read_only=read_only)
        assert "damaged" not in str(err.value) and not isinstance(err.value, StoreCorruptError)
    _edit(tmp_path, lambda i: i.update(version="2"))
    with pytest.raises(StoreCorruptError, match="damaged: unknown format version '2'"):
        RepresentationStore(tmp_path, read_only=True)


def test_layers_with_their_own_datapoint_counts(tmp_path) -> None:
    """Layers pooled to their own grid have different row counts: each is kept per layer
    and checked per layer across checkpoints; same-layer analyses work, cross-layer
    matrices say why they cannot."""
    from svcca_torch.dynamics import learning_dynamics, paired_similarity, similarity_to_previous

    g = torch.Generator().manual_seed(0)
    store = RepresentationStore(tmp_path)
    first = {"early": torch.randn(400, 8, generator=g), "deep": torch.randn(100, 6, generator=g)}
    store.add(first, step=0)
    store.add({n: v + 0.3 * torch.randn(v.shape, generator=g) for n, v in first.items()}, step=10)
    assert store.datapoints == {"early": 400, "deep": 100} and store.n_datapoints is None
    with pytest.raises(ValueError, match=r"`activations\['deep'\]` has 400 datapoints but the store holds 100"):
        store.add({"deep": torch.randn(400, 6, generator=g)}, step=20)
    curves = learning_dynamics(store, full=[]).curves()
    # the last capture against itself: 1 to float32 precision (int12 bases are re-orthonormalised)
    assert curves.values.shape == (2, 2) and bool((curves.values[-1] > 1 - 8 * 400**0.5 * F32).all())
    prev = similarity_to_previous(store)
    direct = paired_similarity(store.load_checkpoint(0), store.load_checkpoint(10))
    torch.testing.assert_close(prev.values[1], torch.tensor([direct["early"], direct["deep"]], dtype=torch.float64),
                               atol=8 * 400**0.5 * F32, rtol=0)
    with pytest.raises(ValueError, match=r"different datapoint counts .*full=\[\]"):
        learning_dynamics(store)
    assert RepresentationStore(tmp_path, read_only=True).datapoints == {"early": 400, "deep": 100}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI is CPU-only; run on a GPU machine)")
def test_reduce_encode_and_analyse_on_the_gpu(tmp_path) -> None:
    """store.add reduces and encodes on the activations' device; learning_dynamics(device=)
    decodes and compares there; both agree with the CPU to float32 accuracy."""
    from svcca_torch.dynamics import learning_dynamics

    gpu, cpu = RepresentationStore(tmp_path / "gpu"), RepresentationStore(tmp_path / "cpu")
    for step in (0, 10, 20):
        acts = _acts(step, n=500)
        gpu.add({k: v.cuda() for k, v in acts.items()}, step=step)
        cpu.add(acts, step=step)
    assert gpu.load(20, "fc", device="cuda").basis.is_cuda
    on_gpu = learning_dynamics(gpu, full=[20], device="cuda")
    assert not on_gpu.matrices.is_cuda
    # the same files decoded and compared on either device: float32 rounding only
    here = learning_dynamics(gpu, full=[20])
    assert float((on_gpu.matrices - here.matrices).nan_to_num().abs().max()) < 8 * 500**0.5 * F32
    # reduced on either device: each int12 result within 1e-3 of its float32 bases, which
    # agree across devices to the kernels' float32 claim (1e-4)
    on_cpu = learning_dynamics(cpu, full=[20])
    assert float((on_gpu.matrices - on_cpu.matrices).nan_to_num().abs().max()) < 2e-3 + 1e-4


def test_a_new_run_with_another_probe_size_after_archiving_everything(tmp_path):
    """archive_after(-1) (a fresh run in an old run's folder) also drops the old run's
    per-layer datapoint counts: the new run may use another probe size."""
    g = torch.Generator().manual_seed(0)
    store = RepresentationStore(tmp_path / "store")
    store.add({"fc": torch.randn(100, 6, generator=g)}, step=0)
    store.add({"fc": torch.randn(100, 6, generator=g)}, step=5)
    store.archive_after(-1)
    assert store.checkpoints == [] and store.datapoints == {}
    store.add({"fc": torch.randn(120, 6, generator=g)}, step=0)  # was: "has 120 datapoints but the store holds 100"
    assert store.datapoints == {"fc": 120}
    store.archive_after(0)  # keeping a checkpoint keeps its count
    assert store.datapoints == {"fc": 120}
    store.close()
