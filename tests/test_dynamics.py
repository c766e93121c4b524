"""Learning dynamics on a real small training run, network comparison, class sensitivity."""
from __future__ import annotations

import math
from typing import Sequence

import pytest
import torch
from torch.utils.data import DataLoader

from svcca_torch.data import load_digits_dataset, probe_set
from svcca_torch.dynamics import (
    aligned_directions,
    class_sensitivity,
    class_target,
    compare_networks,
    learning_dynamics,
    paired_similarity,
    similarity_to_final,
    similarity_to_previous,
)
from svcca_torch.functional.svcca import svcca
from svcca_torch.models import ConvNet
from svcca_torch.recorder import ActivationRecorder
from svcca_torch.store import RepresentationStore

EPOCHS = 5
RECORD_EVERY = 10
F32 = torch.finfo(torch.float32).eps


def f32_tol(n: int) -> float:
    """Tolerance for similarities computed from float32 ``(n, k)`` orthonormal bases: each
    entry of ``UᵢᵀUⱼ`` is an n-term float32 sum, exact to ~sqrt(n) * eps (rounding errors of
    random sign), and so is each canonical correlation; 8x that for margin (1.6e-5 at n=300)."""
    return 8 * math.sqrt(n) * F32


def _train(seed: int, stores: Sequence[RepresentationStore], probe: torch.Tensor):
    """A ConvNet on scikit-learn's digits, 5 epochs of SGD (about 100 steps, seconds on one
    CPU thread), recorded on the probe at init and every 10 steps into each of ``stores``."""
    torch.manual_seed(seed)
    train, _ = load_digits_dataset()
    net = ConvNet()
    rec = ActivationRecorder(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    total = EPOCHS * len(loader)
    step = 0
    for store in stores:
        store.add(rec.record(probe), step=0, epoch=0, fraction=0.0)
    for epoch in range(EPOCHS):
        for x, y in loader:
            net.train()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            step += 1
            if stores and (step % RECORD_EVERY == 0 or step == total):
                acts = rec.record(probe)
                for store in stores:
                    store.add(acts, step=step, epoch=epoch, fraction=step / total)
    return net, rec


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One training run recorded into an exact (float32) store and a default (int12) one."""
    _, test = load_digits_dataset()
    probe, labels = probe_set(test, 300, return_labels=True)
    exact = RepresentationStore(tmp_path_factory.mktemp("store"), encoding="float32")
    small = RepresentationStore(tmp_path_factory.mktemp("store_int12"))
    net, rec = _train(0, [exact, small], probe)
    return exact, small, net, rec, probe, labels


@pytest.fixture(scope="module")
def run(runs):
    exact, _, net, rec, probe, labels = runs
    return exact, net, rec, probe, labels


def test_learning_dynamics_matrix(run) -> None:
    store = run[0]
    dyn = learning_dynamics(store)
    n_ck, n_layers = len(store), len(store.layers)
    assert dyn.matrices.shape == (n_ck, n_layers, n_layers)
    assert dyn.layers == ConvNet().layer_names
    assert dyn.fractions[0] == 0.0 and dyn.fractions[-1] == 1.0
    # every layer at the end is identical to itself
    tol = f32_tol(store.n_datapoints)
    torch.testing.assert_close(torch.diagonal(dyn.matrices[-1]), torch.ones(n_layers, dtype=torch.float64),
                               atol=tol, rtol=0)
    assert bool(((dyn.matrices >= 0) & (dyn.matrices <= 1)).all())  # canonical correlations are clamped
    # the final-vs-final matrix is symmetric; the logits are a linear map of fc1
    torch.testing.assert_close(dyn.matrices[-1], dyn.matrices[-1].T, atol=tol, rtol=0)
    assert dyn.matrices[-1, -1, -2] > 0.98
    # the diagonal equals the per-layer curve computed pair by pair
    curves = similarity_to_final(store)
    torch.testing.assert_close(dyn.to_final(), curves.values, atol=tol, rtol=0)
    same = dyn.curves()
    assert (same.layers, same.steps, same.fractions) == (curves.layers, curves.steps, curves.fractions)
    torch.testing.assert_close(same.values, curves.values, atol=tol, rtol=0)


def test_bottom_up_convergence(run) -> None:
    """The paper's bottom-up convergence, as it holds on digits.

    Through the first half of training the first conv block is closer to its final state
    than every deeper hidden layer (blocks 2-4 and fc1), and the hidden layers converge in
    order of depth at the first checkpoint after init. The 10-unit logit layer is the
    exception on this data: its 10-dimensional span settles within the first ~10 SGD steps
    (once the classes separate), after which it is closer to its final state than the
    hidden layers; only at initialisation is it further than the first layer.
    """
    store = run[0]
    curves = similarity_to_final(store)
    hidden = curves.values[:, :-1]  # blocks 1-4, fc1
    logits = curves.values[:, -1]
    early = [c for c, f in enumerate(curves.fractions) if f <= 0.5]
    assert len(early) >= 4
    for c in early:
        assert bool((hidden[c, 0] > hidden[c, 1:]).all()), (curves.fractions[c], hidden[c])
    first = early[1]
    assert bool((hidden[first, :-1].diff() < 0).all()), hidden[first]
    assert logits[0] < hidden[0, 0]
    # convergence: every layer ends closer to its final state than it started
    assert bool((curves.values[-2] > curves.values[0]).all())


def test_similarity_to_previous_is_online_signal(run) -> None:
    store = run[0]
    prev = similarity_to_previous(store)
    assert bool(torch.isnan(prev.values[0]).all())
    vals = prev.values[1:]
    assert bool(((vals > 0) & (vals <= 1)).all())
    # layers change less from one checkpoint to the next as training settles
    assert bool((prev.values[-1] > prev.values[1]).all())
    # equals the pairwise helper the freeze callback uses online
    cks = store.checkpoints
    direct = paired_similarity(store.load_checkpoint(cks[2]), store.load_checkpoint(cks[3]))
    assert list(direct) == store.layers
    for j, name in enumerate(store.layers):
        # float64 products of the bases (svcca) against float32 ones (the batched curves)
        assert math.isclose(direct[name], float(prev.values[3, j]), abs_tol=f32_tol(store.n_datapoints))
    torch.testing.assert_close(prev.layer("fc1"), prev.values[:, 4], equal_nan=True)


def test_compare_two_networks_and_aligned_directions(run) -> None:
    store, net, rec, probe, labels = run
    net_b, rec_b = _train(1, [], probe)
    acts_a = rec.record(probe)
    acts_b = rec_b.record(probe)
    cmp_acts = compare_networks(acts_a, acts_b)
    assert cmp_acts.matrix.shape == (6, 6)
    # the same stored network compared with itself gives 1 on the diagonal
    self_cmp = compare_networks(store, store)
    torch.testing.assert_close(torch.diagonal(self_cmp.matrix), torch.ones(6, dtype=torch.float64),
                               atol=f32_tol(store.n_datapoints), rtol=0)
    # the store's final checkpoint is this recording, so store-vs-acts matches acts-vs-acts
    # (to the documented float32 accuracy of the kernels, 1e-4)
    mixed = compare_networks(store, acts_b)
    torch.testing.assert_close(mixed.matrix, cmp_acts.matrix, atol=1e-4, rtol=0)
    # two seeds: matching layers agree more than a first conv block does with the logits
    assert cmp_acts.matrix[0, 0] > cmp_acts.matrix[0, -1]

    al = aligned_directions(acts_a["fc1"], acts_b["fc1"])
    n = acts_a["fc1"].shape[0]
    assert al.x_neurons.shape == al.y_directions.shape == (n, 2)
    top = acts_a["fc1"].pow(2).mean(0).argsort(descending=True)[:2]
    assert torch.equal(al.x_neuron_ids, top)
    full = svcca(acts_a["fc1"], acts_b["fc1"])
    torch.testing.assert_close(al.coefficients, full.coefficients[:2].double(), atol=0, rtol=0)  # same call
    # aligned SVCCA directions correlate as their coefficients say, and better than the
    # two networks' top neurons do with each other (the paper's point)
    corr = torch.stack([torch.corrcoef(torch.stack([al.x_directions[:, i], al.y_directions[:, i]]))[0, 1]
                        for i in range(2)])
    torch.testing.assert_close(corr, al.coefficients, atol=1e-4, rtol=0)
    assert bool((al.coefficients > al.neuron_correlations.abs()).all())


def test_class_sensitivity_over_depth(run) -> None:
    store, net, rec, probe, labels = run
    acts = rec.record(probe)
    logit = acts["fc"][:, 3]
    by_logit = class_sensitivity(acts, logit)
    assert by_logit.layers == store.layers
    # the logit is one of the fc layer's neurons and a linear map of fc1
    assert by_logit.values[-1] > 0.999 and by_logit.values[-2] > 0.99
    target = class_target(labels, 3, rec.datapoint_index)
    by_label = class_sensitivity(store, target)
    assert by_label.values.shape == (6,)
    assert bool(((by_label.values > 0) & (by_label.values <= 1)).all())
    # class information grows with depth in the trained net: fc1 knows more than block1
    assert by_label.values[4] > by_label.values[0]
    with pytest.raises(ValueError, match="datapoint_index"):
        class_sensitivity(store, class_target(labels, 3))
    with pytest.raises(ValueError, match="no variance"):
        class_target(labels, 42)


def test_heatmap_checkpoints_only_in_full(run) -> None:
    """`full=` computes full matrices only for the chosen checkpoints, the diagonal for all."""
    store = run[0]
    everything = learning_dynamics(store)
    picks = [store.nearest(f) for f in (0.0, 0.5, 1.0)]
    some = learning_dynamics(store, full=picks)
    idx = [everything.steps.index(c.step) for c in picks]
    assert some.full == sorted(set(idx)) and everything.full is None
    tol = f32_tol(store.n_datapoints)
    torch.testing.assert_close(some.matrices[idx], everything.matrices[idx], atol=tol, rtol=0)
    torch.testing.assert_close(some.to_final(), everything.to_final(), atol=tol, rtol=0)
    others = [c for c in range(len(store)) if c not in idx]
    off = ~torch.eye(len(store.layers), dtype=torch.bool)
    assert bool(torch.isnan(some.matrices[others][:, off]).all())
    assert some.nearest(0.45) in idx  # figures pick among the full checkpoints
    only = learning_dynamics(store, full=[])
    torch.testing.assert_close(only.to_final(), everything.to_final(), atol=tol, rtol=0)
    with pytest.raises(ValueError, match="has a full matrix"):
        only.nearest(0.5)
    with pytest.raises(ValueError, match=r"`full`: steps \[12345\]"):
        learning_dynamics(store, full=[12345])


def test_previous_in_the_same_pass_as_to_final(run) -> None:
    """``previous=True`` gives similarity_to_previous's values from the pass that compares
    every checkpoint with the final one (each checkpoint loaded once)."""
    store = run[0]
    both = learning_dynamics(store, full=[], previous=True)
    alone = similarity_to_previous(store)
    torch.testing.assert_close(both.previous, alone.values, rtol=0, atol=0, equal_nan=True)
    assert both.to_previous().layers == store.layers and bool(both.previous[0].isnan().all())
    assert bool((both.previous[1:] < 1 - 1e-3).any())  # not the to-final values of the last rows
    torch.testing.assert_close(both.to_final(), learning_dynamics(store, full=[]).to_final(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="previous=True"):
        learning_dynamics(store, full=[]).to_previous()
    with pytest.raises(ValueError, match="`previous`"):
        learning_dynamics(store, full=[], previous="yes")


def test_int12_store_reports_within_1e3_of_float32(runs) -> None:
    """The default encoding's claim: every reported similarity within 1e-3 of the float32
    bases' (learning-dynamics matrices, to-final and to-previous curves), in 3/8 of the bytes."""
    exact, small = runs[0], runs[1]
    a, b = learning_dynamics(exact), learning_dynamics(small)
    assert float((a.matrices - b.matrices).abs().max()) < 1e-3
    pa, pb = similarity_to_previous(exact), similarity_to_previous(small)
    assert float((pa.values - pb.values)[1:].abs().max()) < 1e-3
    for ce, cs in zip(exact.checkpoints, small.checkpoints):
        assert cs.nbytes <= 0.5 * ce.nbytes, (cs.nbytes, ce.nbytes)


def test_compare_networks_warns_about_narrow_layers() -> None:
    """The rule (NARROW_LAYER_DIRECTIONS): a layer keeping at most 10 directions is named, with
    its kept directions and width, in one NarrowLayerWarning; 11 directions is not narrow."""
    import warnings

    from svcca_torch.dynamics import NARROW_LAYER_DIRECTIONS, NarrowLayerWarning

    assert NARROW_LAYER_DIRECTIONS == 10  # documented in docs/reproductions.md ("Two networks from different seeds")
    g = torch.Generator().manual_seed(0)
    acts = {name: torch.randn(300, width, generator=g, dtype=torch.float64)
            for name, width in (("wide", 40), ("eleven", 11), ("ten", 10), ("logits", 4))}
    with pytest.warns(NarrowLayerWarning) as caught:
        cmp = compare_networks(acts, {n: a.flip(0) for n, a in acts.items()}, keep=1.0)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "`ten` keeps 10 directions of its 10 neurons in network a" in msg
    assert "`logits` keeps 4 directions of its 4 neurons in network a and 4" in msg
    assert "`wide`" not in msg and "`eleven`" not in msg
    assert caught[0].filename == __file__  # points at the caller
    assert cmp.narrow == {"ten": [10, 10], "logits": [4, 4]}
    assert cmp.kept_a == {"wide": 40, "eleven": 11, "ten": 10, "logits": 4}
    # narrow on one side only still counts; wide layers alone warn nothing
    with pytest.warns(NarrowLayerWarning, match=r"`x` keeps 9 directions of its 9 neurons in network b"):
        compare_networks({"x": acts["wide"]}, {"x": acts["wide"][:, :9]}, keep=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NarrowLayerWarning)
        compare_networks({"w": acts["wide"], "e": acts["eleven"]}, {"w": acts["wide"]}, keep=1.0)


def test_convergence_order_uses_layers_before_they_froze_and_states_its_statistic():
    """Issue 22: "lower layers converged first: True" was printed at Spearman +0.23 with ties.
    The order is judged on each layer before it froze (after a freeze its similarity to its
    final state is 1 by construction) and stated with rho, the number of layers and p."""
    from svcca_torch.dynamics import LayerCurves, convergence_order

    steps = [0, 10, 20, 30, 40, 50]
    v = torch.tensor([  # a, b, c, d: to-final similarity per capture
        [0.2, 0.2, 0.2, 0.2],
        [0.5, 0.3, 0.2, 0.3],
        [1.0, 0.6, 0.4, 0.5],
        [1.0, 1.0, 0.97, 0.6],
        [1.0, 1.0, 0.99, 0.96],
        [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    curves = LayerCurves(["a", "b", "c", "d"], steps, [s / 50 for s in steps], v)
    free = convergence_order(curves)
    assert free["steps"] == {"a": 20, "b": 30, "c": 30, "d": 40}
    assert free["n_layers"] == 4 and free["tied_layers"] == 2 and 0.8 < free["spearman"] <= 1.0
    assert "Spearman rho(depth, step) = +0.95 over 4 layers (2 share a step)" in free["statement"]
    # a and b frozen at 20, c at 40: judged on the captures before, a and b never got there by
    # themselves (a's 1.0 from step 20 on is the freeze), so they are left out; c got there at 30
    frozen = convergence_order(curves, freeze_steps={"a": 20, "b": 20, "c": 40})
    assert frozen["steps"]["c"] == 30
    assert frozen["steps"]["a"] is None and frozen["steps"]["b"] is None and set(frozen["excluded"]) == {"a", "b"}
    assert frozen["spearman"] is None and frozen["lower_first"] is None  # 2 layers: too few to judge
    assert "too few layers to judge" in frozen["statement"] and "a (frozen at step 20" in frozen["statement"]
    # ties and a weak order are said to be weak, not "True"
    weak = LayerCurves(["a", "b", "c", "d", "e"], steps[:3], [0, 0.5, 1.0], torch.tensor(
        [[0.1] * 5, [0.97, 0.5, 0.97, 0.5, 0.97], [1.0] * 5], dtype=torch.float64))
    order = convergence_order(weak)
    assert order["lower_first"] is False and abs(order["spearman"]) < 0.5
    assert "no evidence" in order["statement"] or "weak evidence" in order["statement"]


def test_permutation_p_value_matches_a_direct_count():
    """The permuted rhos come from permuted ranks (ties included): the same as re-ranking each order."""
    import itertools

    from svcca_torch.dynamics import _permutation_p, _spearman

    depth, when = [0, 1, 2, 3, 4, 5], [10.0, 30.0, 20.0, 30.0, 50.0, 40.0]
    rho = _spearman(depth, when)
    direct = [(_spearman(depth, [when[i] for i in p]) or 0.0) >= rho - 1e-12
              for p in itertools.permutations(range(6))]
    assert _permutation_p(depth, when, rho) == pytest.approx(sum(direct) / len(direct), abs=1e-12)
