"""The ``svcca-torch`` command line, through its entry point: numbers match the library,
bad input gives one line on stderr and exit status 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import svcca_torch as sv
from svcca_torch.cli import main
from svcca_torch.store import RepresentationStore


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    """Two correlated layers (500 datapoints; 30 and 20 neurons) in several file formats."""
    d = tmp_path_factory.mktemp("arrays")
    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 10))
    a = z @ rng.normal(size=(10, 30)) + 0.1 * rng.normal(size=(500, 30))
    b = z @ rng.normal(size=(10, 20)) + 0.1 * rng.normal(size=(500, 20))
    np.save(d / "a.npy", a)
    np.save(d / "b.npy", b)
    np.save(d / "aT.npy", a.T)
    np.save(d / "bT.npy", b.T)
    np.save(d / "c400.npy", rng.normal(size=(400, 20)))
    np.save(d / "vector.npy", a[:, 0])
    np.savez(d / "two.npz", first=a, second=b)
    np.savez(d / "one.npz", only=b)
    torch.save(torch.from_numpy(b), d / "b.pt")
    np.savetxt(d / "b.csv", b, delimiter=",")
    (d / "text.npy").write_text("not an array\n")
    return d, a, b


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line_error(rc, err):
    lines = err.strip().splitlines()
    assert rc == 2
    assert len(lines) == 1, err
    assert lines[0].startswith("svcca-torch: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_compare_prints_the_library_value(arrays, capsys):
    d, a, b = arrays
    rc, out, err = _run(capsys, "compare", d / "a.npy", d / "b.npy")
    assert rc == 0, err
    expected = sv.svcca(torch.from_numpy(a), torch.from_numpy(b), 0.99, dtype=torch.float64).mean
    line = [l for l in out.splitlines() if l.startswith("svcca")][0]
    assert float(line.split()[1]) == pytest.approx(expected, abs=1e-6)


def test_compare_all_methods_json(arrays, capsys):
    d, a, b = arrays
    rc, out, err = _run(capsys, "compare", d / "a.npy", d / "b.npy", "--method", "all", "--json", "--keep", "8")
    assert rc == 0, err
    res = json.loads(out)
    x, y = torch.from_numpy(a), torch.from_numpy(b)
    assert res["datapoints"] == 500 and res["svcca_k"] == [8, 8]
    assert res["svcca"] == pytest.approx(sv.svcca(x, y, 8).mean, abs=1e-9)
    assert res["cca"] == pytest.approx(sv.cca(x, y).mean, abs=1e-9)
    assert res["pwcca"] == pytest.approx(sv.pwcca(x, y), abs=1e-9)
    assert res["cka"] == pytest.approx(sv.linear_cka(x, y), abs=1e-9)


def test_neurons_first_layout_transposes(arrays, capsys):
    d, _, _ = arrays
    rc, out_t, err = _run(capsys, "compare", d / "aT.npy", d / "bT.npy", "--layout", "neurons-first", "--method", "all", "--json")
    assert rc == 0, err
    rc, out, _ = _run(capsys, "compare", d / "a.npy", d / "b.npy", "--method", "all", "--json")
    t, n = json.loads(out_t), json.loads(out)
    assert t["shape_a"] == [500, 30]
    for m in ("svcca", "cca", "pwcca", "cka"):
        assert t[m] == pytest.approx(n[m], abs=1e-9)


def test_other_file_formats_give_the_same_number(arrays, capsys):
    d, _, _ = arrays
    values = []
    for b in ("b.npy", "b.pt", "b.csv", "one.npz", "two.npz:second"):
        rc, out, err = _run(capsys, "compare", d / "a.npy", d / b, "--json")
        assert rc == 0, (b, err)
        values.append(json.loads(out)["svcca"])
    assert max(values) - min(values) < 1e-9


def test_wrong_orientation_is_one_line_with_the_fix(arrays, capsys):
    d, _, _ = arrays
    # one (neurons, datapoints) array with the default layout
    line = _one_line_error(*_run(capsys, "compare", d / "a.npy", d / "bT.npy")[::2])
    assert "500 datapoints" in line and "transposed" in line
    # both saved neurons-first but read with the default layout: the fix is the flag
    line = _one_line_error(*_run(capsys, "compare", d / "aT.npy", d / "bT.npy")[::2])
    assert "--layout neurons-first" in line


def test_mismatched_datapoints_is_one_line(arrays, capsys):
    d, _, _ = arrays
    line = _one_line_error(*_run(capsys, "compare", d / "a.npy", d / "c400.npy")[::2])
    assert "500 datapoints" in line and "400" in line


@pytest.mark.parametrize(
    "name, needle",
    [("missing.npy", "no such file"), ("text.npy", "not a NumPy"), ("two.npz", "pick one"),
     ("vector.npy", "1-D"), ("two.npz:third", "no array 'third'")],
)
def test_bad_files_are_one_line(arrays, capsys, name, needle):
    d, _, _ = arrays
    line = _one_line_error(*_run(capsys, "compare", d / name, d / "b.npy")[::2])
    assert needle in line


def test_bad_keep_is_one_line(arrays, capsys):
    d, _, _ = arrays
    line = _one_line_error(*_run(capsys, "compare", d / "a.npy", d / "b.npy", "--keep", "1.5")[::2])
    assert "keep" in line


def test_report_renders_a_store(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    store = RepresentationStore(tmp_path / "run" / "store", keep=0.99)
    base = {f"layer{i}": torch.randn(300, 12, generator=g) for i in range(3)}
    for c, step in enumerate((0, 10, 20)):
        noise = 1.0 - c / 2  # converges to the last capture
        store.add({n: v + noise * torch.randn(300, 12, generator=g) for n, v in base.items()},
                  step=step, fraction=step / 20)
    rc, out, err = _run(capsys, "report", tmp_path / "run")
    assert rc == 0, err
    folder = tmp_path / "run"
    for name in ("learning_dynamics.png", "convergence.png", "to_previous.png"):
        assert (folder / name).stat().st_size > 1000
    mats = json.loads((folder / "matrices.json").read_text())
    assert mats["layers"] == ["layer0", "layer1", "layer2"] and mats["steps"] == [0, 10, 20]
    m = torch.tensor(mats["matrices"])
    assert m.shape == (3, 3, 3)
    # final vs itself: float32 bases, n-term sums exact to ~sqrt(n) eps (8x margin)
    assert torch.allclose(m[-1].diagonal(), torch.ones(3, dtype=m.dtype), atol=8 * 300**0.5 * torch.finfo(torch.float32).eps)
    assert "3 checkpoints x 3 layers" in out


def test_report_without_a_store_is_one_line(tmp_path, capsys):
    line = _one_line_error(*_run(capsys, "report", tmp_path)[::2])
    assert "no SVCCA store" in line
    line = _one_line_error(*_run(capsys, "report", tmp_path / "absent")[::2])
    assert "no such folder" in line


def test_demo_smoke_ends_with_figures_and_tensorboard(tmp_path, capsys):
    rc, out, err = _run(capsys, "demo", "--smoke", "--out", tmp_path)
    assert rc == 0, err
    last = out.strip().splitlines()[-1]
    # the interpreter's full path: works without activating the virtual environment
    assert last.startswith(f"open the logs with:  {sys.executable} -m tensorboard.main --logdir ")
    assert Path(last.split("--logdir ")[1]).is_dir()
    grid = [l for l in out.splitlines() if l.startswith("learning-dynamics grid (convnet):")][-1]
    assert Path(grid.split(": ", 1)[1]).is_file()
    assert "cka (random)" in out and "pwcca (random)" in out


def test_console_script_errors_without_traceback(arrays):
    exe = shutil.which("svcca-torch") or str(Path(sys.executable).with_name("svcca-torch"))
    if not Path(exe).exists():
        pytest.skip("the svcca-torch console script is not installed (pip install -e .)")
    d, _, _ = arrays
    env = {k: v for k, v in os.environ.items() if k != "SVCCA_TORCH_TRACEBACK"}
    proc = subprocess.run([exe, "compare", str(d / "a.npy"), str(d / "c400.npy")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_report_renders_superseded_archives_into_their_own_folders(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    store = RepresentationStore(tmp_path / "run" / "store")
    acts = lambda: {"layer0": torch.randn(100, 6, generator=g)}  # noqa: E731
    for step in (0, 10, 20, 30):
        store.add(acts(), step=step)
    first = store.archive_after(20)  # holds step 30
    store.add(acts(), step=30)
    second = store.archive_after(10)  # holds steps 20, 30
    rc, out, err = _run(capsys, "report", tmp_path / "run")
    assert rc == 0, err
    steps = {folder: json.loads((folder / "matrices.json").read_text())["steps"]
             for folder in (tmp_path / "run", first, second)}
    assert steps == {tmp_path / "run": [0, 10], first: [30], second: [20, 30]}


@pytest.mark.parametrize("case", ["no files", "shortened layers", "path outside", "duplicate steps", "text step"])
def test_report_on_an_edited_index_is_one_line(tmp_path, capsys, case):
    """A structurally edited index printed a traceback (exit 1); now one line, exit 2."""
    from test_store import BAD_INDEXES, _edit, _two_checkpoints

    edit, needle = BAD_INDEXES[case]
    _two_checkpoints(tmp_path / "run" / "store")
    _edit(tmp_path / "run" / "store", edit)
    line = _one_line_error(*_run(capsys, "report", tmp_path / "run")[::2])
    assert "index.json" in line and "damaged" in line
    assert not (tmp_path / "run" / "matrices.json").exists()


def test_report_computes_full_matrices_for_the_grid_only_unless_asked(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    store = RepresentationStore(tmp_path / "store")
    for step in range(0, 60, 10):
        store.add({f"l{i}": torch.randn(200, 8, generator=g) for i in range(3)}, step=step)
    store.close()
    rc, out, err = _run(capsys, "report", tmp_path / "store", "--fractions", "0", "1")
    assert rc == 0, err
    def matrices():  # a folder named `store` renders into its parent; NaN is written as null
        m = json.loads((tmp_path / "matrices.json").read_text())["matrices"]
        return torch.tensor(np.array(m, dtype=float), dtype=torch.float64)

    m = matrices()
    shown = [0, 5]  # the captures nearest 0% and 100%
    assert not bool(torch.isnan(m[shown]).any())
    assert bool(torch.isnan(m[1:5][:, ~torch.eye(3, dtype=torch.bool)]).all())  # null off the diagonal
    assert not bool(torch.isnan(torch.diagonal(m, dim1=1, dim2=2)).any())  # every to-final value
    rc, out, err = _run(capsys, "report", tmp_path / "store", "--all-matrices")
    assert rc == 0, err
    m_all = matrices()
    assert not bool(torch.isnan(m_all).any())
    torch.testing.assert_close(m_all[shown], m[shown], atol=0, rtol=0)  # the same computation


def test_report_bad_device_is_one_line(tmp_path, capsys):
    with RepresentationStore(tmp_path / "store") as store:
        store.add({"l": torch.randn(50, 4)}, step=0)
    line = _one_line_error(*_run(capsys, "report", tmp_path / "store", "--device", "gpu0")[::2])
    assert "--device" in line
    if not torch.cuda.is_available():
        line = _one_line_error(*_run(capsys, "report", tmp_path / "store", "--device", "cuda")[::2])
        assert "no CUDA device" in line


@pytest.mark.parametrize("method", ["svcca", "cca", "pwcca", "cka"])
def test_kernel_errors_name_the_file_and_complex_is_refused(arrays, tmp_path, capsys, method):
    d, a, b = arrays
    np.save(tmp_path / "cplx.npy", a.astype(np.complex64))
    np.save(tmp_path / "const.npy", np.full((500, 10), 0.1, np.float32))
    cplx, const = tmp_path / "cplx.npy", tmp_path / "const.npy"
    line = _one_line_error(*_run(capsys, "compare", cplx, d / "b.npy", "--method", method)[::2])
    assert f"`{cplx}` is complex" in line
    line = _one_line_error(*_run(capsys, "compare", d / "a.npy", const, "--method", method)[::2])
    assert f"`{const}` has zero variance" in line and "`x`" not in line and "`y`" not in line


class _KeepNothing:
    """A SummaryWriter stand-in: the run's BoardLogger only writes the run folder's PNGs."""

    def add_scalar(self, *args, **kwargs):
        pass

    add_image = add_text = add_custom_scalars = flush = add_scalar


def _run_folder(run_dir: Path) -> Path:
    """A small training run as SVCCACallback with a TensorBoardLogger leaves it: the tracker's
    store and svcca_summary.json, the figures drawn once by BoardLogger.log_final(save_dir=)."""
    from svcca_torch.board import BoardLogger

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.ReLU(), torch.nn.Linear(24, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4))
    g = torch.Generator().manual_seed(0)
    probe, x = torch.randn(240, 8, generator=g), torch.randn(64, 8, generator=g)
    y = (x[:, :4].argmax(1))
    tracker = sv.DynamicsTracker(model, probe, run_dir=run_dir, every_n_steps=3, max_overhead=None, figures=False)
    tracker.start()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(1, 13):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        tracker.maybe_capture(step)
    analysis = tracker.finish(12)
    BoardLogger(_KeepNothing(), "svcca", tracker.recorder.layers).log_final(analysis.dynamics, save_dir=run_dir)
    return run_dir


def _pixels(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(path)


def test_report_keeps_the_runs_own_figures_and_redraws_them_identically(tmp_path, capsys):
    """Issue 22: `report` without --out used to overwrite the run's figures in another layout.
    Now it names the run's own figures and leaves them untouched; with --out (or where the run's
    are missing or stale) it draws them with the run's own code: the same pixels."""
    run = _run_folder(tmp_path / "run")
    figs = {n: run / f"{n}.png" for n in ("learning_dynamics", "convergence")}
    before = {n: p.read_bytes() for n, p in figs.items()}
    rc, out, err = _run(capsys, "report", run)
    assert rc == 0, err
    assert {n: p.read_bytes() for n, p in figs.items()} == before  # not redrawn
    line = [l for l in out.splitlines() if "figures" in l][0]
    assert "the run's own, up to date with the store" in line
    assert str(figs["learning_dynamics"]) in line and str(figs["convergence"]) in line
    assert json.loads((run / "matrices.json").read_text())["steps"] == json.loads(
        (run / "svcca_summary.json").read_text())["steps"]
    # another --fractions cannot change the run's grid: said, not redrawn
    rc, out, err = _run(capsys, "report", run, "--fractions", "0", "1")
    assert rc == 0 and "pass --out DIR" in out and figs["learning_dynamics"].read_bytes() == before["learning_dynamics"]

    # --out: drawn there, as the run draws them (same layout, fonts, pixels); the run's untouched
    rc, out, err = _run(capsys, "report", run, "--out", tmp_path / "elsewhere")
    assert rc == 0, err
    for n, p in figs.items():
        drawn = tmp_path / "elsewhere" / p.name
        assert "drawn now" in out
        np.testing.assert_array_equal(_pixels(drawn), _pixels(p))
        assert p.read_bytes() == before[n]

    # a capture after the run's figures: they are stale, so report redraws them in place
    with RepresentationStore(run / "store") as store:
        last = store.load_checkpoint(store.checkpoints[-1])
        g = torch.Generator().manual_seed(1)
        store.add({n: torch.randn(b.n_datapoints, b.n_neurons, generator=g) for n, b in last.items()}, step=99,
                  fraction=1.0)
    rc, out, err = _run(capsys, "report", run)
    assert rc == 0, err
    assert "drawn now: the run's own were missing or older than its last capture" in out
    assert figs["learning_dynamics"].read_bytes() != before["learning_dynamics"]
    rc, out, err = _run(capsys, "report", run, "--out", tmp_path / "again")  # the same drawing
    assert rc == 0, err
    for p in figs.values():
        np.testing.assert_array_equal(_pixels(tmp_path / "again" / p.name), _pixels(p))
