"""RepresentationStore: round trip, reopen/extend, atomic writes, damaged files."""
from __future__ import annotations

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
    """float32 bases give SVCCA to the kernels' float32 accuracy (1e-4, README); int12
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


def test_two_writers_in_one_process_keep_both_checkpoints(tmp_path) -> None:
    """Two store objects of one process share the lock and each rereads the index before
    writing: before, the second one's add rewrote the index without the first one's step."""
    a = RepresentationStore(tmp_path)
    b = RepresentationStore(tmp_path)
    a.add(_acts(0), step=0)
    b.add(_acts(1), step=10)
    a.add(_acts(2), step=20)
    assert [c.step for c in RepresentationStore(tmp_path, read_only=True).checkpoints] == [0, 10, 20]
    with pytest.raises(ValueError, match="`step` 10 is already stored"):
        a.add(_acts(3), step=10)
    a.close()
    b.close()
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
    _edit(tmp_path, lambda i: i.update(version=3))
    with pytest.raises(StoreCorruptError, match="unknown format version 3"):
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
