"""BoardLogger: what TensorBoard actually keeps and shows, read back with TensorBoard's own
reader at the size guidance its server uses by default (10 images per tag)."""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Dict, List

import pytest
import torch

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing import data_ingester  # noqa: E402
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from svcca_torch.board import BoardLogger, select_checkpoints  # noqa: E402
from svcca_torch.dynamics import learning_dynamics, paired_similarity  # noqa: E402
from svcca_torch.functional.svcca import svd_reduce  # noqa: E402
from svcca_torch.store import RepresentationStore  # noqa: E402

# deliberately not alphabetical in depth order (fc1 < fc alphabetically would put them first)
LAYERS = ["net.features.block1", "net.features.block2", "net.features.block3", "net.fc1", "net.fc"]
SHORT = ["block1", "block2", "block3", "fc1", "fc"]
CAPTURES = 31  # more than TensorBoard keeps per tag
TOTAL = 300


def _accumulate(logdir: Path) -> EventAccumulator:
    """TensorBoard's server defaults (data_ingester), i.e. `tensorboard --logdir` without flags."""
    acc = EventAccumulator(str(logdir), size_guidance=data_ingester.DEFAULT_SIZE_GUIDANCE,
                           tensor_size_guidance=data_ingester.DEFAULT_TENSOR_SIZE_GUIDANCE)
    acc.Reload()
    return acc


def _layer_steps(logdir: Path, run: str, tag: str) -> List[int]:
    """The steps of ``tag`` in one layer's run (``<logdir>/<name>/NN_short``)."""
    return [e.step for e in _accumulate(logdir / run).Tensors(tag)]


def _by_plugin(acc: EventAccumulator) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for tag in acc.Tags()["tensors"]:
        out.setdefault(acc.SummaryMetadata(tag).plugin_data.plugin_name, []).append(tag)
    return out


def _png_size(png: bytes):
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])  # IHDR width, height


def _activations(g: torch.Generator, final, noise, f: float) -> Dict[str, torch.Tensor]:
    acts = {}
    for depth, name in enumerate(LAYERS):
        w = min(1.0, f * (1.0 + 1.5 * (len(LAYERS) - depth)))  # lower layers settle first
        acts[name] = w * final[name] + (1 - w) * noise[name] + 0.02 * (1 - w) * torch.randn(
            final[name].shape, generator=g)
    return acts


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A synthetic training run logged through BoardLogger with a real SummaryWriter."""
    root = tmp_path_factory.mktemp("board")
    g = torch.Generator().manual_seed(0)
    final = {n: torch.randn(200, 5 + 2 * i, generator=g) for i, n in enumerate(LAYERS)}
    noise = {n: torch.randn(200, 5 + 2 * i, generator=g) for i, n in enumerate(LAYERS)}
    store = RepresentationStore(root / "store")
    writer = SummaryWriter(str(root / "tb"))
    board = BoardLogger(writer, "svcca", LAYERS, total_steps=TOTAL)
    steps = [round(TOTAL * i / (CAPTURES - 1)) for i in range(CAPTURES)]
    prev = None
    mid_training = None
    for c, step in enumerate(steps):
        f = step / TOTAL
        bases = {n: svd_reduce(a, 0.99) for n, a in _activations(g, final, noise, f).items()}
        store.add(bases, step=step, fraction=f)
        sims = paired_similarity(prev, bases) if prev is not None else {}
        board.log_capture(step, sims, previous=prev, current=bases, final=c == CAPTURES - 1)
        frozen = min(3, c // 10)
        board.log_freeze(step, frozen, backward_flops_saved=0.2 * frozen, newly_frozen=["x"] if c == 10 else (),
                         n_groups=len(LAYERS))
        if c == CAPTURES // 2:  # what TensorBoard shows while training is still running
            writer.flush()
            mid_training = _accumulate(root / "tb")
        prev = bases
    dyn = learning_dynamics(store)
    written = board.log_final(dyn)
    board.log_freeze_note(steps[-1], "frozen-output cache: the frozen forward was skipped for 10 of 12 samples")
    writer.close()
    return {"acc": _accumulate(root / "tb"), "mid": mid_training, "board": board, "steps": steps, "dyn": dyn,
            "written": written, "logdir": root / "tb"}


def test_every_image_tag_keeps_exactly_what_was_chosen(run):
    acc, board = run["acc"], run["board"]
    images = _by_plugin(acc)["images"]
    assert sorted(images) == sorted(board.images_written)
    for tag in images:
        steps = [e.step for e in acc.Tensors(tag)]
        assert 1 <= len(steps) <= 10, tag
        # the reservoir dropped nothing: every image written is there, in order
        assert steps == board.images_written[tag], tag
        for e in acc.Tensors(tag):
            width, height = _png_size(e.tensor_proto.string_val[2])
            assert width >= 600, (tag, width)
            assert int(e.tensor_proto.string_val[0]) == width


def test_to_final_heatmaps_start_at_step_0_and_end_at_the_final_state(run):
    acc, steps = run["acc"], run["steps"]
    shown = [e.step for e in acc.Tensors("svcca/dynamics/to_final_matrix")]
    assert shown[0] == 0 and shown[-1] == steps[-1]
    assert len(shown) == 10  # 31 captures that keep changing: the budget is used
    dyn = run["dyn"]
    chosen = [dyn.steps.index(s) for s in shown]
    for a in chosen:  # no two alike
        for b in chosen:
            if a < b:
                assert float((dyn.matrices[a] - dyn.matrices[b]).abs().max()) > 0.01
    # chosen where the values change: the layers settle by 60% of training, so every
    # heatmap but the final state's is of the first 60%
    assert all(s <= 0.6 * TOTAL for s in shown[:-1])
    late = dyn.nearest(0.75)
    assert dyn.steps[late] not in shown  # 75% is the converged final state again
    assert float((dyn.matrices[late] - dyn.matrices[-1]).abs().max()) <= 0.01
    assert [e.step for e in acc.Tensors("svcca/dynamics/grid")] == [steps[-1]]
    assert [e.step for e in acc.Tensors("svcca/dynamics/to_final_curves")] == [steps[-1]]


def test_freeze_events_text_lists_freezes_then_the_cache_note(run):
    acc, steps = run["acc"], run["steps"]
    events = [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors("svcca/freeze/events/text_summary")]
    assert [s for s, _ in events] == [steps[10], steps[-1]]
    assert events[0][1].startswith(f"step {steps[10]}: froze x (1 of {len(LAYERS)} groups frozen")
    assert events[1][1] == f"step {steps[-1]}: frozen-output cache: the frozen forward was skipped for 10 of 12 samples"


def test_live_images_appear_while_training_runs(run):
    mid = run["mid"]
    live = [e.step for e in mid.Tensors("svcca/live/to_previous_matrix")]
    assert live and live[0] == run["steps"][1]  # from the first capture that has a previous one
    assert max(live) < run["steps"][-1]
    curves = [e.step for e in run["acc"].Tensors("svcca/live/to_previous_curves")]
    assert curves[-1] == run["steps"][-1] and len(curves) <= 10


def test_few_tags_and_no_scalar_chart_that_defaults_would_misdraw(run):
    """Issue 22: at TensorBoard's defaults (smoothing 0.6, outliers ignored) front-loaded
    per-layer similarities are misdrawn as scalars (the smoothing stretches the last change
    over the sparse late captures, the outlier cut drops the first comparisons): by default
    they are images only, and the scalars are the freeze step functions; Custom Scalars shows
    only categories with data."""
    acc, logdir = run["acc"], run["logdir"]
    tags = [t for ts in _by_plugin(acc).values() for t in ts if t != "custom_scalars__config__"]
    assert tags and all(t.startswith("svcca/") for t in tags)
    assert sorted(_by_plugin(acc)["scalars"]) == ["svcca/freeze/backward_flops_saved", "svcca/freeze/frozen_groups"]
    assert not (logdir / "svcca").exists()  # no per-layer runs
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["svcca: freeze training"]
    text = [t for t in _by_plugin(acc)["text"] if t.startswith("svcca/layers")]
    table = acc.Tensors(text[0])[0].tensor_proto.string_val[0].decode()
    assert "| `block1` | `net.features.block1` |" in table


def test_layer_scalars_are_one_chart_with_a_run_per_layer(tmp_path):
    """``layer_scalars=True``: the per-layer similarity is one tag, written by every layer to
    its own run (``s/NN_short``, sorted by depth): one chart, a line per layer, coloured apart."""
    writer = SummaryWriter(str(tmp_path))
    board = BoardLogger(writer, "s", LAYERS, total_steps=100, layer_scalars=True)
    m = torch.eye(len(LAYERS), dtype=torch.float64)
    for step in (0, 10, 20):
        board.log_capture(step, {n: 0.5 for n in LAYERS} if step else {}, matrix=m)
    board.close()
    writer.close()
    runs = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert runs == [f"{i:02d}_{s}" for i, s in enumerate(SHORT)]
    for r in runs:
        assert _layer_steps(tmp_path, f"s/{r}", "s/to_previous") == [10, 20]
    assert "s/to_previous" not in _by_plugin(_accumulate(tmp_path)).get("scalars", [])


def test_freeze_scalars_from_step_0_count_and_fraction_apart(run):
    acc, steps = run["acc"], run["steps"]
    count = acc.Tensors("svcca/freeze/frozen_groups")
    assert [e.step for e in count] == steps
    assert float(torch.tensor(count[0].tensor_proto.float_val)[0]) == 0.0
    saved = acc.Tensors("svcca/freeze/backward_flops_saved")
    assert [e.step for e in saved] == steps
    layout = run["board"].layout()
    freeze = layout["svcca: freeze training"]
    assert len(freeze) == 2 and all(len(chart[1]) == 1 for chart in freeze.values())


def test_layout_one_multiline_chart_for_the_layer_scalars(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    assert not [k for k in BoardLogger(writer, "svcca", LAYERS).layout() if "per layer" in k]
    layout = BoardLogger(writer, "svcca", LAYERS, layer_scalars=True).layout()
    (per_layer,) = [v for k, v in layout.items() if k.startswith("svcca: per layer")]
    assert [c for c in per_layer.values()] == [["Multiline", ["^svcca/to_previous$"]]]
    other = BoardLogger(object.__new__(_NoLogDir), "svcca", LAYERS, layer_scalars=True)  # no runs: tags
    assert [c for k, v in other.layout().items() if "per layer" in k for c in v.values()] == [
        ["Multiline", ["^svcca/to_previous/"]]]
    writer.close()


class _NoLogDir:
    """A writer without a ``log_dir`` (not a torch SummaryWriter)."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    add_image = add_text = add_custom_scalars = add_scalar


def test_live_images_bounded_without_known_fractions(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    board = BoardLogger(writer, "probe", ["a", "b"])
    m = torch.eye(2, dtype=torch.float64)
    for c in range(200):
        board.log_capture(c, {"a": 0.5, "b": 0.6} if c else {}, matrix=m, final=c == 199)
    writer.close()
    acc = _accumulate(tmp_path)
    for tag in ("probe/live/to_previous_matrix", "probe/live/to_previous_curves"):
        steps = [e.step for e in acc.Tensors(tag)]
        assert len(steps) <= 10 and steps[0] == 1 and steps[-1] == 199
        assert steps == board.images_written[tag]


def test_select_checkpoints_skips_alike_and_keeps_ends():
    base = torch.rand(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mats = torch.stack([base + 0.1 * k for k in range(5)] + [base + 0.4] * 20)  # a plateau of identical ones
    fractions = [i / 24 for i in range(25)]
    chosen = select_checkpoints(mats, fractions)
    assert chosen[0] == 0 and chosen[-1] == 24
    assert chosen == [0, 1, 2, 3, 24]  # one of the plateau (the last), the changes before it
    assert len(select_checkpoints(torch.rand(40, 3, 3, dtype=torch.float64), [i / 39 for i in range(40)])) == 10
    with pytest.raises(ValueError, match="max_images"):
        select_checkpoints(mats, fractions, max_images=1)


def test_bad_arguments_name_themselves(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    with pytest.raises(ValueError, match="`writer`"):
        BoardLogger(object(), "s", ["a"])
    with pytest.raises(ValueError, match="`name`"):
        BoardLogger(writer, "a/b", ["a"])
    with pytest.raises(ValueError, match="`layers`"):
        BoardLogger(writer, "s", ["a", "a"])
    board = BoardLogger(writer, "s", ["a"])
    with pytest.raises(ValueError, match="`to_previous`"):
        board.log_capture(0, {"zz": 0.5})
    writer.close()


def test_two_loggers_on_one_writer_keep_both_layouts(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    writer = SummaryWriter(str(tmp_path))
    first = BoardLogger(writer, "svcca", ["a", "b"])
    second = BoardLogger(writer, "probe2", ["c"])
    first.log_freeze(0, 0)  # a layout category is written with its first data
    second.log_freeze(0, 0)
    writer.close()
    acc = _accumulate(tmp_path)
    # TensorBoard reads the last layout of a run (downsample=1)
    last = acc.Tensors("custom_scalars__config__")[-1]
    layout = layout_pb2.Layout()
    layout.ParseFromString(last.tensor_proto.string_val[0])
    titles = [c.title for c in layout.category]
    assert any(t.startswith("svcca:") for t in titles) and any(t.startswith("probe2:") for t in titles)


def test_resume_keeps_each_tag_within_the_budget(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    m = torch.eye(2, dtype=torch.float64)
    board = BoardLogger(writer, "s", ["a", "b"], total_steps=100)
    for step in range(0, 61, 5):
        board.log_capture(step, {"a": 0.5, "b": 0.5} if step else {}, matrix=m)
    state = board.state_dict()
    before = {k: list(v) for k, v in board.images_written.items()}
    assert max(before["s/live/to_previous_curves"]) > 40
    # resumed from the checkpoint at step 40: TensorBoard's Python reader keeps the images the
    # first run wrote after it, so they still count, and new ones come after them
    resumed = BoardLogger(writer, "s", ["a", "b"], total_steps=100)
    resumed.load_state_dict(state, resume_step=40)
    assert resumed.images_written == before
    assert [h["step"] for h in resumed.state_dict()["history"]] == list(range(0, 41, 5))
    for step in range(45, 101, 5):
        resumed.log_capture(step, {"a": 0.6, "b": 0.6}, matrix=m, final=step == 100)
    writer.close()
    acc = _accumulate(tmp_path)
    for tag in ("s/live/to_previous_matrix", "s/live/to_previous_curves"):
        steps = [e.step for e in acc.Tensors(tag)]
        assert steps == resumed.images_written[tag] and len(steps) <= 10 and steps[-1] == 100


def test_plain_training_loop_example_smoke(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from experiments import tensorboard_views

    lines: List[str] = []
    res = tensorboard_views.run(tensorboard_views.build_parser().parse_args(["--smoke", "--out", str(tmp_path)]),
                                log=lines.append)
    assert res["captures"] == 5  # step 0, every 43 // 3 = 14 steps (14, 28, 42), the last step (43)
    acc = _accumulate(Path(res["logdir"]))
    images = _by_plugin(acc)["images"]
    assert "svcca/dynamics/to_final_matrix" in images and "svcca/live/to_previous_curves" in images
    assert [e.step for e in acc.Tensors("svcca/freeze/frozen_groups")][0] == 0
    assert lines[-1].startswith(f"open the logs with:  {sys.executable} -m tensorboard.main --logdir ")


def test_the_same_capture_twice_logs_once_and_draws_the_final(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    board = BoardLogger(writer, "s", ["a", "b"], total_steps=1000, layer_scalars=True)
    m = torch.eye(2, dtype=torch.float64)
    for step in (0, 100, 200, 300):
        board.log_capture(step, {"a": 0.5, "b": 0.7} if step else {}, matrix=m)
    assert board.images_written["s/live/to_previous_curves"][-1] == 200  # 300 (30%) is not a live point
    assert board.log_capture(300, {"a": 0.5, "b": 0.7}, matrix=m, final=True)  # end of training, same step
    writer.close()
    acc = _accumulate(tmp_path)
    assert _layer_steps(tmp_path, "s/00_a", "s/to_previous") == [100, 200, 300]  # not twice at 300
    assert [e.step for e in acc.Tensors("s/live/to_previous_curves")][-1] == 300


def test_full_checkpoints_are_chosen_from_the_cheap_curves(run, tmp_path):
    """The end-of-run analysis computes full matrices only where a heatmap is shown: chosen
    from the to-final curves (the diagonal), then log_final picks its heatmaps among them."""
    from svcca_torch.board import full_checkpoints
    from svcca_torch.dynamics import LearningDynamics

    dyn, steps = run["dyn"], run["steps"]
    full = full_checkpoints(dyn.curves())
    n = len(steps)
    assert full == sorted(set(full)) and full[0] == 0 and full[-1] == n - 1
    assert len(full) <= 10  # the heatmaps (the grid image's panels are among them)
    # the paper's grid as an option: its checkpoints get full matrices too
    paper = full_checkpoints(dyn.curves(), grid=(0.0, 0.35, 0.75, 1.0))
    assert len(paper) <= 10 + 2
    for f in (0.0, 0.35, 0.75, 1.0):
        assert min(range(n), key=lambda i: abs(dyn.fractions[i] - f)) in paper
    # the same from a plain (checkpoints, layers) tensor with fractions
    assert full_checkpoints(dyn.to_final(), dyn.fractions) == full
    with pytest.raises(ValueError, match="fractions"):
        full_checkpoints(dyn.to_final())
    # the curves change most early on (lower layers settle first): the choice follows them
    assert sum(1 for c in full if dyn.fractions[c] < 0.5) > sum(1 for c in full if dyn.fractions[c] >= 0.5)

    # a LearningDynamics with full matrices only there (what the tracker makes)
    partial = dyn.matrices.clone()
    off = ~torch.eye(len(LAYERS), dtype=torch.bool)
    rest = [c for c in range(n) if c not in full]
    partial[torch.tensor(rest)[:, None], off] = float("nan")
    cheap = LearningDynamics(dyn.layers, dyn.steps, dyn.fractions, partial, full)
    writer = SummaryWriter(str(tmp_path))
    board = BoardLogger(writer, "svcca", LAYERS, total_steps=TOTAL)
    written = board.log_final(cheap)
    writer.close()
    shown = written["svcca/dynamics/to_final_matrix"]
    assert shown[0] == 0 and shown[-1] == steps[-1] and len(shown) <= 10
    assert {steps.index(s) for s in shown} <= set(full)
    acc = _accumulate(tmp_path)
    assert [e.step for e in acc.Tensors("svcca/dynamics/to_final_matrix")] == shown


def test_select_checkpoints_works_on_curves():
    curves = torch.tensor([[0.1, 0.2], [0.5, 0.4], [0.5, 0.4], [0.9, 0.95], [1.0, 1.0]], dtype=torch.float64)
    assert select_checkpoints(curves, [0, 0.25, 0.5, 0.75, 1.0]) == [0, 1, 3, 4]  # 2 is alike 1
    with pytest.raises(ValueError, match="checkpoints, layers"):
        select_checkpoints(torch.zeros(3), [0, 0.5, 1])


@pytest.mark.parametrize("captures", [2, 3])
def test_scalars_only_capture_and_the_end_views(tmp_path, captures):
    """``images=False`` logs a capture's scalars without live images; ``log_final`` then
    draws the last live curves only if more than one capture was compared with a previous
    one (a single comparison is the first point of the to-final curves)."""
    g = torch.Generator().manual_seed(0)
    store = RepresentationStore(tmp_path / "store")
    final = {n: torch.randn(120, 4, generator=g) for n in ("a", "b")}
    writer = SummaryWriter(str(tmp_path / "tb"))
    board = BoardLogger(writer, "s", ["a", "b"], total_steps=100, layer_scalars=True)
    steps = [0, 50, 100] if captures == 3 else [0, 100]
    for k, step in enumerate(steps):
        acts = {n: x + (1 - step / 100) * torch.randn(x.shape, generator=g) for n, x in final.items()}
        store.add(acts, step=step, fraction=step / 100)
        sims = {"a": 0.5, "b": 0.7} if k else {}
        last = k == len(steps) - 1
        drawn = board.log_capture(step, sims, matrix=torch.eye(2, dtype=torch.float64), final=last, images=not last)
        assert not (last and drawn)
    written = board.log_final(learning_dynamics(store))
    writer.close()
    acc = _accumulate(tmp_path / "tb")
    assert _layer_steps(tmp_path / "tb", "s/00_a", "s/to_previous") == steps[1:]
    if captures == 3:
        assert [e.step for e in acc.Tensors("s/live/to_previous_curves")] == [50, 100]
        assert written["s/live/to_previous_curves"] == [100]
    else:
        assert "s/live/to_previous_curves" not in _by_plugin(acc)["images"]
        assert "s/live/to_previous_curves" not in written


# ----------------------------------------------------------------------------------- issue 22: the views
def test_live_images_skip_points_where_nothing_moved(tmp_path):
    """Live images are refreshed at front-loaded points (1, 2, 5, 10% ...) only when some
    layer moved since the last one: a run settled by 10% keeps its slots for the end."""
    writer = SummaryWriter(str(tmp_path))
    board = BoardLogger(writer, "s", ["a", "b"], total_steps=1000)
    m = torch.eye(2, dtype=torch.float64)
    for step in (0, 10, 20, 50, 100, 200, 350, 500, 750, 1000):
        moving = step <= 100
        board.log_capture(step, ({"a": 0.5, "b": 0.7} if moving else {"a": 1.0, "b": 0.999999}) if step else {},
                          matrix=m, final=step == 1000)
    writer.close()
    assert board.images_written["s/live/to_previous_curves"] == [10, 20, 50, 100, 1000]


def test_grid_is_chosen_where_the_curves_change_or_at_the_papers_fractions(run):
    from svcca_torch.board import grid_checkpoints
    from svcca_torch.plotting import DEFAULT_FRACTIONS

    dyn, steps = run["dyn"], run["steps"]
    grid = grid_checkpoints(dyn)
    assert len(grid) == 4 and grid[0] == 0 and grid[-1] == len(steps) - 1
    # every layer settles by 40% of training: the two middle panels are of that part
    assert all(dyn.fractions[c] <= 0.4 for c in grid[1:-1])
    paper = grid_checkpoints(dyn, fractions=DEFAULT_FRACTIONS)
    assert [dyn.steps[c] for c in paper] == [0, 100, 220, 300]  # nearest 0/35/75/100% of 300 steps


def test_titles_tell_captures_apart_and_name_each_freeze(tmp_path, monkeypatch):
    """Issue 22: three early heatmaps were all titled "(0%)"; titles now carry the step and a
    precise fraction, and, once layers are frozen, each one's freeze step; curves mark them."""
    import svcca_torch.plotting as board_module  # every view's figure is drawn by these functions
    from svcca_torch.plotting import FROZEN_MARK, format_fraction

    titles: Dict[str, List[str]] = {"matrix": [], "grid": []}
    freezes: List[Dict[str, int]] = []
    real = {k: getattr(board_module, k) for k in ("plot_similarity_matrix", "plot_convergence",
                                                  "plot_learning_dynamics")}

    def matrix(*args, **kwargs):
        titles["matrix"].append(kwargs["title"])
        return real["plot_similarity_matrix"](*args, **kwargs)

    def curves(*args, **kwargs):
        freezes.append(dict(kwargs.get("freeze_steps") or {}))
        return real["plot_convergence"](*args, **kwargs)

    def grid(*args, **kwargs):
        fig = real["plot_learning_dynamics"](*args, **kwargs)
        titles["grid"] += [ax.get_title() for ax in fig.axes if ax.images]
        return fig

    monkeypatch.setattr(board_module, "plot_similarity_matrix", matrix)
    monkeypatch.setattr(board_module, "plot_convergence", curves)
    monkeypatch.setattr(board_module, "plot_learning_dynamics", grid)
    g = torch.Generator().manual_seed(0)
    final = {n: torch.randn(200, 5 + 2 * i, generator=g) for i, n in enumerate(LAYERS)}
    noise = {n: torch.randn(200, 5 + 2 * i, generator=g) for i, n in enumerate(LAYERS)}
    store = RepresentationStore(tmp_path / "store")
    writer = SummaryWriter(str(tmp_path / "tb"))
    total = 860
    board = BoardLogger(writer, "svcca", LAYERS, total_steps=total)
    prev = None
    for step in (0, 1, 2, 4, 9, 17, 40, 90, 200, 430, 860):
        bases = {n: svd_reduce(a, 0.99) for n, a in _activations(g, final, noise, min(1.0, 8 * step / total)).items()}
        store.add(bases, step=step)
        # a freeze at a capture's step comes first (the capture records the frozen network)
        board.log_freeze(step, int(step >= 17) + int(step >= 40), newly_frozen=[LAYERS[0]] if step == 17 else
                         [LAYERS[1]] if step == 40 else ())
        board.log_capture(step, paired_similarity(prev, bases) if prev is not None else {}, previous=prev,
                          current=bases, final=step == total)
        prev = bases
    board.log_final(learning_dynamics(store))
    writer.close()
    heads = [t.split("\n")[0] for t in titles["matrix"]]
    assert "step 1 (0.12%) vs step 0" in heads and "step 9 (1.0%) vs step 4" in heads
    early = [h for h in heads if h.endswith("vs end of training") and int(h.split()[1]) < 0.05 * total]
    assert len(early) >= 3 and len(set(early)) == len(early)  # early heatmaps told apart (all were "(0%)")
    for h in heads:
        step = int(h.split()[1])
        assert h.startswith(f"step {step} ({format_fraction(step / total)})")
    for t in titles["matrix"] + titles["grid"]:
        step = int(t.split()[1])
        frozen = [s for s, at in (("block1", 17), ("block2", 40)) if at <= step]
        if "vs" in t or "\n" in t:
            assert all(s in t for s in frozen) and (FROZEN_MARK in t) == bool(frozen), t
    assert any(f"{FROZEN_MARK} frozen: block1 at 17, block2 at 40" in t for t in titles["matrix"])
    assert freezes[-1] == {LAYERS[0]: 17, LAYERS[1]: 40}  # the curves mark both freezes
    assert board.state_dict()["frozen_at"] == {LAYERS[0]: 17, LAYERS[1]: 40}  # kept on resume
