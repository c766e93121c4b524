"""The paper-reproduction experiments, end to end in smoke mode (tiny budgets on the real
digits), plus their helpers. Each run's JSON must have the expected keys and sane values."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments import class_sensitivity, common, compare_networks, compression, freeze_training, learning_dynamics  # noqa: E402

CONVNET_LAYERS = ["net.features.block1", "net.features.block2", "net.features.block3", "net.features.block4",
                  "net.fc1", "net.fc"]


def _args(module, tmp_path, *extra):
    return module.build_parser().parse_args(["--smoke", "--out", str(tmp_path), *extra])


def _saved_json(res):
    data = json.loads((Path(res["run_dir"]) / "results.json").read_text())
    assert data["experiment"] == res["experiment"]
    return data


# ----------------------------------------------------------------------------- helpers
def test_first_reaching_needs_the_value_to_stay():
    fr = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert common.first_reaching(fr, [0.2, 0.96, 0.9, 0.97, 1.0], 0.95) == 0.75
    assert common.first_reaching(fr, [0.99] * 5, 0.95) == 0.0
    assert common.first_reaching(fr, [0.2, 0.3, 0.4, 0.5, 0.6], 0.95) is None
    assert common.first_reaching(fr, [0.2, float("nan"), 0.99, 0.99, 0.99], 0.95) == 0.5


def test_backward_saved_weights_each_event_by_its_duration():
    events = [{"step": 25, "backward_flops_saved": 0.2}, {"step": 50, "backward_flops_saved": 0.6}]
    # 0.2 for steps 25..50, 0.6 for 50..100 of 100 steps
    assert common.backward_saved(events, 100) == pytest.approx((0.2 * 25 + 0.6 * 50) / 100)
    assert common.backward_saved([], 100) == 0.0
    assert common.backward_saved([{"step": 0, "backward_flops_saved": None}], 10) == 0.0


def test_spearman_and_mean_std():
    assert common.spearman([0, 1, 2, 3], [0.1, 0.2, 0.5, 0.9]) == pytest.approx(1.0)
    assert common.spearman([0, 1, 2, 3], [0.9, 0.5, 0.2, 0.1]) == pytest.approx(-1.0)
    assert common.spearman([0, 1, 2], [1.0, 1.0, 1.0]) is None
    m, s = common.mean_std([1.0, 2.0, 3.0])
    assert (m, s) == (pytest.approx(2.0), pytest.approx(1.0))
    assert common.mean_std([4.0]) == (4.0, 0.0)


def test_every_script_has_help():
    for module in (learning_dynamics, freeze_training, compare_networks, class_sensitivity, compression):
        text = module.build_parser().format_help()
        for option in ("--dataset", "--data-dir", "--download", "--model", "--seed", "--out", "--smoke"):
            assert option in text, (module.__name__, option)


def test_compression_projections_are_exact_where_they_must_be():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, 6, generator=g, dtype=torch.float64)
    x = z @ torch.randn(6, 12, generator=g, dtype=torch.float64) + 0.05 * torch.randn(400, 12, generator=g, dtype=torch.float64)
    y = z @ torch.randn(6, 9, generator=g, dtype=torch.float64) + 0.05 * torch.randn(400, 9, generator=g, dtype=torch.float64)
    maps = compression.projections(x, y, [1, 3, 12], keep=0.99)
    xc = x - x.mean(0)
    eye = torch.eye(12, dtype=torch.float64)
    assert torch.allclose(maps["neurons"][12], eye)
    assert torch.allclose(maps["svd"][12], eye, atol=1e-10)
    assert float(maps["neurons"][1].diagonal().sum()) == 1.0
    for k in (1, 3):
        p = maps["svcca"][k]
        assert torch.linalg.matrix_rank(p) == k
        # a projection of the data: applying it twice changes nothing
        assert torch.allclose(xc @ p @ p, xc @ p, atol=1e-8)
    # the top-3 shared directions keep most of the variance of data built from 6 shared latents
    assert float((xc @ maps["svcca"][3]).var(0).sum()) > 0.3 * float(xc.var(0).sum())


# ----------------------------------------------------------------------------- experiments
def test_learning_dynamics_smoke_with_schedule_freezing(tmp_path):
    res = learning_dynamics.run(_args(learning_dynamics, tmp_path, "--model", "convnet", "--freeze", "schedule"), log=None)
    saved = _saved_json(res)
    m = saved["models"]["convnet"]
    assert m["layers"] == CONVNET_LAYERS
    assert 20.0 < m["test_accuracy"] <= 100.0  # chance is 10%
    assert m["captures"] >= 3
    assert set(m["convergence_fraction"]) == set(CONVNET_LAYERS)
    assert all(v is None or 0.0 <= v <= 1.0 for v in m["convergence_fraction"].values())
    assert m["convergence_fraction"]["net.fc"] is not None  # the final capture is itself
    # stated with its statistic (issue 22), None when the captures cannot order the layers
    assert m["lower_layers_converged_first"] in (True, False, None)
    assert m["hidden_layers"]["lower_layers_converged_first"] in (True, False, None)
    assert m["statement"].startswith("convergence order") and isinstance(m["n_layers"], int)
    assert m["spearman_depth_vs_convergence"] is None or -1.0 <= m["spearman_depth_vs_convergence"] <= 1.0
    # the schedule freezes the lowest group at 25% of training: compute is saved, and bounded
    assert m["freeze"]["events"] and m["freeze"]["events"][0]["groups"] == ["net.features.block1"]
    assert 0.0 < m["freeze"]["backward_compute_saved"] < 1.0
    for fig in ("learning_dynamics", "convergence"):
        assert Path(m["figures"][fig]).stat().st_size > 1000
    assert list(Path(m["tensorboard"]).glob("events.out.tfevents.*"))


def test_freeze_training_smoke_table(tmp_path):
    res = freeze_training.run(_args(freeze_training, tmp_path, "--seeds", "0", "1"), log=None)
    saved = _saved_json(res)
    assert saved["seeds"] == [0, 1]
    assert len(saved["runs"]) == 6
    for r in saved["runs"]:  # what the frozen-output cache did (None: nothing frozen before the last step)
        cache = r["frozen_cache"]
        assert cache is None if r["policy"] == "none" else (cache is None or 0 <= cache["served"] <= cache["lookups"])
    table = saved["table"]
    assert list(table) == ["none", "schedule", "adaptive"]
    assert table["none"]["backward_compute_saved_mean"] == 0.0
    assert table["none"]["accuracy_change_vs_none"] == 0.0
    assert 0.0 < table["schedule"]["backward_compute_saved_mean"] < 1.0
    for row in table.values():
        assert 20.0 < row["test_accuracy_mean"] <= 100.0
        assert row["test_accuracy_std"] >= 0.0 and row["wall_seconds_mean"] > 0.0
    target = saved["target"]
    assert target["met"] == (target["backward_compute_saved"] >= 0.25 and target["accuracy_change_points"] >= -0.5)
    md = (Path(res["run_dir"]) / "table.md").read_text()
    assert md.count("\n") == 5 and "| adaptive |" in md


def test_compare_networks_smoke_beats_random_baseline(tmp_path):
    res = compare_networks.run(_args(compare_networks, tmp_path), log=None)
    saved = _saved_json(res)
    assert saved["seeds"] == [0, 1]
    assert saved["layers"] == CONVNET_LAYERS
    n = len(CONVNET_LAYERS)
    assert torch.tensor(saved["svcca_matrix"]).shape == (n, n)
    assert torch.tensor(saved["cka_matrix"]).shape == (n, n)
    for row in saved["per_layer"]:
        assert set(row["trained"]) == set(compare_networks.METHODS) == set(row["random"])
        for m in compare_networks.METHODS:
            assert 0.0 <= row["random"][m] <= 1.0 + 1e-9 and 0.0 <= row["trained"][m] <= 1.0 + 1e-9
        # two trained networks share far more than random layers of the same shapes
        assert row["trained"]["cka"] > row["random"]["cka"] + 0.1
        assert row["trained"]["svcca"] > row["random"]["svcca"]
    ad = saved["aligned_directions"]
    assert ad["layer"] == "net.fc1"
    assert ad["direction_correlations"][0] >= ad["direction_correlations"][1]
    for fig in saved["figures"].values():
        assert Path(fig).stat().st_size > 1000
    # layers of at most 10 kept directions (the 10 logits; the smoke run's 8-channel blocks) are
    # too narrow for the matrix: flagged in the JSON and the table
    narrow = [r["layer"] for r in saved["per_layer"] if min(r["kept_directions"]) <= 10]
    assert "net.fc" in narrow and "net.fc1" not in narrow
    assert saved["narrow_layers"] == sorted(narrow)
    assert [r["narrow"] for r in saved["per_layer"]] == [r["layer"] in narrow for r in saved["per_layer"]]
    table = compare_networks.format_table(saved["per_layer"])
    assert table.count("\n") == n + 2 and "pwcca (random)" in table
    assert "net.fc *" in table and "net.fc1 *" not in table


def test_comparison_matrix_labels_are_legible_and_mark_narrow_layers():
    layers = ["net.features.block1", "net.fc1", "net.fc"]
    mats = {"SVCCA": torch.rand(3, 3, dtype=torch.float64), "linear CKA": torch.rand(3, 3, dtype=torch.float64)}
    fig = compare_networks._plot_matrices(layers, layers, mats, {"net.fc": "9"})
    ax = fig.axes[0]
    xt = [t.get_text() for t in ax.get_xticklabels()]
    assert xt == ["block1", "fc1", "fc *"]  # short names, the narrow layer starred
    sizes = [t.get_fontsize() for t in ax.get_xticklabels() + ax.get_yticklabels()]
    assert min(sizes) >= 12  # at 110 dpi: >= 18 px text, the old 7 pt labels were 11 px
    assert len(ax.texts) == 9  # each cell's value
    note = fig.get_supxlabel()
    assert "fc: 9 kept directions" in note and "'net.features.'" in note


def test_class_sensitivity_smoke(tmp_path):
    res = class_sensitivity.run(_args(class_sensitivity, tmp_path, "--keep", "1.0", "--captures", "5"), log=None)
    saved = _saved_json(res)
    values = torch.tensor(saved["values"], dtype=torch.float64)
    steps = saved["steps"]
    assert steps[0] == 0 and steps == sorted(set(steps)) and 3 <= len(steps) <= 6  # start, <= 5 captures, end
    assert saved["fractions"][-1] == 1.0
    assert values.shape == (len(steps), 10, len(CONVNET_LAYERS))  # captures, 10 digits, 6 layers
    assert saved["classes"] == [str(c) for c in range(10)]
    assert bool(((values >= 0) & (values <= 1 + 1e-9)).all())
    # with every direction kept, the output layer contains each class's final logit exactly;
    # the activations and their Grams are float32 (eps 1.2e-7), and a canonical correlation
    # of 1 - d comes from a sqrt of 1 - 2d, so allow ~100 eps
    assert torch.allclose(values[-1, :, -1], torch.ones(10, dtype=torch.float64), atol=1e-5)
    assert saved["hidden_layer"] == "net.features.block4"
    assert sorted(saved["classes_learned_first_to_last"]) == sorted(saved["classes"])
    assert all(v is None or 0.0 <= v <= 1.0 for v in saved["learned_at"].values())


def test_compression_smoke(tmp_path):
    res = compression.run(_args(compression, tmp_path), log=None)
    saved = _saved_json(res)
    assert saved["layer"] == "net.fc1" and saved["neurons"] == 32
    full = saved["test_accuracy_full"]
    acc = saved["accuracy"]
    assert set(acc) == {"svcca", "neurons", "svd"}
    # keeping every neuron / every principal direction is the identity map
    assert acc["neurons"]["32"] == full
    assert abs(acc["svd"]["32"] - full) < 0.5
    assert acc["svcca"]["1"] < full and max(acc["svcca"].values()) > acc["svcca"]["1"]
    assert Path(saved["figures"]["compression"]).stat().st_size > 1000


def test_cifar10_missing_gives_one_line_with_the_fix(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(common.ExperimentError) as err:
        compare_networks.run(compare_networks.build_parser().parse_args(
            ["--dataset", "cifar10", "--data-dir", str(empty), "--out", str(tmp_path / "runs")]), log=None)
    msg = str(err.value)
    assert "\n" not in msg and str(empty) in msg and "--download" in msg and "cifar-10-batches-py" in msg
    rc = learning_dynamics.main(["--dataset", "cifar10", "--data-dir", str(empty), "--out", str(tmp_path / "runs")])
    out = capsys.readouterr()
    assert rc == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--download" in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing is written before the data is there


def test_cifar10_branch_runs_on_a_stand_in_dataset(tmp_path, monkeypatch):
    """The CIFAR-10 code path (3x32x32 images, torchvision-style items, Subset, models sized
    for 32x32) end to end, with a small random stand-in for the real data set."""

    class FakeCifar(torch.utils.data.Dataset):
        def __init__(self, n: int, seed: int) -> None:
            g = torch.Generator().manual_seed(seed)
            self.labels = torch.arange(n) % 10
            # a class-dependent colour shift, so there is something to learn
            self.images = torch.randn(n, 3, 32, 32, generator=g) * 0.5 + (self.labels.float() / 5 - 1)[:, None, None, None]

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int):
            return self.images[i], int(self.labels[i])

    calls = []

    def fake_load(data_dir, download=False, train=True, augment=False):
        calls.append((str(data_dir), download, train, augment))
        return FakeCifar(600 if train else 300, 0 if train else 1)

    monkeypatch.setattr(common, "load_cifar10", fake_load)
    args = compare_networks.build_parser().parse_args(
        ["--smoke", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--model", "resnet",
         "--out", str(tmp_path / "runs"), "--baseline-draws", "1", "--epochs", "1"])
    res = compare_networks.run(args, log=None)
    assert (str(tmp_path / "data"), False, True, True) in calls  # augmented training split
    assert (str(tmp_path / "data"), False, True, False) in calls  # plain probe split
    assert res["layers"][0] == "net.stem" and res["layers"][-1] == "net.fc"
    assert res["probe_datapoints"] == 150 and len(res["per_layer"]) == len(res["layers"])
    assert all(0.0 <= a <= 100.0 for a in res["test_accuracy"])


# ----------------------------------------------------------------------------- issue 21: any model
def test_bench_callback_crop_flip_is_the_cifar_recipe_and_seeded():
    from experiments import bench_callback

    x = torch.randn(32, 3, 32, 32)
    out = bench_callback.CropFlip(0, fill=-1.5).augment(x)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), value=-1.5)
    flips = 0
    for i in range(len(x)):  # each image is a 32x32 window of the padded image, or its mirror
        windows = [padded[i, :, a:a + 32, b:b + 32] for a in range(9) for b in range(9)]
        plain = any(torch.equal(w, out[i]) for w in windows)
        mirrored = any(torch.equal(w.flip(-1), out[i]) for w in windows)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 0 < flips < len(x)
    # the same seed gives the same draws (both augmented arms of a seed see the same images)
    assert torch.equal(bench_callback.CropFlip(0, fill=-1.5).augment(x), out)
    assert not torch.equal(bench_callback.CropFlip(1, fill=-1.5).augment(x), out)
    loader, _, probe = bench_callback._data(1, 16, 8, seed=0, augment=True)
    xb, yb = next(iter(loader))
    assert xb.shape == (16, 3, 32, 32) and yb.shape == (16,)
    assert probe.shape == (8, 3, 32, 32)


def test_bench_callback_summary_pairs_augmented_arms_with_their_own_baseline(capsys):
    from experiments import bench_callback

    def run(arm, seed, wall, cpu, acc, frozen=()):
        r = {"arm": arm, "seed": seed, "wall_s": wall, "cpu_s": cpu, "test_accuracy": acc, "frozen": list(frozen)}
        if arm.startswith("adaptive"):
            r.update(callback_s=1.0, callback_cpu_share=0.05, backward_saved=0.5, first_freeze_fraction=0.1,
                     signal=[{"step": 22, "conv1": 0.99}])
        return r

    runs = [run("none", 0, 100, 50, 0.9), run("adaptive", 0, 60, 30, 0.91, ["conv1"]),
            run("none-aug", 0, 120, 60, 0.8), run("adaptive-aug", 0, 90, 45, 0.79, ["conv1"])]
    s = bench_callback.summarise({"runs": runs})
    assert s["arms"]["adaptive"]["wall_ratio"] == pytest.approx(0.6)
    assert s["arms"]["adaptive"]["cpu_ratio"] == pytest.approx(0.6)
    assert s["arms"]["adaptive-aug"]["wall_ratio"] == pytest.approx(0.75)  # against none-aug, not none
    assert s["arms"]["adaptive-aug"]["cpu_ratio"] == pytest.approx(0.75)
    assert s["arms"]["adaptive-aug"]["accuracy_drop_points"] == pytest.approx(1.0)
    assert set(s["augmentation"]) == {"none", "adaptive"}
    assert s["augmentation"]["adaptive"]["augmented"] is s["arms"]["adaptive-aug"]
    with pytest.raises(SystemExit):
        bench_callback.main(["--help"])
    assert "--augment" in capsys.readouterr().out


def test_bench_zoo_reports_each_model_and_goes_on_after_a_failure(tmp_path, monkeypatch):
    from experiments import bench_zoo

    class Broken(torch.nn.Module):  # its forward fails on every input: the tracker's setup meets it
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, ids):
            raise RuntimeError("broken on purpose")

    class Bag(torch.nn.Module):  # mean of token embeddings, two linear layers: recorded by any version
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(bench_zoo.VOCAB, 16)
            self.fc1 = torch.nn.Linear(16, 32)
            self.fc2 = torch.nn.Linear(32, 32)
            self.fc = torch.nn.Linear(32, bench_zoo.CLASSES)

        def forward(self, ids):
            h = torch.relu(self.fc1(self.embed(ids).mean(1)))
            return self.fc(torch.relu(self.fc2(h)))

    monkeypatch.setitem(bench_zoo.ZOO, "broken", (Broken, "text", "adamw"))
    monkeypatch.setitem(bench_zoo.ZOO, "bag", (Bag, "text", "adamw"))
    args = bench_zoo.build_parser().parse_args(
        ["--models", "broken", "bag", "--epochs", "3", "--train", "64", "--probe", "96", "--out", str(tmp_path)])
    res = bench_zoo.run(args, log=lambda s: None)
    by = {r["model"]: r for r in res["models"]}
    assert list(by) == ["broken", "bag"]
    assert by["broken"]["status"] == "failed" and by["broken"]["phase"] in ("setup", "start")
    assert isinstance(by["broken"]["error"], str) and by["broken"]["error"]
    bag = by["bag"]  # after a failure the table goes on: layers, groups, costs and freezes reported
    assert bag["status"] == "ok", bag["error"]
    assert "fc" in bag["layers"] and len(bag["groups"]) >= 2 and bag["steps"] == 6
    assert bag["step_s"] > 0 and bag["capture_vs_step"] > 0 and bag["tracker_vs_training"] > 0
    assert bag["captures"][0]["step"] == 0 and bag["captures"][-1]["step"] == 6
    assert all(isinstance(e["groups"], list) and e["step"] % 2 == 0 for e in bag["frozen"])
    md = (tmp_path / "zoo.md").read_text()
    assert "| broken |" in md and "| bag |" in md and "failed at" in md
    assert json.loads((tmp_path / "zoo.json").read_text())["models"][0]["model"] == "broken"


def test_language_dynamics_quick(tmp_path):
    from experiments import language_dynamics

    args = language_dynamics.build_parser().parse_args(
        ["--quick", "--steps", "16", "--probe-size", "96", "--max-chars", "20000", "--out", str(tmp_path)])
    res = language_dynamics.run(args, log=None)
    saved = _saved_json(res)
    m = saved["models"]["lstm"]
    layers = ["embed.last", "lstm1.last", "lstm2.last", "decoder.last"]
    assert m["layers"] == layers  # explicit layers, in forward order
    assert set(m["convergence_fraction"]) == set(layers) and set(m["chance_level"]) == set(layers)
    assert all(0.0 <= v <= 1.0 for v in m["chance_level"].values())
    assert set(m["weight_change"]) == {"embed", "lstm1", "lstm2", "decoder"}
    assert all(v > 0 for v in m["weight_change"].values())
    assert m["convergence_fraction"]["decoder.last"] is not None  # the final capture is itself
    assert m["captures"] >= 3 and m["held_out_loss"][0]["step"] == 0 and m["held_out_loss"][-1]["step"] == 16
    assert m["final_bits_per_token"] < m["held_out_loss"][0]["bits_per_token"]  # it learned something
    for fig in m["figures"].values():
        assert Path(fig).stat().st_size > 1000
    assert saved["text"]["vocab"] > 30 and saved["text"]["level"] == "char"
    # the word level builds its vocabulary from the training text, rare words as <unk>
    corpus = language_dynamics.Corpus(20000, level="word")
    assert corpus.tokens[0] == "<unk>" and "<eod>" in corpus.tokens and corpus.train.max() < corpus.vocab


def test_language_dynamics_token_readout(tmp_path, monkeypatch):
    from experiments import language_dynamics

    argv = ["--quick", "--readout", "tokens", "--steps", "8", "--probe-size", "64", "--max-chars", "20000",
            "--out", str(tmp_path)]
    if language_dynamics.tokens_supported():  # the recorder takes (N, L, D) outputs as token datapoints
        m = language_dynamics.run(language_dynamics.build_parser().parse_args(argv), log=None)["models"]["lstm"]
        assert m["layers"] == ["embed.layer", "lstm1.layer", "lstm2.layer", "decoder.layer"]
        assert m["convergence_fraction"]["decoder.layer"] is not None
    monkeypatch.setattr(language_dynamics, "tokens_supported", lambda: False)
    with pytest.raises(common.ExperimentError, match="--readout last"):
        language_dynamics.run(language_dynamics.build_parser().parse_args(argv), log=None)
