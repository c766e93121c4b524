"""FrozenPrefix: the one mechanism that serves the frozen prefix's kept output (see the package docstring)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..recorder import Inputs
from ..recorder.order import _modes_and_hooks_restored
from .contract import (RandomStreams, StateWatch, bits_hash, forward_context, input_tensor, real_forward,
                       restore_forward, same, streams_kept, tensors)
from .rows import Key, KeptRows, Level, SourceStats


@dataclass(frozen=True)
class FrozenPrefixStats:
    """What the frozen prefix did (:meth:`FrozenPrefix.stats`).

    Attributes:
        probe: the probe's rows (freeze-signal recordings; always on).
        cache: the training inputs' rows (the opt-in frozen-output cache), None when not asked for.
        checks_run, checks_failed: structural checks (one per frozen prefix, on the probe).
        events: ``(kind, message)`` in order: ``"check"``, ``"state"`` (the prefix's state
            changed), ``"off"`` and ``"suspended"`` (``message`` starts with the source).
    """

    probe: SourceStats
    cache: Optional[SourceStats]
    checks_run: int
    checks_failed: int
    events: Tuple[Tuple[str, str], ...]


@dataclass
class _Plan:
    """What the frozen modules do in one forward (decided at the first of them)."""

    rows_of: Optional[KeptRows]  # the source asked (None: the check's forced serve)
    training: bool = False
    next: int = 0  # the call-order position expected next
    serve: int = -1  # position that returns ``rows`` (-1: none, everything runs)
    rows: Optional[torch.Tensor] = None
    keys: Optional[Dict[int, List[Key]]] = None  # level position -> the samples' keys there (kept where it runs)
    verify: Optional[Level] = None  # level whose rows the real output is compared with
    streams: Optional[RandomStreams] = None  # the random streams before a prefix that runs


class FrozenPrefix:
    """Serves the frozen prefix's kept output to the probe's recordings and, with
    ``cache_bytes``, to training forwards (see the package docstring).

    Call :meth:`update` after every freeze, :meth:`note_step` after every training step, record
    the probe inside :meth:`probe_recording`, run the tracker's other forwards inside
    :meth:`paused` and :meth:`close` at the end of training; read :meth:`stats`.
    """

    #: probe inputs of the structural check (the first ones)
    CHECK_IMAGES = 8
    #: most bytes of the probe's kept rows (host memory)
    PROBE_BYTES = 256 << 20

    def __init__(self, model: nn.Module, cache_bytes: Optional[int] = None) -> None:
        self.model = model
        self._probe = KeptRows("probe", self.PROBE_BYTES)
        self._cache = KeptRows("training cache", cache_bytes) if cache_bytes is not None else None
        self._frozen: Dict[str, nn.Module] = {}
        self._order: List[str] = []
        self._position: Dict[str, int] = {}
        self._saved: Optional[Dict[str, Any]] = None  # the replaced forwards while installed
        self._holds = 0  # contexts that need the stubs installed (probe recordings, the check)
        self._watch: Optional[StateWatch] = None  # the prefix's state, taken at its check
        self._watched: Dict[str, nn.Module] = {}
        self._plan: Optional[_Plan] = None
        self._forced: Optional[_Plan] = None
        self._shapes: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}  # frozen module -> output (shape[1:], dtype)
        self._pause = 0
        self._probe_index: Optional[int] = None  # inside a probe recording: the next probe input's index
        self._verifying = False  # the probe's verifying forward (:meth:`_verify_probe`)
        self._example: Any = None  # the check's probe inputs
        self._epoch: Optional[int] = None
        self._updated = False  # the training cache's windows count from the first step after the first freeze
        self._checks = [0, 0]
        self._events: List[Tuple[str, str]] = []
        self._closed: Optional[FrozenPrefixStats] = None

    # ------------------------------------------------------------------ the window
    def stats(self) -> FrozenPrefixStats:
        """What it did so far (after :meth:`close`: at closing)."""
        if self._closed is not None:
            return self._closed
        return FrozenPrefixStats(self._probe.stats(), self._cache.stats() if self._cache is not None else None,
                                 self._checks[0], self._checks[1], tuple(self._events))

    def _sources(self) -> List[KeptRows]:
        return [s for s in (self._probe, self._cache) if s is not None]

    def _off(self, rows: KeptRows, why: str) -> None:
        if rows.off is None:
            self._events.append(("off", f"{rows.source}: {why}"))
        rows.turn_off(why)
        self._sync()

    # ------------------------------------------------------------------ control
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards inside run for real and keep nothing (the tracker's own), except those of
        :meth:`probe_recording`."""
        self._pause += 1
        try:
            yield
        finally:
            self._pause -= 1

    @contextlib.contextmanager
    def probe_recording(self) -> Iterator[None]:
        """The forwards inside are of the probe's inputs, from the first, in order (a recording):
        served from the probe's rows where it may, keeping them where it runs."""
        if not self._order or self._probe.off is not None or self._probe_index is not None:
            yield
            return
        self._seen_change(full=True)
        self._holds += 1
        self._sync()
        try:
            self._verify_probe()
            self._probe_index = 0
            yield
        finally:
            self._probe_index, self._plan = None, None
            self._holds -= 1
            self._sync()

    def note_step(self, step: int, epoch: Optional[int], window: int) -> None:
        """After each training step: the training cache's window ends at each new ``epoch`` the
        loop passes (inputs repeat once per epoch), else every ``window`` steps."""
        if self._cache is None or not self._updated:
            return
        if epoch is not None:
            if self._epoch is not None and epoch != self._epoch:
                self._end_window(f"epoch ({self._epoch})")
            self._epoch = epoch
        elif step % window == 0:
            self._end_window(f"window of {window} steps")

    def _end_window(self, name: str) -> None:
        """A window that served too little turns the cache off (:meth:`KeptRows.end_window`);
        the prefix's weights are compared bit for bit with those at its check."""
        assert self._cache is not None
        if self._cache.off is not None:
            return
        why = self._cache.end_window(name)
        if why is not None:
            self._off(self._cache, why)
        else:
            self._seen_change(full=True)

    def close(self) -> None:
        """Restore the frozen modules' forwards and free the kept rows; :meth:`stats` stays
        what it was at closing (idempotent; :meth:`update` starts again)."""
        if self._closed is None:
            self._closed = self.stats()
        self._holds = 0
        self._uninstall()
        for rows in self._sources():
            rows.levels = []
        self._frozen, self._order, self._position, self._plan = {}, [], {}, None

    def update(self, frozen: Dict[str, nn.Module], example: Any) -> None:
        """Serve the frozen modules ``frozen`` (outermost only) after a freeze; ``example`` is a
        few probe inputs on the model's device (a tensor, or :class:`~svcca_torch.recorder.Inputs`),
        for the structural check (:meth:`_check`), which turns every source off when it fails."""
        self._closed, self._example, self._updated = None, example, True
        if not frozen or all(s.off is not None for s in self._sources()):
            return
        self._seen_change(full=True)  # changed since the last forward: the old rows are stale
        self._checks[0] += 1
        why, between = self._check(frozen, example)
        self._events.append(("check", why if why is not None else f"passed: boundary {self._order[-1]!r}"))
        if why is not None:
            self._checks[1] += 1
            for rows in self._sources():
                self._off(rows, why)
            return
        self._watched = {**frozen, **between}  # what the prefix's output depends on
        for rows in self._sources():
            if rows.levels and not rows.levels[-1].modules:
                rows.levels[-1].modules = [m for module in self._watched.values() for m in module.modules()]
        self._watch = StateWatch(self._watched)

    def _seen_change(self, full: bool = False) -> bool:
        """Whether the prefix's state changed since it was watched (``full``: the weights' bits
        too): the training cache turns off, the probe's rows are kept again from the new state."""
        why = self._watch.changed() or (self._watch.content_changed() if full else None) if self._watch else None
        if why is None:
            return False
        self._events.append(("state", why))
        if self._cache is not None:
            self._off(self._cache, f"{why} after the frozen prefix was checked")
        self._probe.drop_rows()
        self._watch = StateWatch(self._watched)
        return True

    # ------------------------------------------------------------------ stubs
    def _sync(self) -> None:
        """Stubs installed while a recording or the check needs them, or the training cache may serve."""
        need = self._holds > 0 or (self._cache is not None and self._cache.off is None)
        if need and self._saved is None and self._order:
            self._saved = {n: self._frozen[n].__dict__.get("forward") for n in self._order}
            for name in self._order:
                self._frozen[name].forward = self._stub(name)  # type: ignore[method-assign]
        elif not need:
            self._uninstall()

    def _uninstall(self) -> None:
        for name, saved in (self._saved or {}).items():
            restore_forward(self._frozen[name], saved)
        self._saved = None

    def _stub(self, name: str) -> Callable[..., Any]:
        assert self._saved is not None
        module = self._frozen[name]
        real = real_forward(module, self._saved[name])

        def forward(*args: Any, **kwargs: Any) -> Any:
            pos = self._position.get(name, -1)
            if pos == 0:
                self._plan = self._forced or self._decide(args, kwargs)
                if self._plan is not None and self._plan.serve < len(self._order) - 1:  # something in the prefix runs
                    x = input_tensor(args, kwargs)
                    self._plan.streams = RandomStreams(x.device if x is not None else None)
            if pos > 0 and self._cache is not None and self._cache.off is None and len(tensors([args, kwargs])) > 1:
                self._off(self._cache, f"{name!r} takes tensors besides the previous frozen module's output (e.g. an "
                                       "attention mask), which the key (the first frozen module's input) does not cover")
            plan = self._plan
            if plan is None or pos != plan.next or (plan.rows_of is not None and plan.rows_of.off is not None):
                self._plan = None
                return real(*args, **kwargs)
            plan.next += 1
            x = input_tensor(args, kwargs)
            if pos < plan.serve:  # zeros shaped like its output (never the input: the next module may work in place)
                assert x is not None
                if name in self._shapes:
                    shape, dtype = self._shapes[name]
                    return torch.zeros((x.shape[0], *shape), dtype=dtype, device=x.device)
                return torch.zeros_like(x)
            if pos == plan.serve:
                assert x is not None and plan.rows is not None
                if pos == len(self._order) - 1:
                    self._plan = None
                return plan.rows.to(x.device)
            out = real(*args, **kwargs)
            if pos == len(self._order) - 1:
                self._plan = None
                drawn = plan.streams.drawn() if plan.streams is not None else None
                if drawn is not None and plan.rows_of is not None:  # skipping the prefix would shift the stream
                    self._off(plan.rows_of, f"the frozen prefix draws random numbers ({drawn}: dropout, stochastic "
                                            "depth, noise), so skipping it would change what the layers above it draw")
                    return out
            if plan.verify is not None and pos == plan.verify.position:
                self._verify(plan, out)
            if plan.keys is not None and plan.rows_of is not None and plan.rows_of.off is None and pos in plan.keys:
                level = next((lv for lv in plan.rows_of.levels if lv.position == pos), None)
                if level is not None:
                    why = plan.rows_of.keep(level, plan.keys[pos], out, plan.training)
                    if why is not None:
                        self._off(plan.rows_of, why)
            return out

        return forward

    def _decide(self, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[_Plan]:
        """The plan of a forward, at the first frozen module: a probe input (inside a recording,
        keyed by its bits and its index, which stands for the probe's other inputs) or a training
        input (keyed by its bits alone: one tensor argument), looked up in its source's rows."""
        probe = self._probe_index is not None
        x = input_tensor(args, kwargs) if probe else (args[0] if len(args) == 1 and not kwargs else None)
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[0] == 0:
            return None
        index = self._probe_index
        if probe:
            self._probe_index = index + x.shape[0]
        rows = self._probe if probe else (None if self._pause else self._cache)
        if rows is None or rows.off is not None or rows.suspended is not None or not rows.levels or x.requires_grad:
            return None
        if not probe and self._seen_change():
            return None
        context = (tuple(x.shape[1:]), x.dtype, str(x.device), forward_context(x.device.type), self.model.training)
        ids: List[Tuple[Any, ...]] = bits_hash(x.detach().reshape(x.shape[0], -1))
        if probe:
            ids = [(*h, ("probe", index + i)) for i, h in enumerate(ids)]
        keys = {lv.position: lv.keys(context, ids) for lv in rows.levels}
        training = not probe and self.model.training
        found = rows.find(keys)
        if self._verifying:
            return _Plan(rows, verify=found[0], rows=found[1]) if found is not None and not found[0].verified else None
        if found is None:
            rows.count(len(ids), False, training)
            return _Plan(rows, training, keys=keys)
        level, kept = found
        above = {p: k for p, k in keys.items() if p > level.position}  # kept at the boundaries above it
        if not level.verified:  # the first forward a level could serve runs for real and is compared
            rows.count(len(ids), False, training)
            return _Plan(rows, training, keys=above, verify=level, rows=kept)
        rows.count(len(ids), True, training)
        return _Plan(rows, training, serve=level.position, rows=kept, keys=above or None)

    def _verify(self, plan: _Plan, out: Any) -> None:
        lv, rows = plan.verify, plan.rows_of
        assert lv is not None and rows is not None and plan.rows is not None
        if isinstance(out, torch.Tensor) and not out.is_nested and same(out.detach().to(plan.rows.device), plan.rows):
            lv.verified = True
        else:
            self._off(rows, f"the output of {lv.boundary!r} differs between two forwards of the same inputs "
                            "(dropout or other randomness in the frozen prefix)")

    def _verify_probe(self) -> None:
        """Before a recording could serve the probe from a level not yet verified: a real
        forward of the check's probe inputs compares its boundary output with the kept rows
        (kept from whole batches of a recording), as a training level's first serve is."""
        if self._example is None or not any(lv.rows and not lv.verified for lv in self._probe.levels):
            return
        example = self._example
        call = example.call if isinstance(example, Inputs) else lambda m: m(example)
        self._probe_index, self._verifying = 0, True
        try:
            with streams_kept():
                _modes_and_hooks_restored(self.model, {}, lambda: call(self.model))
        except Exception as e:  # an optimisation: any failure means running in full
            self._off(self._probe, f"checking it failed ({type(e).__name__}: {e})")
        finally:
            self._probe_index, self._verifying, self._plan = None, False, None

    # ------------------------------------------------------------------ the structural check
    def _check(self, frozen: Dict[str, nn.Module], example: Any) -> Tuple[Optional[str], Dict[str, nn.Module]]:
        """On ``example`` (eval mode, no grad, random streams given back), a traced forward gives
        the frozen modules' call order (serving starts on it), a second with the boundary serving
        its own output checks it. Returns (why the prefix cannot be served or None, the modules
        that run inside it outside the frozen ones). It cannot when a frozen module is not called
        exactly once, when a module that runs inside the prefix, or one around it (its own
        parameters), is trainable, or when any output after the boundary (every module's, the
        model's) differs with the boundary served."""
        inside = lambda n: any(n == f or n.startswith(f + ".") for f in frozen)  # noqa: E731
        modules = dict(self.model.named_modules())
        done: List[str] = []
        kept: Dict[str, Any] = {}
        outs: List[Dict[str, List[Any]]] = [{}, {}]

        def make(name: str, run: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                if run == 0:
                    done.append(name)
                    if name in frozen and isinstance(out, torch.Tensor) and out.ndim and not out.is_nested:
                        self._shapes.setdefault(name, (tuple(out.shape[1:]), out.dtype))
                        kept.setdefault(name, out.detach().clone())
                outs[run].setdefault(name, []).append([t.detach().clone() for t in tensors(out)])
            return hook

        call = example.call if isinstance(example, Inputs) else lambda m: m(example)
        self._holds += 1
        try:
            with self.paused(), streams_kept():  # the stubs of an earlier freeze run for real
                _modes_and_hooks_restored(self.model, {n: make(n, 0) for n in modules}, lambda: call(self.model))
            order = [n for n in done if n in frozen]
            if sorted(order) != sorted(frozen):
                return "a frozen module is not called exactly once per forward", {}
            self._serve(frozen, order)
            boundary = order[-1]
            if boundary not in kept:
                return f"{boundary!r} does not return one tensor", {}
            first, last = done.index(order[0]), done.index(boundary)
            # modules that finish between the first frozen module and the boundary, outside them
            between = [n for n in dict.fromkeys(done[first + 1:last]) if not inside(n)]
            around = [n for n in modules if (n == "" or any(f.startswith(n + ".") for f in frozen)) and not inside(n)]
            trainable = [n for n in between if any(p.requires_grad for p in modules[n].parameters())]
            trainable += [n or "the model" for n in around
                          if any(p.requires_grad for p in modules[n].parameters(recurse=False))]
            if trainable:
                return f"{trainable[0]!r} runs inside or around the frozen prefix and is not frozen", {}
            after = [n for n in outs[0] if not inside(n) and n not in between]
            self._forced = _Plan(None, serve=len(order) - 1, rows=kept[boundary])
            try:
                with streams_kept():
                    _modes_and_hooks_restored(self.model, {n: make(n, 1) for n in after}, lambda: call(self.model))
            finally:
                self._forced = None
        except Exception as e:  # an optimisation: any failure means running in full
            return f"checking it failed ({type(e).__name__}: {e})", {}
        finally:
            self._holds -= 1
            self._sync()
        if not all(len(outs[1].get(n, [])) == len(outs[0][n]) and all(
                len(a) == len(b) and all(same(s, f) for s, f in zip(b, a)) for a, b in zip(outs[0][n], outs[1][n]))
                for n in after):
            return (f"the model's output depends on the frozen prefix other than through {boundary!r}'s "
                    "output (e.g. a skip connection past it)"), {}
        return None, {n: modules[n] for n in between}

    def _serve(self, frozen: Dict[str, nn.Module], order: List[str]) -> None:
        """Serve the prefix ``order`` (call order): every source follows it, the stubs are reinstalled."""
        self._uninstall()
        self._frozen, self._order = dict(frozen), list(order)
        self._position = {n: i for i, n in enumerate(order)}
        for rows in self._sources():
            if rows.off is None:
                rows.follow(order)
        self._sync()
