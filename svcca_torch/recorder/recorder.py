"""The recorder: :class:`ActivationRecorder` hooks the chosen layers, runs the probe and
returns one ``(datapoints, neurons)`` tensor per layer.

The package's other modules do the parts it calls (:mod:`svcca_torch.recorder` lists them).

Where the work runs
-------------------
Probe batches go to the model's device; the hooks pool each batch's maps there and keep
only the pooled maps (no per-batch copy to the CPU); the fold and subsample also run there,
and :meth:`~ActivationRecorder.record` returns float32 tensors on that device
(``out_device="cpu"`` for the CPU). Peak device memory is one batch's forward plus the
pooled maps of the whole probe (``N * C * h * w`` float32 per layer).

Partial captures
----------------
``record(probe, layers=subset)`` hooks only ``subset`` and, once the layer order is known,
ends each batch's forward as soon as the last of them has run (the rest of the network is
not computed): a capture of the lowest layers costs only the bottom of the network.
:attr:`ActivationRecorder.last_seconds` is the wall time of the last capture.
"""
from __future__ import annotations

import itertools
import logging
import time
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..functional.conv import RESIZE_MODES
from ..utils.validation import check_choice, check_positive_int
from .inputs import _check_call, _first_batch, _input_set, _iter_probe, _reiterable, to_model
from .layers import LayerSpec, _choose, _declared, _may_merge, _merging, select_layers
from .layouts import batch_padding, check_layouts, check_padding_mask, find_layout, keep_output
from .order import LayerOrderWarning, _check_calls, _modes_and_hooks_restored, _StopForward, _survey
from .rows import ROW_MODES, RowAssembler

logger = logging.getLogger(__name__)


class ActivationRecorder:
    """Record chosen layers' outputs on a probe set, as ``(datapoints, neurons)`` tensors.

    Args:
        model: any ``nn.Module``. It is not modified: hooks exist only during
            :meth:`record`, and every module's own train/eval mode is restored afterwards.
        layers: which modules to record; see :func:`select_layers`. Default: the model's
            blocks and the weight layers outside them, as far as they run in an eval-mode
            forward of the probe (:func:`default_layers`, applied at the first
            :meth:`order_layers` or :meth:`record`, or ``example_input``); the choice is
            logged and available as :attr:`layers`, in forward order once traced.
        grid: largest side of the spatial grid conv maps are pooled to (default 2). With
            ``rows="common"`` the grid used is the smallest of ``min(grid, H)`` x
            ``min(grid, W)`` over the recorded conv layers; with ``rows="per_layer"`` each
            layer's own. See the module docstring for the effect.
        resize: ``"avgpool"`` (adaptive average pooling) or ``"interpolate"`` (bilinear).
        max_datapoints: cap on the rows returned per layer (fixed-seed subsample of the
            (input, cell or token) rows); ``None`` keeps all.
        seed: seed of that subsample.
        batch_size: batch size used when the probe is a tensor or a tuple/dict of tensors.
        device: where the probe batches are sent (default: the model's device).
        rows: ``"common"`` (default: the same rows for every layer, for layers x layers
            comparisons) or ``"per_layer"`` (each layer its own cells or tokens, for
            same-layer comparisons over training); :meth:`record` can override it.
        out_device: where :meth:`record` returns its tensors (default ``None``: the device
            the model ran on); :meth:`record` can override it.
        example_input: one batch of model input; if given, :attr:`layers` is chosen (default
            layers) and put in forward order now (:meth:`order_layers`).
        max_tokens: token positions kept per input of a sequence layer (default ``grid *
            grid``, as many as conv cells), evenly spaced over its real tokens.
        layouts: ``{layer: layout}`` for outputs whose layout is not found on its own, from
            :data:`LAYOUTS`: ``"LND"`` for a sequence-first layer whose sequence length equals
            the batch size, ``"NHWC"`` for a channels-last map the traced forward does not
            reveal, ``"ND"`` to flatten.
        padding_mask: which probe input marks padding tokens, ``(N, L)``: the name of a forward
            parameter (or dict key), a position in the inputs, or a callable taking the
            batch's inputs as the forward does and returning the mask; ``None`` (default): the
            forward parameter named as one of :data:`MASK_NAMES`, if any; ``False``: none. A
            boolean mask marks padding with True (PyTorch's ``key_padding_mask``), any other
            marks real tokens with nonzero values (Hugging Face's ``attention_mask``).
            Outputs of that sequence length keep only real tokens; nested-tensor outputs (the
            fused ``nn.TransformerEncoder`` path) and ``PackedSequence`` outputs carry their
            own lengths.

    Memory: while recording, each layer keeps ``N * C * h * w`` float32 values (the pooled
    maps; tokens: ``N * (max_tokens + 1) * D``) on the model's device, never the
    full-resolution maps or sequences of the whole probe set.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Optional[Sequence[LayerSpec]] = None,
        *,
        grid: int = 2,
        resize: str = "avgpool",
        max_datapoints: Optional[int] = None,
        seed: int = 0,
        batch_size: int = 256,
        device: Optional[Union[str, torch.device]] = None,
        rows: str = "common",
        out_device: Optional[Union[str, torch.device]] = None,
        example_input: Any = None,
        max_tokens: Optional[int] = None,
        layouts: Optional[Mapping[str, str]] = None,
        padding_mask: Union[None, bool, str, int, Callable[..., torch.Tensor]] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        grid = check_positive_int(grid, "grid")
        check_choice(resize, "resize", RESIZE_MODES)
        check_choice(rows, "rows", ROW_MODES)
        if max_datapoints is not None:
            max_datapoints = check_positive_int(max_datapoints, "max_datapoints", minimum=2)
        batch_size = check_positive_int(batch_size, "batch_size")
        self.max_tokens = grid * grid if max_tokens is None else check_positive_int(max_tokens, "max_tokens")
        layouts = check_layouts(layouts, model)
        check_padding_mask(padding_mask)
        self.model = model
        self.layers: List[str] = select_layers(model, layers)
        #: whether :attr:`layers` is in traced forward order (else the order given).
        self.ordered = False
        # default layers are chosen on a traced forward of the probe (what runs, what merges)
        self._resolved = layers is not None or _declared(model) is not None
        self.grid = grid
        self.resize = resize
        self.max_datapoints = max_datapoints
        self.seed = seed
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else None
        self.rows = rows
        self.out_device = torch.device(out_device) if out_device is not None else None
        self.padding_mask = padding_mask
        #: Each recorded layer's output layout (:data:`LAYOUTS`): as given in ``layouts=``, else as
        #: found (a 3-d output is sequence first when its dim 1, not dim 0, is the batch size).
        self.layouts: Dict[str, str] = layouts
        self._given_layouts = set(layouts)
        #: Row -> probe input index (``(datapoints,)`` long, CPU) of the last common-rows result.
        self.datapoint_index: Optional[torch.Tensor] = None
        #: ``(h, w)`` grid conv layers were folded on in the last common-rows result (None: no conv
        #: map on its own grid; ``(1, T)`` when the rows are T token slots of every input).
        self.conv_grid: Optional[Tuple[int, int]] = None
        #: Per layer, row -> probe input index (CPU long) of the last per-layer-rows result.
        self.layer_datapoint_index: Dict[str, torch.Tensor] = {}
        #: Per layer, the ``(h, w)`` grid of the last per-layer-rows result ((1, 1) for dense
        #: layers, ``(1, max_tokens)`` token slots for sequence layers).
        self.layer_grids: Dict[str, Tuple[int, int]] = {}
        #: Wall time in seconds of the last :meth:`record` / :meth:`record_both` (None before).
        self.last_seconds: Optional[float] = None
        #: Whether the last capture ended the forward passes early (after its last needed layer).
        self.last_stopped_early = False
        # each layer's pooled grid and kept token positions: how a capture's outputs become rows
        self._rows = RowAssembler()
        logger.info("ActivationRecorder records %d layers: %s", len(self.layers), ", ".join(self.layers))
        if example_input is not None:
            self.order_layers(example_input)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={self.layers}, grid={self.grid}, resize={self.resize!r}, "
            f"max_datapoints={self.max_datapoints}, seed={self.seed}, rows={self.rows!r}, "
            f"max_tokens={self.max_tokens}, layouts={self.layouts})"
        )

    # ------------------------------------------------------------------ layer choice and order
    def order_layers(self, probe: Any) -> List[str]:
        """Choose the default layers (if :attr:`layers` was not given), put :attr:`layers` in
        the order the forward pass reaches them and return it.

        One traced forward of ``probe``'s first batch (a tensor probe: its first
        ``batch_size`` inputs; or one batch, tuple or dict as a DataLoader yields), eval +
        ``no_grad``, modes restored, with hooks on every module: the default layers are
        those :func:`default_layers` finds in it (plus one forward with gradients enabled
        when unnamed modules need checking for skip connections). Call it before building
        anything bottom-up on :attr:`layers` (freeze groups) if no :meth:`record` has run yet.
        A forward that raises leaves the layers and order given, with a
        :class:`LayerOrderWarning`.

        Raises:
            ValueError: a recorded layer did not run, or ran more than once (a shared
                module) in the traced forward: it cannot be recorded; or the batch does
                not fit the model's forward (its parameters are named).
        """
        batch = to_model(_first_batch(probe, self.batch_size, self.model), self.model, self.device)
        _check_call(self.model, batch)
        try:
            survey = _survey(self.model, batch)
            if not self._resolved:
                merge = _merging(self.model, batch, survey) if _may_merge(self.model, survey) else set()
                chosen = _choose(self.model, ran=survey.ran, usable=survey.usable, merges=merge.__contains__)
                if chosen:
                    self.layers = sorted(chosen, key=survey.exit_rank)
                    logger.info("ActivationRecorder: default layers (traced): %s", ", ".join(self.layers))
        except Exception as err:
            self._resolved = True
            warnings.warn(
                f"the forward order of the recorded layers could not be traced ({type(err).__name__}: {err}); "
                f"they keep the order given: {self.layers}.",
                LayerOrderWarning,
                stacklevel=2,
            )
            return list(self.layers)
        self._resolved = True
        unknown = [n for n in self.layouts if n not in self.layers]
        if unknown:
            raise ValueError(f"`layouts` names {unknown}, which are not recorded; recorded layers: {self.layers}.")
        _check_calls({n: survey.calls.get(n, 0) for n in self.layers})
        self._set_order([n for n in survey.names if n in set(self.layers)])
        modules = dict(self.model.named_modules())
        for n in self.layers:
            shape = survey.shapes.get(n)
            if shape is None:
                continue
            if n not in self.layouts and len(shape) == 4 and survey.channels_last(n):
                self.layouts[n] = "NHWC"
            layout = find_layout(self.layouts, self._given_layouts, n, modules[n], shape, survey.n, strict=False)
            self._rows.note_traced(n, layout, shape, self.grid)
        return list(self.layers)

    def _set_order(self, order: List[str]) -> None:
        if order != self.layers:
            logger.info("ActivationRecorder: layers in forward order: %s", ", ".join(order))
        self.layers = list(order)
        self.ordered = True

    def _resolve(self, probe: Any) -> Any:
        """Choose the default layers on the probe's first batch if not done yet; the probe to
        iterate (a one-shot iterator with its first batch put back)."""
        if self._resolved:
            return probe
        if _reiterable(probe) or _input_set(probe, self.model) is not None:
            self.order_layers(probe)
            return probe
        iterator = iter(probe)
        try:
            first = next(iterator)
        except StopIteration:
            raise ValueError("`probe` yielded no batches; pass at least one input.") from None
        self.order_layers([first])
        return itertools.chain([first], iterator)

    # ------------------------------------------------------------------ capture
    def _subset(self, layers: Optional[Sequence[str]]) -> List[str]:
        if layers is None:
            return list(self.layers)
        if isinstance(layers, str):
            layers = [layers]
        unknown = [n for n in layers if n not in self.layers]
        if unknown:
            raise ValueError(
                f"`layers`: {unknown} are not recorded by this recorder; choose among {self.layers}."
            )
        if not layers:
            raise ValueError("`layers` is empty; name at least one recorded layer (or None for all).")
        wanted = set(layers)
        return [n for n in self.layers if n in wanted]

    def _make_hook(self, name: str, store: Dict[str, List[Any]], calls: Dict[str, int],
                   state: Dict[str, Any]) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            calls[name] += 1
            if calls[name] > 1:
                raise ValueError(
                    f"layer {name!r} ({type(module).__name__}) ran more than once in one forward pass "
                    "(a shared module): its output is ambiguous. Record a module that runs once."
                )
            kept = keep_output(name, module, output, state["n"], state["pad"], layouts=self.layouts,
                               given=self._given_layouts, grid=self.grid, resize=self.resize,
                               max_tokens=self.max_tokens)
            store[name].append(kept)  # stays on the model's device
            if state["first"]:
                state["order"].append(name)
            state["fired"] += 1
            if state["stop_early"] and state["fired"] == len(calls):
                raise _StopForward

        return hook

    def _run(self, probe: Any, layers: Optional[Sequence[str]]) -> Dict[str, Any]:
        """Forward the probe batch by batch; ``{layer: pooled maps (N, C, h, w), dense (N, D)
        or _Tokens}`` on the model's device, in forward order."""
        probe = self._resolve(probe)
        names = self._subset(layers)
        full = len(names) == len(self.layers)
        if not full and not self.ordered and _reiterable(probe):
            # one traced batch first: the order (so this capture can stop early) and every
            # layer's grid (so the common rows are those of a full capture)
            self.order_layers(probe)
        captured: Dict[str, List[Any]] = {n: [] for n in names}
        calls: Dict[str, int] = {n: 0 for n in names}
        # early stop only once a full forward has shown every layer runs exactly once
        state: Dict[str, Any] = {"first": True, "order": [], "fired": 0, "stop_early": self.ordered,
                                 "stopped": False, "n": 0, "pad": None, "total": 0}
        self.datapoint_index, self.conv_grid = None, None
        self.layer_datapoint_index, self.layer_grids = {}, {}

        def run() -> None:
            for batch in _iter_probe(probe, self.batch_size, self.model):
                x = to_model(batch, self.model, self.device)
                if state["first"]:
                    _check_call(self.model, x)
                for n in calls:
                    calls[n] = 0
                state["fired"] = 0
                state["n"] = x.rows
                state["pad"] = batch_padding(self.padding_mask, self.model, x, state["n"])
                try:
                    x.call(self.model)
                except _StopForward:
                    state["stopped"] = True
                _check_calls(calls)
                state["total"] += state["n"]
                state["first"] = False

        hooks = {n: self._make_hook(n, captured, calls, state) for n in names}
        _modes_and_hooks_restored(self.model, hooks, run)
        if state["first"]:
            raise ValueError("`probe` yielded no batches; pass at least one input.")
        order: List[str] = state["order"]
        if full and not self.ordered:
            self._set_order(order)
        self.last_stopped_early = state["stopped"]
        out: Dict[str, Any] = {}
        for n in order:
            t = self._rows.join(n, captured.pop(n))
            if t.shape[0] != state["total"]:
                raise ValueError(f"layer {n!r} returned {t.shape[0]} rows but the probe has {state['total']} inputs.")
            out[n] = t
        return out

    def record(self, probe: Any, *, layers: Optional[Sequence[str]] = None, rows: Optional[str] = None,
               out_device: Optional[Union[str, torch.device]] = None) -> Dict[str, torch.Tensor]:
        """Run ``probe`` through the model and return ``{layer name: (datapoints, neurons)}``.

        Args:
            probe: a tensor of model inputs (split into ``batch_size`` batches); one set of
                several inputs, a tuple of tensors (positional, for a forward that takes them)
                or a dict of tensors (keywords named as the forward's parameters), all with the
                same first dimension (sliced alike); or a DataLoader/iterable yielding input
                tensors, ``(inputs, targets)`` batches or dict batches (see
                :func:`model_inputs`), any batch size. Use the same probe, in the same order,
                at every checkpoint.
            layers: record only these layers (names in :attr:`layers`); default all. Each
                batch's forward stops as soon as the last of them has run. If the layer
                order is not known yet (no full record or :meth:`order_layers` so far),
                one batch is traced first (not possible for a one-shot iterator probe:
                call :meth:`order_layers` first, else that capture runs whole forwards).
            rows: ``"common"`` (same rows for every layer) or ``"per_layer"`` (each layer
                its own cells or tokens); default the recorder's ``rows``.
            out_device: where the result goes (default: the recorder's ``out_device``,
                else the device the model ran on).

        Returns:
            A dict ordered by the layers' execution order in the forward pass (their depth),
            each value a float32 tensor ``(datapoints, neurons)``; see the module docstring
            for how conv maps ``(N, C, H, W)`` and token sequences ``(N, L, D)`` become
            datapoints. With common rows every layer has the same rows and
            :attr:`datapoint_index` gives each row's probe input; with per-layer rows,
            :attr:`layer_datapoint_index` and :attr:`layer_grids` do, per layer.
            :attr:`last_seconds` is this call's wall time.

        The model runs in eval mode under ``torch.no_grad``; afterwards every module's own
        train/eval flag is restored and every hook removed, also if the forward raises.
        """
        rows = self.rows if rows is None else check_choice(rows, "rows", ROW_MODES)
        t0 = time.perf_counter()
        maps = self._run(probe, layers)
        out = self._assemble(maps, rows, out_device)
        self._stop_clock(out, t0)
        return out

    def record_both(self, probe: Any, *, layers: Optional[Sequence[str]] = None,
                    out_device: Optional[Union[str, torch.device]] = None
                    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """``(common-rows result, per-layer-rows result)`` of :meth:`record` from one pass
        over the probe (for a capture that feeds both a layers x layers heatmap and
        same-layer comparisons). Sets :attr:`datapoint_index`, :attr:`conv_grid`,
        :attr:`layer_datapoint_index` and :attr:`layer_grids`."""
        t0 = time.perf_counter()
        maps = self._run(probe, layers)
        per_layer = self._assemble(dict(maps), "per_layer", out_device)
        common = self._assemble(maps, "common", out_device)
        self._stop_clock(common, t0)
        return common, per_layer

    def _stop_clock(self, out: Dict[str, torch.Tensor], t0: float) -> None:
        devices = {t.device for t in out.values() if t.device.type == "cuda"}
        for d in devices:  # kernels are asynchronous: count them in the wall time
            torch.cuda.synchronize(d)
        self.last_seconds = time.perf_counter() - t0

    def _assemble(self, maps: Dict[str, Any], rows: str,
                  out_device: Optional[Union[str, torch.device]]) -> Dict[str, torch.Tensor]:
        """Fold the kept outputs into ``(datapoints, neurons)`` (:meth:`RowAssembler.assemble
        <svcca_torch.recorder.rows.RowAssembler.assemble>`); consumes ``maps``."""
        target = torch.device(out_device) if out_device is not None else self.out_device
        done = self._rows.assemble(maps, rows, self.layers, target, resize=self.resize,
                                   max_datapoints=self.max_datapoints, seed=self.seed)
        if rows == "common":
            self.datapoint_index, self.conv_grid = done.datapoint_index, done.conv_grid
        else:
            self.layer_datapoint_index.update(done.layer_datapoint_index)
            self.layer_grids.update(done.layer_grids)
        return done.acts
