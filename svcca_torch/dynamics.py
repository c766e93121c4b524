"""Learning dynamics, network comparison and class sensitivity from stored representations.

Everything here works on SVD-reduced bases (:class:`~svcca_torch.ReducedBasis`), either
from a :class:`~svcca_torch.RepresentationStore` or reduced on the fly from activations
``(datapoints, neurons)`` (conv layers folded, e.g. by :class:`~svcca_torch.ActivationRecorder`).
Each basis is loaded or reduced once and then compared with many others through
:func:`svcca_torch.similarity_matrix`.

Typical use after (or during) training::

    dyn = learning_dynamics(store, full=[store.nearest(f) for f in (0, .35, .75, 1)])
    curves = dyn.curves()                     # (checkpoints, layers) vs final, every checkpoint
    online = similarity_to_previous(store)    # what a freeze policy can see during training
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from .functional.cca import mean_canonical_correlations
from .functional.matrix import similarity_matrix
from .functional.svcca import ReducedBasis, svcca, svd_reduce
from .store import Checkpoint, CheckpointRef, RepresentationStore, check_usable_device
from .utils.validation import (
    as_tensor,
    check_activations,
    check_bool,
    check_keep,
    check_positive_int,
    check_same_datapoints,
    warn_if_few_datapoints,
)

Representations = Mapping[str, Union[torch.Tensor, ReducedBasis]]
Source = Union[RepresentationStore, Representations]

#: A layer that keeps at most this many directions is too narrow for a layer-to-layer
#: comparison to mean much: its SVCCA with another layer is the mean of at most this many
#: canonical correlations, which are high against any layer that carries the same few
#: dominant directions (a 10-class output layer scores high against every layer that
#: separates the classes), so its row and column of a network comparison cannot show which
#: layers correspond. :func:`compare_networks` warns (:class:`NarrowLayerWarning`).
NARROW_LAYER_DIRECTIONS = 10


class NarrowLayerWarning(UserWarning):
    """A compared layer keeps at most :data:`NARROW_LAYER_DIRECTIONS` directions: its
    similarity to other layers says little about correspondence."""


def narrow_layers(bases: Mapping[str, ReducedBasis]) -> Dict[str, ReducedBasis]:
    """The layers of ``bases`` that are too narrow to compare with other layers (the rule:
    at most :data:`NARROW_LAYER_DIRECTIONS` kept directions)."""
    return {n: b for n, b in bases.items() if b.k <= NARROW_LAYER_DIRECTIONS}


def _warn_narrow(sides: Mapping[str, Mapping[str, ReducedBasis]], stacklevel: int = 3) -> None:
    per_layer: Dict[str, List[str]] = {}
    for side, bases in sides.items():
        for name, b in narrow_layers(bases).items():
            per_layer.setdefault(name, []).append(f"{b.k} directions of its {b.n_neurons} neurons in network {side}")
    found = [f"layer `{name}` keeps {' and '.join(what)}" for name, what in per_layer.items()]
    if found:
        warnings.warn(
            f"compare_networks: {'; '.join(found)}. A layer with at most {NARROW_LAYER_DIRECTIONS} directions "
            "scores high against any layer that carries its few dominant directions (e.g. an output layer "
            "against every layer that separates the classes), so its row or column of the matrix says little "
            "about which layers correspond; compare it with its own twin only.",
            NarrowLayerWarning, stacklevel=stacklevel)


@dataclass
class LearningDynamics:
    """The paper's learning-dynamics matrices.

    Attributes:
        layers: layer names, bottom-up (the store's order).
        steps, fractions: one per checkpoint (fraction of training, from the store).
        matrices: ``(checkpoints, layers, layers)`` float64; ``matrices[c, i, j]`` is the
            SVCCA similarity between layer ``i`` at the final checkpoint and layer ``j`` at
            checkpoint ``c``. NaN where a layer is missing at a checkpoint, and off the
            diagonal for checkpoints whose full matrix was not computed (see ``full``).
        full: indices (into ``steps``) of the checkpoints with a full matrix; ``None``: all.
        previous: ``(checkpoints, layers)`` float64, each layer's similarity to itself at the
            previous checkpoint (row 0 NaN), when asked for with ``previous=True``; else None.
    """

    layers: List[str]
    steps: List[int]
    fractions: List[float]
    matrices: torch.Tensor
    full: Optional[List[int]] = None
    previous: Optional[torch.Tensor] = None

    def to_final(self) -> torch.Tensor:
        """``(checkpoints, layers)``: each layer's similarity to its own final state."""
        return torch.diagonal(self.matrices, dim1=1, dim2=2)

    def curves(self) -> "LayerCurves":
        """:meth:`to_final` as :class:`LayerCurves` (what :func:`similarity_to_final` returns)."""
        return LayerCurves(list(self.layers), list(self.steps), list(self.fractions), self.to_final())

    def to_previous(self) -> "LayerCurves":
        """``previous`` as :class:`LayerCurves` (what :func:`similarity_to_previous` returns)."""
        if self.previous is None:
            raise ValueError("these dynamics hold no similarity to the previous checkpoint: pass previous=True "
                             "to learning_dynamics.")
        return LayerCurves(list(self.layers), list(self.steps), list(self.fractions), self.previous)

    def nearest(self, fraction: float) -> int:
        """Index of the checkpoint whose fraction of training is nearest ``fraction``
        (among those with a full matrix)."""
        cands = range(len(self.fractions)) if self.full is None else self.full
        if not cands:
            raise ValueError("no checkpoint has a full matrix: pass `full` to learning_dynamics.")
        return min(cands, key=lambda c: abs(self.fractions[c] - fraction))


@dataclass
class LayerCurves:
    """One value per (checkpoint, layer), e.g. similarity to the final or previous state.

    Attributes:
        layers: layer names, bottom-up.
        steps, fractions: one per checkpoint.
        values: ``(checkpoints, layers)`` float64 (NaN where undefined).
    """

    layers: List[str]
    steps: List[int]
    fractions: List[float]
    values: torch.Tensor

    def layer(self, name: str) -> torch.Tensor:
        """The curve of one layer over checkpoints."""
        if name not in self.layers:
            raise ValueError(f"`name` {name!r} is not one of the layers {self.layers}.")
        return self.values[:, self.layers.index(name)]


def _layers(store: RepresentationStore, layers: Optional[Sequence[str]]) -> List[str]:
    if layers is None:
        return store.layers
    unknown = [n for n in layers if n not in store.layers]
    if unknown:
        raise ValueError(f"`layers`: {unknown} are not in the store; stored layers: {store.layers}.")
    return list(layers)


def _checkpoints(store: RepresentationStore, checkpoints: Optional[Sequence[CheckpointRef]]) -> List[Checkpoint]:
    if not len(store):
        raise ValueError(f"the store at {str(store.folder)!r} holds no checkpoint yet.")
    if checkpoints is None:
        return store.checkpoints
    return [c if isinstance(c, Checkpoint) else store.checkpoint(c) for c in checkpoints]


def _load(store: RepresentationStore, ck: Checkpoint, layers: Sequence[str], device=None) -> Dict[str, ReducedBasis]:
    return {n: store.load(ck, n, device=device) for n in layers if n in ck.layers}


#: Bytes of workspace per chunk of cross products (bounds memory at any size).
_CHUNK_BYTES = 64 << 20


def _paired(xs: Sequence[ReducedBasis], ys: Sequence[ReducedBasis]) -> torch.Tensor:
    """Same-layer SVCCA of ``xs[i]`` with ``ys[i]`` (any datapoint count per pair), batched.

    The small eigenproblems run in the bases' dtype (float32 for stored bases: ~1e-6 on a
    similarity, far below the int12 encoding's 1e-3 bound; see docs/store.md)."""
    for i, (x, y) in enumerate(zip(xs, ys)):
        if x.n_datapoints != y.n_datapoints:
            raise ValueError(f"pair {i}: {x.n_datapoints} and {y.n_datapoints} datapoints; a layer must be "
                             "recorded on the same probe datapoints at every checkpoint.")
    return mean_canonical_correlations([x.basis.mT @ y.basis.to(x.basis.dtype) for x, y in zip(xs, ys)])


def _to_previous_row(row: torch.Tensor, names: Sequence[str], before: Mapping[str, ReducedBasis],
                     cur: Mapping[str, ReducedBasis]) -> None:
    """Fill ``row`` (one per name) with each layer's similarity to its previous basis, where both exist."""
    both = [j for j, n in enumerate(names) if n in cur and n in before]
    if both:
        row[both] = _paired([before[names[j]] for j in both], [cur[names[j]] for j in both])


def _cross(
    xs: Sequence[ReducedBasis], ys: Sequence[ReducedBasis], names: Sequence[str], square: bool = False
) -> torch.Tensor:
    """``(len(xs), len(ys))`` SVCCA of every pair: one GEMM per chunk of rows, batched
    eigenproblems; ``square`` (``xs`` is ``ys``): the upper triangle only, mirrored."""
    counts = {n: b.n_datapoints for n, b in zip(names, list(xs) + list(ys))}
    if len(set(b.n_datapoints for b in list(xs) + list(ys))) != 1:
        raise ValueError(
            "a layers x layers matrix compares layers on common datapoints, but these layers have different "
            f"datapoint counts {counts} (each pooled to its own grid): request full matrices only for a store "
            "recorded with a common grid, or use the same-layer curves (learning_dynamics(..., full=[]), "
            "similarity_to_final, similarity_to_previous), which work for any."
        )
    big_y = torch.cat([y.basis.to(xs[0].basis.dtype) for y in ys], 1)
    oy = [0] + torch.tensor([y.k for y in ys]).cumsum(0).tolist()
    out = torch.empty(len(xs), len(ys), dtype=torch.float64)
    per_row = max(1, _CHUNK_BYTES // max(1, 4 * big_y.shape[1] * max(x.k for x in xs)))
    for r0 in range(0, len(xs), per_row):
        rows = xs[r0 : r0 + per_row]
        big_x = torch.cat([x.basis for x in rows], 1)
        g = big_x.mT @ big_y  # the only pass over the datapoints
        ox = [0] + torch.tensor([x.k for x in rows]).cumsum(0).tolist()
        pairs = [(i, j) for i in range(len(rows)) for j in range(len(ys)) if not square or j >= r0 + i]
        vals = mean_canonical_correlations([g[ox[i] : ox[i + 1], oy[j] : oy[j + 1]] for i, j in pairs])
        for (i, j), v in zip(pairs, vals.tolist()):
            out[r0 + i, j] = v
            if square:
                out[j, r0 + i] = v
    return out


def _warn_few(bases: Sequence[ReducedBasis]) -> None:
    if bases:
        worst = max(bases, key=lambda b: b.k / b.n_datapoints)
        warn_if_few_datapoints(worst.n_datapoints, worst.k, "stored layers", stacklevel=4)


def learning_dynamics(
    store: RepresentationStore,
    checkpoints: Optional[Sequence[CheckpointRef]] = None,
    layers: Optional[Sequence[str]] = None,
    *,
    final: Optional[CheckpointRef] = None,
    progress: bool = False,
    full: Optional[Sequence[CheckpointRef]] = None,
    device: Optional[Union[str, torch.device]] = None,
    previous: bool = False,
) -> LearningDynamics:
    """For every checkpoint, the layers x layers SVCCA matrix against the final network.

    Args:
        store: the recorded training run.
        checkpoints: which checkpoints (default: all stored), as :class:`Checkpoint` or steps.
        layers: which layers (default: all, in store order).
        final: the reference checkpoint (default: the last stored).
        progress: show a tqdm progress bar over the checkpoints.
        full: the checkpoints (steps or :class:`Checkpoint`) whose full layers x layers
            matrix is computed, e.g. those shown as heatmaps (``[store.nearest(f) for f in
            fractions]``); every other checkpoint gets only the diagonal (each layer against
            its own final state, the to-final curves), which costs about ``1 / layers`` of a
            full matrix. Default ``None``: every checkpoint in full (svcca-torch 0.1).
            ``[]``: only the diagonals.
        device: where the bases are decoded and compared (e.g. the model's ``"cuda"``);
            default CPU. The result is on the CPU.
        previous: also compare each layer with itself at the previous analysed checkpoint
            (``.previous``, :meth:`LearningDynamics.to_previous`) in the same pass, so that
            each checkpoint is still loaded once.

    Returns:
        :class:`LearningDynamics`; ``matrices[c, i, j]`` compares layer ``i`` at ``final``
        with layer ``j`` at checkpoint ``c`` (off-diagonal NaN for checkpoints not in
        ``full``; ``.full`` lists those that are). The final bases are loaded once; each
        checkpoint's bases are loaded once and released after its row. Cross-layer entries
        need every layer on the same datapoints; the diagonal works for any per-layer counts.
    """
    device = check_usable_device(device)  # an unavailable device is not a damaged store file
    names = _layers(store, layers)
    cks = _checkpoints(store, checkpoints)
    ref = store.final if final is None else (final if isinstance(final, Checkpoint) else store.checkpoint(final))
    if full is None:
        full_idx = None
    else:
        wanted = {c.step if isinstance(c, Checkpoint) else check_positive_int(c, "full", minimum=0) for c in full}
        missing = sorted(wanted - {c.step for c in cks})
        if missing:
            raise ValueError(f"`full`: steps {missing} are not among the analysed checkpoints {[c.step for c in cks]}.")
        full_idx = [c for c, ck in enumerate(cks) if ck.step in wanted]
    fin = _load(store, ref, names, device)
    _warn_few(list(fin.values()))
    out = torch.full((len(cks), len(names), len(names)), math.nan, dtype=torch.float64)
    prev_out = torch.full((len(cks), len(names)), math.nan, dtype=torch.float64) if check_bool(previous, "previous") else None
    rows = [i for i, n in enumerate(names) if n in fin]
    before: Dict[str, ReducedBasis] = {}
    for c, ck in enumerate(tqdm(cks, desc="learning dynamics", disable=not progress, leave=False)):
        cur = fin if ck.step == ref.step else _load(store, ck, names, device)
        if prev_out is not None:
            _to_previous_row(prev_out[c], names, before, cur)
            before = cur
        cols = [j for j, n in enumerate(names) if n in cur]
        if not (rows and cols):
            continue
        if full_idx is None or c in full_idx:
            m = _cross([fin[names[i]] for i in rows], [cur[names[j]] for j in cols],
                       [names[i] for i in rows] + [names[j] for j in cols], square=cur is fin)
            out[c][torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = m
        else:
            both = [j for j in cols if names[j] in fin]
            if both:
                out[c, both, both] = _paired([fin[names[j]] for j in both], [cur[names[j]] for j in both])
        del cur
    return LearningDynamics(names, [c.step for c in cks], [store.fraction_of(c) for c in cks], out, full_idx,
                            prev_out)


def similarity_to_final(
    store: RepresentationStore,
    checkpoints: Optional[Sequence[CheckpointRef]] = None,
    layers: Optional[Sequence[str]] = None,
    *,
    device: Optional[Union[str, torch.device]] = None,
) -> LayerCurves:
    """Each layer's SVCCA similarity to its own state at the last checkpoint, over training.

    The diagonal of :func:`learning_dynamics` (``full=[]``: one comparison per
    (checkpoint, layer), batched per checkpoint); works for layers with different
    datapoint counts. The bottom-up convergence of the paper shows as lower layers
    reaching 1 earlier.
    """
    return learning_dynamics(store, checkpoints, layers, full=[], device=device).curves()


def similarity_to_previous(
    store: RepresentationStore,
    checkpoints: Optional[Sequence[CheckpointRef]] = None,
    layers: Optional[Sequence[str]] = None,
    *,
    device: Optional[Union[str, torch.device]] = None,
) -> LayerCurves:
    """Each layer's SVCCA similarity to itself at the previous checkpoint.

    The online convergence signal (the final state is unknown during training): a layer
    whose value stays near 1 has stopped changing, which is what freeze training acts on.
    Row 0 is NaN (no previous checkpoint). Each checkpoint is loaded once (on ``device``);
    the comparisons of one checkpoint are batched. ``learning_dynamics(..., previous=True)``
    gives the same values in the pass that compares every checkpoint with the final one.
    """
    device = check_usable_device(device)
    names = _layers(store, layers)
    cks = _checkpoints(store, checkpoints)
    values = torch.full((len(cks), len(names)), math.nan, dtype=torch.float64)
    prev: Dict[str, ReducedBasis] = {}
    for c, ck in enumerate(cks):
        cur = _load(store, ck, names, device)
        _to_previous_row(values[c], names, prev, cur)
        prev = cur
    return LayerCurves(names, [c.step for c in cks], [store.fraction_of(c) for c in cks], values)


def paired_similarity(
    before: Representations, after: Representations, *, keep: Union[int, float] = 0.99
) -> Dict[str, float]:
    """SVCCA similarity of each layer present in both ``before`` and ``after``.

    Args:
        before, after: ``{layer: (datapoints, neurons) activations or ReducedBasis}``, e.g.
            two consecutive captures (or ``store.load_checkpoint`` results).
        keep: SVD truncation for raw activations (bases are used as they are).

    Returns:
        ``{layer: similarity in [0, 1]}``, in ``after``'s order.
    """
    keep = check_keep(keep)
    out: Dict[str, float] = {}
    for name, b in after.items():
        if name in before:
            out[name] = float(svcca(_reduce(before[name], keep, name), _reduce(b, keep, name), keep=keep).mean)
    return out


def _reduce(z: Any, keep: Union[int, float], name: str) -> ReducedBasis:
    if isinstance(z, ReducedBasis):
        return z
    return svd_reduce(z, keep, name=f"layers[{name!r}]")


def _representations(
    source: Source, checkpoint: Optional[CheckpointRef], layers: Optional[Sequence[str]], keep, arg: str
) -> Dict[str, ReducedBasis]:
    if isinstance(source, RepresentationStore):
        names = _layers(source, layers)
        ck = source.final if checkpoint is None else (
            checkpoint if isinstance(checkpoint, Checkpoint) else source.checkpoint(checkpoint))
        return _load(source, ck, names)
    if not isinstance(source, Mapping) or not source:
        raise ValueError(
            f"`{arg}` must be a RepresentationStore or a non-empty dict {{layer: activations or ReducedBasis}}."
        )
    names = list(source) if layers is None else list(layers)
    unknown = [n for n in names if n not in source]
    if unknown:
        raise ValueError(f"`{arg}`: layers {unknown} are not among {list(source)}.")
    return {n: _reduce(source[n], keep, n) for n in names}


@dataclass
class NetworkComparison:
    """Layer-to-layer SVCCA between two networks on the same probe datapoints.

    Attributes:
        layers_a, layers_b: layer names of each network.
        matrix: ``(len(layers_a), len(layers_b))`` float64 similarities.
        kept_a, kept_b: ``{layer: kept directions}`` of each network.
    """

    layers_a: List[str]
    layers_b: List[str]
    matrix: torch.Tensor
    kept_a: Dict[str, int] = field(default_factory=dict)
    kept_b: Dict[str, int] = field(default_factory=dict)

    @property
    def narrow(self) -> Dict[str, List[int]]:
        """``{layer: [kept directions in a, in b]}`` of the layers too narrow for their
        similarity to other layers to mean much (at most :data:`NARROW_LAYER_DIRECTIONS`
        kept directions in either network; the warning of :func:`compare_networks`)."""
        out: Dict[str, List[int]] = {}
        for side in (self.kept_a, self.kept_b):
            for name, k in side.items():
                if k <= NARROW_LAYER_DIRECTIONS:
                    out.setdefault(name, [v for v in (self.kept_a.get(name), self.kept_b.get(name)) if v is not None])
        return out


def compare_networks(
    a: Source,
    b: Source,
    *,
    checkpoint_a: Optional[CheckpointRef] = None,
    checkpoint_b: Optional[CheckpointRef] = None,
    layers_a: Optional[Sequence[str]] = None,
    layers_b: Optional[Sequence[str]] = None,
    keep: Union[int, float] = 0.99,
) -> NetworkComparison:
    """SVCCA between every layer of network ``a`` and every layer of network ``b``.

    Args:
        a, b: a :class:`RepresentationStore` (its final checkpoint unless ``checkpoint_*``
            says otherwise) or ``{layer: activations (datapoints, neurons) or ReducedBasis}``
            (e.g. two :meth:`ActivationRecorder.record` results on the same probe).
        keep: SVD truncation used for raw activations (stored bases are used as stored).

    Both networks must be recorded on the same probe datapoints, in the same order.

    Warns (:class:`NarrowLayerWarning`, one warning naming each such layer, its kept
    directions and its width) when a layer keeps at most :data:`NARROW_LAYER_DIRECTIONS`
    directions: its similarity to the other network's layers is high whatever they are.
    """
    keep = check_keep(keep)
    ra = _representations(a, checkpoint_a, layers_a, keep, "a")
    rb = _representations(b, checkpoint_b, layers_b, keep, "b")
    _warn_narrow({"a": ra, "b": rb})
    return NetworkComparison(list(ra), list(rb), similarity_matrix(list(ra.values()), list(rb.values())),
                             kept_a={n: int(v.k) for n, v in ra.items()}, kept_b={n: int(v.k) for n, v in rb.items()})


@dataclass
class AlignedDirections:
    """Top neurons versus top SVCCA directions of one layer in two networks.

    Attributes:
        x_neurons, y_neurons: ``(datapoints, n)`` activations of each network's ``n``
            highest-norm neurons (largest root-mean-square activation over the probe).
        x_neuron_ids, y_neuron_ids: the indices of those neurons.
        neuron_correlations: ``(n,)`` correlation of ``x_neurons[:, i]`` with ``y_neurons[:, i]``.
        x_directions, y_directions: ``(datapoints, n)`` the top ``n`` pairs of SVCCA
            canonical variates (unit variance; pair ``i`` is aligned, signs matched).
        coefficients: ``(n,)`` the canonical correlations of those pairs.
    """

    x_neurons: torch.Tensor
    y_neurons: torch.Tensor
    x_neuron_ids: torch.Tensor
    y_neuron_ids: torch.Tensor
    neuron_correlations: torch.Tensor
    x_directions: torch.Tensor
    y_directions: torch.Tensor
    coefficients: torch.Tensor


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-30)


def aligned_directions(x: Any, y: Any, *, keep: Union[int, float] = 0.99, n: int = 2) -> AlignedDirections:
    """The paper's comparison of two networks' top neurons with their top SVCCA directions.

    Args:
        x, y: activations ``(datapoints, neurons)`` of one layer in two networks, on the
            same probe datapoints (raw activations: neurons cannot be recovered from a
            stored basis).
        keep: SVD truncation (see :func:`svcca_torch.svcca`).
        n: how many neurons / direction pairs (the paper shows 2).

    Typically the top neurons of two independently trained networks barely correlate,
    while the top SVCCA direction pairs correlate strongly: the networks learn the same
    subspace in different bases.
    """
    n = check_positive_int(n, "n")
    xt = check_activations(x, "x")
    yt = check_activations(y, "y")
    check_same_datapoints(xt, yt)
    res = svcca(xt, yt, keep=keep)
    r = res.coefficients.numel()
    if n > min(r, xt.shape[1], yt.shape[1]):
        raise ValueError(
            f"`n`={n} exceeds the {r} SVCCA direction pairs (or the neurons) available; pass a smaller `n` "
            "or a larger `keep`."
        )
    ix = xt.pow(2).mean(0).argsort(descending=True)[:n]
    iy = yt.pow(2).mean(0).argsort(descending=True)[:n]
    xd = res.x_variates[:, :n].to(torch.float64)
    yd = res.y_variates[:, :n].to(torch.float64)
    xd = xd / xd.std(0).clamp_min(1e-30)
    yd = yd / yd.std(0).clamp_min(1e-30)
    sign = torch.sign(_corr(xd, yd))
    yd = yd * torch.where(sign == 0, torch.ones_like(sign), sign)
    xn, yn = xt[:, ix], yt[:, iy]
    return AlignedDirections(
        x_neurons=xn,
        y_neurons=yn,
        x_neuron_ids=ix,
        y_neuron_ids=iy,
        neuron_correlations=_corr(xn.double(), yn.double()),
        x_directions=xd,
        y_directions=yd,
        coefficients=res.coefficients[:n].to(torch.float64),
    )


def class_target(labels: Any, cls: int, datapoint_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The one-hot indicator of class ``cls`` as a ``(datapoints, 1)`` float64 target.

    Args:
        labels: ``(N,)`` integer labels of the probe images.
        cls: the class.
        datapoint_index: ``(datapoints,)`` row -> probe image map, from
            :attr:`ActivationRecorder.datapoint_index` when conv maps were folded into
            several rows per image (default: one row per label).
    """
    lab = as_tensor(labels, "labels")
    if lab.ndim != 1 or lab.is_floating_point():
        raise ValueError(f"`labels` must be a 1-D integer tensor (N,), got dtype {lab.dtype} shape {tuple(lab.shape)}.")
    if datapoint_index is not None:
        lab = lab[datapoint_index.to(lab.device)]
    target = (lab == int(cls)).to(torch.float64)[:, None]
    if float(target.sum()) in (0.0, float(target.shape[0])):
        raise ValueError(f"`cls`={cls}: every datapoint is {'outside' if float(target.sum()) == 0 else 'inside'} "
                         "the class, so the indicator has no variance; pick a class present in the probe.")
    return target


@dataclass
class ClassSensitivity:
    """Per-layer SVCCA similarity to one class's output.

    Attributes:
        layers: layer names, bottom-up.
        values: ``(layers,)`` float64, each the correlation between the layer's top SVD
            subspace and the target (1 = the target is a linear function of the layer).
    """

    layers: List[str]
    values: torch.Tensor


def class_sensitivity(
    source: Source,
    target: Any,
    *,
    checkpoint: Optional[CheckpointRef] = None,
    layers: Optional[Sequence[str]] = None,
    keep: Union[int, float] = 0.99,
) -> ClassSensitivity:
    """How much each layer knows about one class, over depth (the paper's class sensitivity).

    Args:
        source: a :class:`RepresentationStore` (its final checkpoint unless ``checkpoint``
            is given) or ``{layer: activations (datapoints, neurons) or ReducedBasis}``.
        target: ``(datapoints,)`` or ``(datapoints, 1)``: the logit of one class (e.g.
            ``acts["fc"][:, c]`` from the same recording, row-aligned) or its one-hot label
            (:func:`class_target`). Rows must be the layers' datapoints.
        keep: SVD truncation for raw activations.

    Returns:
        :class:`ClassSensitivity`: SVCCA of each layer with the one-dimensional target,
        which is the multiple correlation of the target with the layer's top directions.
    """
    keep = check_keep(keep)
    reps = _representations(source, checkpoint, layers, keep, "source")
    t = as_tensor(target, "target")
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2 or t.shape[1] != 1:
        raise ValueError(
            f"`target` must be (datapoints,) or (datapoints, 1): one class's logit or one-hot label; "
            f"got shape {tuple(t.shape)}. For logits (datapoints, classes) pass logits[:, c]."
        )
    t = check_activations(t, "target", dtype=torch.float64)
    n = {b.n_datapoints for b in reps.values()}
    if n != {t.shape[0]}:
        raise ValueError(
            f"`target` has {t.shape[0]} rows but the layers have {sorted(n)} datapoints; map labels to rows "
            "with class_target(labels, c, recorder.datapoint_index)."
        )
    tb = svd_reduce(t, 1)
    m = similarity_matrix(list(reps.values()), [tb])
    return ClassSensitivity(list(reps), m[:, 0])


# ----------------------------------------------------------------------------------- convergence order
#: Similarity to the final state counted as converged by :func:`convergence_order`.
CONVERGED = 0.95


def _ranks(v: Sequence[float]) -> torch.Tensor:
    """Ranks from 0, ties sharing their mean rank."""
    t = torch.tensor([float(a) for a in v], dtype=torch.float64)
    r = torch.empty_like(t)
    r[torch.argsort(t, stable=True)] = torch.arange(len(t), dtype=torch.float64)
    for val in torch.unique(t):
        m = t == val
        r[m] = r[m].mean()
    return r


def _spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    if len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / den if den > 0 else None


def _permutation_p(x: Sequence[float], y: Sequence[float], rho: float, draws: int = 20000) -> float:
    """One-sided p-value of a Spearman rho at least ``rho`` under random orders of ``y``:
    exact up to 8 values, else ``draws`` seeded random permutations. Ranks move with a
    permutation, so both sides are ranked once and every permuted rho is one matrix product."""
    import itertools

    n = len(y)
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    if n <= 8:
        perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long)
    else:
        g = torch.Generator().manual_seed(0)
        perms = torch.stack([torch.randperm(n, generator=g) for _ in range(draws)])
    rhos = ry[perms] @ rx / den if den > 0 else torch.zeros(len(perms), dtype=torch.float64)
    return float((rhos >= rho - 1e-12).double().mean())


def convergence_order(curves: LayerCurves, *, threshold: float = CONVERGED,
                      freeze_steps: Optional[Mapping[str, int]] = None) -> Dict[str, Any]:
    """When each layer converged, and how strongly that follows depth (the paper's "lower
    layers converge first"), stated with its statistic.

    A layer converged at the first capture from which its similarity to its own final state
    stays ``>= threshold``. A frozen layer is judged on its captures before its freeze step
    only (from its freeze on it equals its final state by construction); one that had not
    reached ``threshold`` by then is left out (freezing, not training, settled it). The order
    is Spearman's rho between depth (the layers' order) and the convergence steps, ties at
    their mean rank, with a one-sided permutation p-value (exact up to 8 layers).

    Args:
        curves: the to-final curves, e.g. :meth:`LearningDynamics.curves`.
        threshold: similarity counted as converged (0.95).
        freeze_steps: ``{layer: step it was frozen}``.

    Returns:
        ``{"threshold", "steps": {layer: step or None}, "excluded": {layer: why},
        "spearman", "n_layers", "tied_layers", "p_value", "lower_first", "statement"}``;
        ``lower_first`` is True only at rho > 0 with p < 0.05, None with fewer than 3 layers.
    """
    if not isinstance(curves, LayerCurves):
        raise ValueError(f"`curves` must be a LayerCurves (LearningDynamics.curves()), got {type(curves).__name__}.")
    threshold = float(threshold)
    frozen = {n: int(s) for n, s in (freeze_steps or {}).items()}
    steps: Dict[str, Optional[int]] = {}
    excluded: Dict[str, str] = {}
    for j, name in enumerate(curves.layers):
        cut = frozen.get(name)
        rows = [(int(st), float(curves.values[c, j])) for c, st in enumerate(curves.steps)
                if (cut is None or st < cut) and math.isfinite(float(curves.values[c, j]))]
        at: Optional[int] = None
        for k in range(len(rows) - 1, -1, -1):
            if rows[k][1] < threshold:
                break
            at = rows[k][0]
        if cut is not None and (at is None or len(rows) < 2):
            excluded[name] = (f"frozen at step {cut} before its captures showed it at {threshold:g}: freezing, "
                              "not training, settled it")
            steps[name] = None
            continue
        if at is None:
            excluded[name] = "no finite similarity to its final state"
        steps[name] = at
    used = [(d, steps[n]) for d, n in enumerate(curves.layers) if steps[n] is not None]
    depth, when = [d for d, _ in used], [float(s) for _, s in used]  # type: ignore[misc]
    rho = _spearman(depth, when) if len(used) >= 3 else None
    tied = sum(1 for s in when if when.count(s) > 1)
    p = _permutation_p(depth, when, rho) if rho is not None else None
    lower_first = None if rho is None else bool(rho > 0 and p is not None and p < 0.05)
    if rho is None and len(used) >= 3:
        statement = (f"convergence order: all {len(used)} layers reached {threshold:g} at the same capture (step "
                     f"{int(when[0])}), so the captures cannot order them")
    elif rho is None:
        statement = (f"convergence order: too few layers to judge ({len(used)} with a convergence step of their "
                     f"own; at least 3 needed)")
    else:
        strength = ("no evidence that lower layers converge first" if rho <= 0 else
                    "strong evidence" if rho >= 0.7 and p < 0.05 else
                    "moderate evidence" if rho >= 0.4 and p < 0.1 else "weak evidence")
        if rho > 0:
            strength += " that lower layers converge first"
        statement = (f"convergence order (first capture from which the similarity to the final state stays >= "
                     f"{threshold:g}): Spearman rho(depth, step) = {rho:+.2f} over {len(used)} layers"
                     + (f" ({tied} share a step)" if tied else "") + f", one-sided permutation p = {p:.2g}: {strength}")
    if excluded:
        statement += "; left out: " + ", ".join(f"{n} ({why})" for n, why in excluded.items())
    return {"threshold": threshold, "steps": steps, "excluded": excluded, "spearman": rho, "n_layers": len(used),
            "tied_layers": tied, "p_value": p, "lower_first": lower_first, "statement": statement}
