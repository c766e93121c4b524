"""Rows: how what the hooks kept of each layer becomes ``(datapoints, neurons)`` tensors.

The token rows kept per input (:class:`_Tokens`), the assembly of a capture's kept outputs
into rows per layer (:class:`RowAssembler`, common or per-layer rows), and the datapoints a
recording holds (:func:`direction_limits`).

How layers of different shapes are brought to datapoints
--------------------------------------------------------
* Conv maps ``(N, C, H, W)``: while the probe runs, each batch's map is average-pooled
  (or bilinearly resized, ``resize="interpolate"``) to at most ``grid x grid``.
  With ``rows="common"`` (default) every conv layer is then brought to the *smallest* of
  those grids over all the recorder's layers (so a net whose last map is 1x1 ends on 1x1,
  also in a capture of a subset of the layers: a layer's rows do not depend on which other
  layers a capture records), and its positions are folded
  into datapoints with :func:`svcca_torch.conv_to_datapoints`: ``(N * h * w, C)``, row
  ``i`` of every layer is the same (image, grid cell), as layers x layers heatmaps need.
  With ``rows="per_layer"`` each conv layer keeps its own grid (up to ``grid``), so a deep
  1x1 map does not reduce every other layer to one datapoint per image; rows then match
  only within a layer (over checkpoints: same-layer comparisons such as similarity to the
  previous or the final capture), and :attr:`ActivationRecorder.layer_datapoint_index`
  gives each layer's row -> image map.
  With ``max_datapoints`` the rows are subsampled (per layer) with a fixed ``seed``; the
  subsample depends only on ``(N, h, w, max_datapoints, seed)``, so the same rows are kept
  at every checkpoint.
  Effect: pooling to a coarse grid keeps each channel's response per image region and
  drops finer spatial detail; SVCCA between conv layers then compares region-level
  features (the paper's own approach for maps of different sizes is to resize them).
* Token sequences ``(N, L, D)`` (transformer layers, embeddings, an LSTM's output sequence;
  sequence first ``(L, N, D)`` found when dim 1, not dim 0, is the batch size, an ambiguous
  output an error that says to name it in ``layouts``): L tokens of D neurons, each token a
  datapoint as conv positions are. While the probe runs, each input keeps ``max_tokens``
  (default ``grid * grid``) of its real tokens, evenly spaced and the first one included (a
  padding mask, a nested-tensor or ``PackedSequence`` output's lengths exclude padding), so
  the same tokens at every capture and in every layer of that length. With ``rows="common"``
  token layers that hold the same tokens share rows (input, token) and dense layers are
  repeated per token; when token layers hold different tokens, or conv maps are recorded too,
  no position is common to all layers and every layer gives one row per input (conv maps
  averaged over their grid, sequences over their real tokens). With ``rows="per_layer"`` each
  token layer has its own (input, token) rows. ``max_datapoints`` subsamples them as it does
  conv cells. Channels-last maps ``(N, H, W, C)`` (Swin) are treated as conv maps once found
  (a linear layer or LayerNorm runs last in the module) or named ``"NHWC"``.
* Dense outputs ``(N, features)`` (and any other shape, flattened to ``(N, -1)``): when
  conv layers are folded to ``h * w > 1`` common cells, each image's dense row is repeated
  for its cells, so that row ``i`` still means the same datapoint. A dense layer cannot vary
  within an image, so its similarity to a conv layer is capped by how much of that conv
  layer's variance lies between images rather than within them; comparisons among dense
  layers, or of a layer with itself over training, are unaffected. Use ``grid=1`` (global
  average pooling, ``N`` datapoints) when conv-to-dense comparisons matter more than
  datapoints. With ``rows="per_layer"`` a dense layer has ``N`` rows, one per image.
  :func:`direction_limits` counts a repeated row once (distinct datapoints).

:attr:`ActivationRecorder.datapoint_index` maps each returned row to its probe image, so
labels can be lined up with the rows (``labels[recorder.datapoint_index]``).
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..functional.conv import _fold, conv_datapoint_indices, resize_map
from ..utils.validation import MIN_DATAPOINTS_PER_DIRECTION

#: ``rows`` settings of :class:`ActivationRecorder`.
ROW_MODES: Tuple[str, ...] = ("common", "per_layer")


def _distinct_rows(t: torch.Tensor) -> int:
    """Rows of ``t`` (datapoints first) not equal to the row before them: the datapoints a
    recording holds when a layer's rows are repeated (a dense layer's row for each of its
    input's conv cells or tokens, in common rows)."""
    if t.ndim != 2 or t.shape[0] < 2:
        return int(t.shape[0])
    return 1 + int((t[1:] != t[:-1]).any(1).sum())


def direction_limits(acts: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """The most SVD directions each recorded layer's datapoints support: distinct
    datapoints ``//`` :data:`~svcca_torch.utils.validation.MIN_DATAPOINTS_PER_DIRECTION`
    (at least 1).

    Keeping more directions than this makes CCA report spuriously high similarity (the
    few-datapoints warning). ``acts`` is a :meth:`ActivationRecorder.record` result,
    ``{layer: (datapoints, neurons)}``; with ``rows="per_layer"`` each layer has its own
    datapoints, so its own limit. A row equal to the row before it (a dense layer's row
    repeated for each conv cell or token of its input in common rows) is not counted again.
    Pass a layer's limit as its ``max_directions``."""
    return {n: max(1, _distinct_rows(t) // MIN_DATAPOINTS_PER_DIRECTION) for n, t in acts.items()}


class _Tokens:
    """A token layer's kept rows: ``x`` ``(N, T, D)`` (T token slots per input), ``pos``
    ``(N, T)`` the token position each slot holds (-1: an empty slot, the input has fewer
    real tokens), ``mean`` ``(N, D)`` the mean of each input's real tokens."""

    __slots__ = ("x", "pos", "mean")

    def __init__(self, x: torch.Tensor, pos: torch.Tensor, mean: torch.Tensor) -> None:
        self.x, self.pos, self.mean = x, pos, mean

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.x.shape)

    def signature(self) -> str:
        """Digest of the kept positions: token layers with equal ones hold the same tokens."""
        p = self.pos.cpu().contiguous()
        return hashlib.sha1(str(tuple(p.shape)).encode() + p.numpy().tobytes()).hexdigest()


def _token_rows(t: torch.Tensor, valid: Optional[torch.Tensor], slots: int) -> _Tokens:
    """At most ``slots`` tokens of each input of ``t`` ``(n, L, D)``, evenly spaced over its
    real tokens (``valid`` ``(n, L)``: True for a real token; None: all are), first token
    included: a fixed choice, the same at every capture and in every layer of that length."""
    n, length, d = t.shape
    device = t.device
    if valid is None:
        v = torch.full((n,), length, dtype=torch.long, device=device)
    else:
        valid = valid.to(device=device, dtype=torch.bool)
        v = valid.sum(1)
    k = v.clamp(max=slots)
    j = torch.arange(slots, device=device)
    ok = j[None] < k[:, None]
    rank = (j[None] * v[:, None]) // k.clamp(min=1)[:, None]
    if valid is None:
        pos = rank
    else:
        pos = torch.searchsorted(valid.long().cumsum(1), rank + 1)
    pos = torch.where(ok, pos.clamp(max=max(length - 1, 0)), torch.full_like(pos, -1))
    x = t.gather(1, pos.clamp(min=0)[..., None].expand(n, slots, d)) * ok[..., None]
    if valid is None:
        mean = t.mean(1)
    else:
        mean = (t * valid[..., None]).sum(1) / v.clamp(min=1)[:, None]
    return _Tokens(x, pos, mean)


class Assembled(NamedTuple):
    """What :meth:`RowAssembler.assemble` gives: ``acts`` ``{layer: (datapoints, neurons)}``;
    for common rows, each row's probe input and the grid conv layers were folded on (see
    :attr:`ActivationRecorder.datapoint_index` and ``conv_grid``); for per-layer rows, per
    layer, the same (``layer_datapoint_index`` and ``layer_grids``)."""

    acts: Dict[str, torch.Tensor]
    datapoint_index: Optional[torch.Tensor]
    conv_grid: Optional[Tuple[int, int]]
    layer_datapoint_index: Dict[str, torch.Tensor]
    layer_grids: Dict[str, Tuple[int, int]]


class RowAssembler:
    """Brings a capture's kept outputs (pooled maps ``(N, C, h, w)``, dense ``(N, D)`` or
    :class:`_Tokens`) to ``(datapoints, neurons)`` rows, as the module docstring describes.

    It remembers what every layer of the recorder kept so far (its pooled grid, its token
    positions), so that a capture of a subset of the layers gets the rows a full capture
    would."""

    def __init__(self) -> None:
        # each layer's pooled grid (None: not a conv map), known once a full forward has run;
        # the common grid is the smallest over all layers, also when a capture records a subset
        self.grids: Dict[str, Optional[Tuple[int, int]]] = {}
        # token layers: digest of the kept token positions (None: a token layer, positions unknown yet),
        # and the positions of each digest (a capture of dense layers alone still gets the token rows)
        self.token_sigs: Dict[str, Optional[str]] = {}
        self.token_pos: Dict[str, torch.Tensor] = {}

    def note_traced(self, n: str, layout: Optional[str], shape: Tuple[int, ...], grid: int) -> None:
        """What a traced forward showed of layer ``n``'s output (``layout``, None: not known;
        ``shape``), before a capture: its pooled grid (sides at most ``grid``), or that it is a
        token layer."""
        if layout in ("NCHW", "NHWC"):
            h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
            self.grids[n] = (min(grid, h), min(grid, w))
        elif layout is not None:
            self.grids[n] = None
            if layout in ("NLD", "LND"):
                self.token_sigs.setdefault(n, None)

    def join(self, n: str, pieces: List[Any]) -> Any:
        """Layer ``n``'s kept outputs of every batch as one, its grid and token positions noted."""
        kinds = {type(p) for p in pieces} | {p.ndim for p in pieces if isinstance(p, torch.Tensor)}
        if len(kinds) > 2 or (len(kinds) == 2 and _Tokens in kinds):
            raise ValueError(f"layer {n!r} returned outputs of different kinds in different batches: "
                             f"{[p.shape for p in pieces]}.")
        if isinstance(pieces[0], _Tokens):
            t: Any = _Tokens(torch.cat([p.x for p in pieces]), torch.cat([p.pos for p in pieces]),
                             torch.cat([p.mean for p in pieces]))
            self.grids[n] = None
            self.token_sigs[n] = t.signature()
            self.token_pos[self.token_sigs[n]] = t.pos.cpu()
        else:
            t = torch.cat(pieces)
            self.grids[n] = (int(t.shape[2]), int(t.shape[3])) if t.ndim == 4 else None
            self.token_sigs.pop(n, None)
        return t

    def common_mode(self, maps: Dict[str, Any], layers: Sequence[str]) -> str:
        """How the common rows are formed: ``"conv"`` (conv cells, today's fold; also when
        nothing has positions), ``"tokens"`` (token slots shared by every token layer) or
        ``"input"`` (one row per input: conv maps and token sequences both recorded, or token
        layers holding different tokens)."""
        known = all(n in self.grids for n in layers)
        relevant = [n for n in layers if n in maps or (known and n in self.grids)]
        tokens = [n for n in relevant if n in self.token_sigs]
        if not tokens:
            return "conv"
        convs = [n for n in relevant if self.grids.get(n) is not None]
        sigs = {self.token_sigs[n] for n in tokens} - {None}
        here = [maps[n].pos for n in maps if isinstance(maps[n], _Tokens)]
        same = all(p.shape == here[0].shape and torch.equal(p, here[0]) for p in here[1:])
        if convs or len(sigs) > 1 or not same:
            return "input"
        if not here:  # dense layers alone: the token rows of an earlier capture of this probe, if any
            n_images = next(iter(maps.values())).shape[0]
            pos = self.token_pos.get(next(iter(sigs))) if sigs else None
            if pos is None or pos.shape[0] != n_images:
                return "input"
        return "tokens"

    def assemble(self, maps: Dict[str, Any], rows: str, layers: Sequence[str], target: Optional[torch.device], *,
                 resize: str, max_datapoints: Optional[int], seed: int) -> Assembled:
        """Fold the kept outputs into ``(datapoints, neurons)`` (``rows``: ``"common"`` or
        ``"per_layer"``; ``layers``: all the recorder's layers, in order; ``target``: where the
        result goes, None: where it is); consumes ``maps``."""
        datapoint_index: Optional[torch.Tensor] = None
        conv_grid: Optional[Tuple[int, int]] = None
        layer_index: Dict[str, torch.Tensor] = {}
        layer_grids: Dict[str, Tuple[int, int]] = {}
        n_images = next(iter(maps.values())).shape[0]
        out: Dict[str, torch.Tensor] = {}

        def put(n: str, t: torch.Tensor) -> None:
            out[n] = t.to(target).contiguous() if target is not None else t.contiguous()

        if rows == "common":
            mode = self.common_mode(maps, layers)
            if mode == "tokens":
                pos = next((m.pos for m in maps.values() if isinstance(m, _Tokens)), None)
                if pos is None:  # dense layers alone: the token rows of the earlier full capture
                    known = {self.token_sigs[n] for n in layers if self.token_sigs.get(n)}
                    pos = self.token_pos[known.pop()]
                slots = int(pos.shape[1])
                ids = _subsample((pos >= 0).flatten().nonzero()[:, 0].cpu(), max_datapoints, seed)
                index = ids // slots
                datapoint_index = index
                conv_grid = (1, slots) if bool((pos >= 0).all()) else None
                for n in list(maps):
                    t = maps.pop(n)
                    if isinstance(t, _Tokens):
                        t = t.x.reshape(-1, t.x.shape[2])[ids.to(t.x.device)]
                    else:
                        t = t[index.to(t.device)]
                    put(n, t)
                return Assembled(out, datapoint_index, conv_grid, {}, {})
            if mode == "input":
                index = _subsample(torch.arange(n_images), max_datapoints, seed)
                datapoint_index = index
                conv_grid = (1, 1)
                for n in list(maps):
                    t = maps.pop(n)
                    if isinstance(t, _Tokens):
                        t = t.mean
                    elif t.ndim == 4:
                        t = resize_map(t, (1, 1), resize).flatten(1)
                    put(n, t[index.to(t.device)])
                return Assembled(out, datapoint_index, conv_grid, {}, {})
            known = all(n in self.grids for n in layers)
            convs = [g for n, g in self.grids.items() if g is not None and (n in maps or known)]
            if convs:
                h, w = min(g[0] for g in convs), min(g[1] for g in convs)
                conv_grid = (h, w)
            else:
                h = w = 1
                conv_grid = None
            kept = conv_datapoint_indices(n_images, (h, w), max_datapoints=max_datapoints, seed=seed)
            if kept is None:
                kept = torch.arange(n_images * h * w)
            index = kept // (h * w)
            datapoint_index = index
            for n in list(maps):
                t = maps.pop(n)
                if t.ndim == 4:
                    t = _fold_map(t, (h, w), resize, max_datapoints, seed)
                else:
                    t = t[index.to(t.device)]
                put(n, t)
            return Assembled(out, datapoint_index, conv_grid, {}, {})
        for n in list(maps):
            t = maps.pop(n)
            if isinstance(t, _Tokens):
                slots = int(t.pos.shape[1])
                ids = _subsample((t.pos >= 0).flatten().nonzero()[:, 0].cpu(), max_datapoints, seed)
                layer_grids[n] = (1, slots)
                layer_index[n] = ids // slots
                put(n, t.x.reshape(-1, t.x.shape[2])[ids.to(t.x.device)])
                continue
            h, w = (int(t.shape[2]), int(t.shape[3])) if t.ndim == 4 else (1, 1)
            kept = conv_datapoint_indices(n_images, (h, w), max_datapoints=max_datapoints, seed=seed)
            if t.ndim == 4:
                t = _fold_map(t, None, resize, max_datapoints, seed)
            elif kept is not None:
                t = t[kept.to(t.device)]
            if kept is None:
                kept = torch.arange(n_images * h * w)
            layer_grids[n] = (h, w)
            layer_index[n] = kept // (h * w)
            put(n, t)
        return Assembled(out, None, None, layer_index, layer_grids)


def _fold_map(t: torch.Tensor, size: Optional[Tuple[int, int]], resize: str, max_datapoints: Optional[int],
              seed: int) -> torch.Tensor:
    """:func:`svcca_torch.conv_to_datapoints` of a pooled float32 map ``(N, C, h, w)``
    without its input check: the map is valid by construction, and a NaN/Inf in it is
    reported by whatever compares the layer, which knows its name (a tracker: the step
    too), instead of here as an anonymous ``x``."""
    if size is not None:
        t = resize_map(t, size, resize)
    n, _, h, w = t.shape
    return _fold(t, conv_datapoint_indices(n, (h, w), max_datapoints=max_datapoints, seed=seed))


def _subsample(rows: torch.Tensor, max_datapoints: Optional[int], seed: int) -> torch.Tensor:
    """The fixed-seed ``max_datapoints`` subsample of candidate row ids (sorted, CPU)."""
    kept = conv_datapoint_indices(int(rows.shape[0]), (1, 1), max_datapoints=max_datapoints, seed=seed)
    return rows if kept is None else rows[kept]
