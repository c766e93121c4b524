"""Figures render (Agg), have the expected panels, and save as PNG."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from svcca_torch.dynamics import LayerCurves, aligned_directions, learning_dynamics, similarity_to_previous
from svcca_torch.plotting import plot_aligned_directions, plot_convergence, plot_learning_dynamics
from svcca_torch.store import RepresentationStore

LAYERS = ["conv1", "conv2", "fc1", "fc"]
FRACTIONS = [0.0, 0.1, 0.4, 0.8, 1.0]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> RepresentationStore:
    """Layers that drift towards their final state, lower layers first."""
    g = torch.Generator().manual_seed(0)
    final = {name: torch.randn(240, 6 + 2 * i, generator=g) for i, name in enumerate(LAYERS)}
    noise = {name: torch.randn(240, 6 + 2 * i, generator=g) for i, name in enumerate(LAYERS)}
    st = RepresentationStore(tmp_path_factory.mktemp("plots"))
    for step, f in enumerate(FRACTIONS):
        acts = {}
        for depth, name in enumerate(LAYERS):
            w = min(1.0, f * (1.0 + 1.5 * (len(LAYERS) - depth)))  # shallow layers arrive first
            acts[name] = w * final[name] + (1 - w) * noise[name]
        st.add(acts, step=10 * step, fraction=f)
    return st


def _heatmaps(fig: Figure):
    return [ax for ax in fig.axes if ax.images]


def test_learning_dynamics_grid(store, tmp_path) -> None:
    fig = plot_learning_dynamics(store)
    assert isinstance(fig, Figure)
    panels = _heatmaps(fig)
    assert len(panels) == 4
    assert len(fig.axes) == 5  # four heatmaps and one shared colour bar
    # nearest stored checkpoints to 0, 35, 75, 100 %, each titled with its step and fraction
    assert [ax.get_title() for ax in panels] == ["step 0 (0%)", "step 20 (40%)", "step 30 (80%)", "step 40 (100%)"]
    for k, ax in enumerate(panels):
        im = ax.images[0]
        assert im.origin == "lower" and im.get_clim() == (0.0, 1.0)
        assert [t.get_text() for t in ax.get_xticklabels()] == LAYERS
        # one row: layer names on the outer (left) panel only
        assert [t.get_text() for t in ax.get_yticklabels()] == (LAYERS if k == 0 else [])
    # y = layer at the checkpoint, x = layer at the end: the image is matrices[c].T
    dyn = learning_dynamics(store)
    np.testing.assert_allclose(np.asarray(panels[1].images[0].get_array()), dyn.matrices[2].T.numpy())
    out = tmp_path / "grid.png"
    fig.savefig(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_learning_dynamics_grid_custom_fractions(store) -> None:
    fig = plot_learning_dynamics(learning_dynamics(store), fractions=(0.5, 1.0))
    assert len(_heatmaps(fig)) == 2
    with pytest.raises(ValueError, match="fractions"):
        plot_learning_dynamics(store, fractions=(1.5,))


def test_learning_dynamics_grid_shows_each_checkpoint_once(store) -> None:
    # a run captured at its start and end only: 0/35% are nearest step 0, 75/100% the end
    dyn = learning_dynamics(store, [0, 40])
    panels = _heatmaps(plot_learning_dynamics(dyn))
    assert [ax.get_title() for ax in panels] == ["step 0 (0%)", "step 40 (100%)"]
    np.testing.assert_allclose(np.asarray(panels[0].images[0].get_array()), dyn.matrices[0].T.numpy())


def test_convergence_curves_coloured_by_depth(store, tmp_path) -> None:
    fig = plot_convergence(store)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == LAYERS
    colours = [tuple(ln.get_color()) for ln in lines]
    assert len(set(colours)) == len(LAYERS)
    np.testing.assert_allclose(lines[0].get_xdata(), FRACTIONS)
    assert lines[-1].get_ydata()[-1] == pytest.approx(1.0)
    fig.savefig(tmp_path / "curves.png")
    prev = plot_convergence(similarity_to_previous(store), x="step", ylabel="similarity to previous")
    assert list(prev.axes[0].get_lines()[0].get_xdata()) == [0, 10, 20, 30, 40]
    with pytest.raises(ValueError, match="`x`"):
        plot_convergence(store, x="epoch")


def test_aligned_directions_figure(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (300,), generator=g)
    signal = torch.nn.functional.one_hot(labels, 4).double() + 0.3 * torch.randn(300, 4, generator=g, dtype=torch.float64)
    x = signal @ torch.randn(4, 8, generator=g, dtype=torch.float64)
    y = signal @ torch.randn(4, 10, generator=g, dtype=torch.float64)
    al = aligned_directions(x, y)
    fig = plot_aligned_directions(al, labels, names=("seed 0", "seed 1"))
    assert len(fig.axes) == 4
    for ax in fig.axes:
        data = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 300]
        assert len(data) == 2  # one line per network
        assert len(ax.get_lines()) - 2 == 3  # four classes, three boundaries
    assert "SVCCA direction 1" in fig.axes[2].get_title()
    fig.savefig(tmp_path / "aligned.png")
    with pytest.raises(ValueError, match="`labels`"):
        plot_aligned_directions(al, labels[:10])


def test_figures_reject_wrong_input() -> None:
    with pytest.raises(ValueError, match="`dynamics`"):
        plot_learning_dynamics(torch.zeros(3, 3))
    curves = LayerCurves(["a"], [0], [0.0], torch.zeros(1, 1, dtype=torch.float64))
    assert len(plot_convergence(curves).axes[0].get_lines()) == 1


def test_short_layer_names() -> None:
    from svcca_torch.plotting import short_layer_names

    assert short_layer_names(["net.features.block1", "net.fc1", "net.fc"]) == ["block1", "fc1", "fc"]
    # never a bare index: layer1.0, not 0
    assert short_layer_names(["net.layer1.0", "net.layer2.0", "net.fc"]) == ["layer1.0", "layer2.0", "fc"]
    assert short_layer_names(["net.layer1.0.conv1", "net.layer2.0.conv1"]) == ["layer1.0.conv1", "layer2.0.conv1"]
    assert short_layer_names(["a", "a"]) == ["a", "a"]


def test_convergence_legend_tells_layers_apart_without_colour_bar() -> None:
    names = ["net.features.block1", "net.features.block2", "net.fc"]
    curves = LayerCurves(names, [0, 1], [0.0, 1.0], torch.rand(2, 3, dtype=torch.float64))
    fig = plot_convergence(curves)
    assert len(fig.axes) == 1  # no redundant depth colour bar beside the legend
    (legend,) = fig.legends  # outside the axes: covers no curve
    # lowest layer first, short names; the dropped prefixes are named under the plot
    assert [t.get_text() for t in legend.get_texts()] == ["block1", "block2", "fc"]
    assert "'net.features.'" in legend.get_title().get_text()
    many = LayerCurves([f"l{i}" for i in range(20)], [0, 1], [0.0, 1.0], torch.rand(2, 20, dtype=torch.float64))
    fig = plot_convergence(many)
    assert not fig.legends and len(fig.axes) == 2  # too many for a legend: depth colour bar


def test_figures_wide_enough_for_tensorboard_cards(store) -> None:
    from svcca_torch.board import figure_to_array
    from svcca_torch.plotting import plot_similarity_matrix

    dyn = learning_dynamics(store)
    for fig in (plot_learning_dynamics(dyn, ncols=2), plot_convergence(dyn.curves()),
                plot_similarity_matrix(dyn.matrices[1], dyn.layers)):
        assert figure_to_array(fig, dpi=100).shape[1] >= 600
    assert len(_heatmaps(plot_learning_dynamics(dyn, ncols=2))) == 4


def test_aligned_directions_names_the_layer() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(100, 6, generator=g, dtype=torch.float64)
    al = aligned_directions(x, x @ torch.randn(6, 6, generator=g, dtype=torch.float64))
    fig = plot_aligned_directions(al, torch.arange(100) % 3, layer="net.fc1")
    assert "net.fc1" in fig.get_suptitle()


def test_heatmaps_of_one_kind_reuse_the_first_ones_layout() -> None:
    """Constrained layout runs once per kind of heatmap (layers, size, labels, font size):
    later ones are placed where it put the first, and look the same."""
    from matplotlib import rc_context
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    from svcca_torch import plotting
    from svcca_torch.board import figure_to_array
    from svcca_torch.plotting import plot_similarity_matrix

    plotting._LAYOUTS.clear()
    names = [f"net.block{i}" for i in range(6)]
    m = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)).double()
    first = plot_similarity_matrix(m, names, title="step 0 (0%) vs end", ylabel="layer at step 0")
    assert isinstance(first.get_layout_engine(), ConstrainedLayoutEngine)
    a = figure_to_array(first)
    later = plot_similarity_matrix(m, names, title="step 3000 (100%) vs end", ylabel="layer at step 3000")
    assert not isinstance(later.get_layout_engine(), ConstrainedLayoutEngine)
    b = figure_to_array(later)
    assert a.shape == b.shape
    for x, y in zip(first.axes, later.axes):
        np.testing.assert_allclose(x.get_position().bounds, y.get_position().bounds, rtol=0, atol=1e-12)
    # another kind (other layers, or another font size) gets its own layout
    other = plot_similarity_matrix(m[:5, :5], names[:5])
    assert isinstance(other.get_layout_engine(), ConstrainedLayoutEngine)
    with rc_context({"font.size": 18}):
        big = plot_similarity_matrix(m, names, title="step 0 (0%) vs end", ylabel="layer at step 0")
    assert isinstance(big.get_layout_engine(), ConstrainedLayoutEngine)


# ----------------------------------------------------------------------------------- issue 22: the views
def test_fractions_are_precise_enough_to_tell_early_checkpoints_apart() -> None:
    from svcca_torch.plotting import checkpoint_label, format_fraction

    # three early heatmaps of an 860-step run were all titled "(0%)"
    assert [format_fraction(s / 860) for s in (0, 1, 2, 21, 301, 860)] == [
        "0%", "0.12%", "0.23%", "2.4%", "35%", "100%"]
    assert checkpoint_label(21, 21 / 860) == "step 21 (2.4%)" and checkpoint_label(5, None) == "step 5"


def _early_curves(freeze=None):
    steps = [0, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    v = torch.tensor([[1 - 0.6 * np.exp(-s / (4 * (j + 1))) for j in range(4)] for s in steps], dtype=torch.float64)
    return LayerCurves(LAYERS, steps, [s / 1000 for s in steps], v)


def test_curves_use_a_symlog_axis_when_most_change_is_early() -> None:
    early = plot_convergence(_early_curves())
    assert early.axes[0].get_xscale() == "symlog"
    assert "symlog" in early.axes[0].get_xlabel()
    ticks = [t.get_text() for t in early.axes[0].get_xticklabels()]
    assert ticks[0] == "0%" and "1%" in ticks and "100%" in ticks
    # change spread over the run: linear; and the choice can be forced
    steps = list(range(0, 101, 10))
    even = LayerCurves(["a", "b"], steps, [s / 100 for s in steps],
                       torch.tensor([[s / 100, s / 100] for s in steps], dtype=torch.float64))
    assert plot_convergence(even).axes[0].get_xscale() == "linear"
    assert plot_convergence(_early_curves(), xscale="linear").axes[0].get_xscale() == "linear"
    with pytest.raises(ValueError, match="`xscale`"):
        plot_convergence(even, xscale="log")


def test_curves_and_grid_mark_each_freeze() -> None:
    from svcca_torch.dynamics import LearningDynamics
    from svcca_torch.plotting import FROZEN_MARK

    curves = _early_curves()
    fig = plot_convergence(curves, freeze_steps={"conv1": 16, "conv2": 64})
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert f"conv1 ({FROZEN_MARK} at step 16)" in labels and f"conv2 ({FROZEN_MARK} at step 64)" in labels
    assert "fc1" in labels  # never frozen: its plain name
    ax = fig.axes[0]
    vlines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 2 and ln.get_xdata()[0] == ln.get_xdata()[1]]
    assert sorted(round(float(ln.get_xdata()[0]), 4) for ln in vlines) == [0.016, 0.064]
    # the grid at chosen checkpoints: the panels frozen by then say so in their titles
    n = len(curves.steps)
    m = torch.rand(n, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dyn = LearningDynamics(LAYERS, curves.steps, curves.fractions, m)
    grid = plot_learning_dynamics(dyn, checkpoints=[0, 3, 5, n - 1], ncols=2, freeze_steps={"conv1": 16,
                                                                                             "conv2": 64})
    titles = [ax.get_title() for ax in _heatmaps(grid)]
    assert titles == ["step 0 (0%)", "step 8 (0.8%)", f"step 32 (3.2%)\n{FROZEN_MARK} conv1",
                      f"step 1000 (100%)\n{FROZEN_MARK} conv1-conv2"]
    assert f"{FROZEN_MARK} frozen: conv1 at 16, conv2 at 64" in grid.get_suptitle()
    with pytest.raises(ValueError, match="`checkpoints`"):
        plot_learning_dynamics(dyn, checkpoints=[0, n])
