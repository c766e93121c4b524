"""Skipping the frozen prefix's forward on training inputs seen before (exact, Egeria-style).

Once the lowest layer groups are frozen (``requires_grad=False``, normalisation in eval
mode), the frozen prefix maps each input to a fixed output. A frozen step still runs that
forward (issue 10: 7 of 10 ResNet-18 groups frozen, backward 0.27x but forward 0.90x), and
without random augmentation every epoch shows the network the same inputs again.
:class:`FrozenOutputCache` keeps, per input, the output of the frozen prefix's last module
to run (the *boundary*) and skips the prefix when a whole batch is kept:

Opt-in (``frozen_cache=True``): exactness needs the prefix's forward to be a function of its
input and its modules' state alone, which the checks below test but cannot prove for any code.

- **Keys.** Each sample of the first frozen module's input gets two 64-bit multilinear hashes
  of its bit pattern (:func:`svcca_torch._prefix.bits_hash`, on the input's device), with
  everything else that decides the prefix's output: the sample's shape, dtype and device, the
  forward's context (:func:`~svcca_torch._prefix.forward_context`: autocast, grad/inference
  mode, TF32 and matmul precision flags) and the train/eval flag of every module up to the
  boundary. Two different inputs share a key with probability <= 2^-66.
- **Serving.** The frozen modules' ``forward`` is replaced (instance attribute, while the cache
  is on) by a dispatcher that decides per forward, at the first frozen module: every sample
  kept at the boundary -> the boundary returns the kept rows and the frozen modules before it
  return zeros shaped like their output (never their input: the next module may work in place);
  every sample kept at an older boundary (more groups froze since) -> serve from there, run
  the newly frozen modules and keep the new boundary's output; otherwise the real forward,
  keeping the boundary's output of the new samples. A kept output stays valid as more groups
  freeze, so no pass after the first over the data runs the whole prefix again.
- **Checks** (a failure turns the cache off for the run; training is then exactly as without
  it): once per frozen prefix, on a few probe images in eval mode, no module that runs inside
  the prefix, or around it with parameters of its own, is trainable, and the model's output
  with the prefix served equals the real one (a skip connection past the prefix breaks this); the first
  batch each kept level could serve runs for real and its boundary output must equal the kept
  rows; every forward in which the prefix runs must draw no random numbers
  (:class:`~svcca_torch._prefix.RandomStreams`: dropout or stochastic depth in the prefix, or a
  module that draws numbers it does not use; skipping it would shift what the layers above
  draw); before each forward, the prefix's state (:class:`~svcca_torch._prefix.StateWatch`:
  every parameter and buffer the same object, storage and version, plain attributes and
  hooks unchanged) and, at each window's end, its weights' bits.
- **Turning off.** More than ``max_bytes`` kept (host memory): off until the next freeze; a
  window (:meth:`FrozenOutputCache.note_window`) that began with rows kept and served less
  than a quarter of its training samples (random augmentation): off for the run, memory freed.
  Every reason to turn off is in :meth:`FrozenOutputCache.stats` (``off``).
- **Not seen.** Random numbers from a private ``torch.Generator``; state the forward reads
  from outside its modules (globals, objects shared by reference and changed in place); a
  frozen weight changed in place through ``.data`` (no version counter counts it) is seen at
  the end of the window, not before.

Activations are ``(datapoints, neurons)`` or ``(N, C, H, W)``; the kept rows are whatever
tensor the boundary returns, one row per sample, in host memory (a GPU's memory is not held).
The cache never serves a forward whose input requires grad, and it is paused while the
tracker records the probe (:meth:`FrozenOutputCache.paused`). Forward hooks on the modules
inside the frozen ones do not run for a served batch (those on the frozen modules do).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._prefix import (RandomStreams, StateWatch, _same, bits_hash, forward_context, input_tensor, real_forward,
                      restore_forward, streams_kept)
from .recorder import Inputs, _modes_and_hooks_restored

from .settings import CACHE_BYTES  # noqa: E402  (most bytes kept by default, declared with the settings)

Key = Tuple[Any, int, int]  # (the forward's context, two 64-bit hashes of the sample's bits)


@dataclass
class _Level:
    boundary: str  # the module whose output is kept
    position: int  # its place in the call order of the frozen modules
    rows: Dict[Key, torch.Tensor] = field(default_factory=dict)
    nbytes: int = 0
    verified: bool = False
    modules: List[nn.Module] = field(default_factory=list)  # what runs up to the boundary (train flags: key)

    def keys(self, context: Tuple[Any, ...], hashes: List[Tuple[int, int]]) -> List[Key]:
        """Its keys of samples with these hashes, under this forward's context."""
        context = (*context, tuple(m.training for m in self.modules))
        return [(context, a, b) for a, b in hashes]


@dataclass
class _Plan:
    """What the frozen modules do in one forward (decided at the first of them)."""

    next: int = 0  # the call-order position expected next
    serve: int = -1  # position that returns ``rows`` (-1: none, everything runs)
    rows: Optional[torch.Tensor] = None
    keys: Optional[Dict[int, List[Key]]] = None  # level position -> the samples' keys there (kept where it runs)
    verify: Optional[_Level] = None  # level whose rows the real output is compared with
    streams: Optional[RandomStreams] = None  # the random streams before a prefix that runs


def _tensors(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


class FrozenOutputCache:
    """Kept outputs of the frozen prefix per training input (see the module docstring).

    Call :meth:`update` after every freeze, :meth:`note_window` at the end of each training
    window and :meth:`close` at the end of training.

    Attributes:
        lookups: samples looked up (forwards the cache could have served).
        served: samples whose prefix forward was skipped (wholly or up to an older boundary).
        off: why the cache is off for the rest of the run (None while it may serve).
        suspended: why it is off until the next freeze (memory), or None.
    """

    #: probe images of the structural check
    CHECK_IMAGES = 8

    def __init__(self, model: nn.Module, max_bytes: int = CACHE_BYTES) -> None:
        self.model = model
        self.max_bytes = int(max_bytes)
        self.order: List[str] = []
        self.levels: List[_Level] = []  # oldest (shallowest) first
        self.lookups = 0
        self.served = 0
        self.off: Optional[str] = None
        self.suspended: Optional[str] = None
        self._modules: Dict[str, nn.Module] = {}
        self._position: Dict[str, int] = {}
        self._saved: Dict[str, Any] = {}
        self._watch: Optional[StateWatch] = None  # the prefix's state, taken at its check
        self._plan: Optional[_Plan] = None
        self._forced: Optional[_Plan] = None
        self._between: Dict[str, nn.Module] = {}  # modules that run inside the prefix, outside the frozen ones
        self._shapes: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}  # frozen module -> output (shape[1:], dtype)
        self._pause = 0
        # the rule for a cache that serves nothing: training samples looked up and served this
        # window, and whether the newest level kept training rows before the window began
        self._window = [0, 0]
        self._kept_train = 0
        self._kept_at_window_start = 0

    # ------------------------------------------------------------------ control
    @property
    def nbytes(self) -> int:
        """Bytes kept, all levels."""
        return sum(lv.nbytes for lv in self.levels)

    def stats(self) -> Dict[str, Any]:
        """Plain-data summary (for logs and ``svcca_summary.json``)."""
        return {"lookups": self.lookups, "served": self.served, "bytes": self.nbytes,
                "boundary": self.levels[-1].boundary if self.levels else None,
                "off": self.off, "suspended": self.suspended}

    #: a window after the newest level began keeping that serves less than this share of its
    #: training lookups turns the cache off (random augmentation: nothing repeats)
    MIN_SERVED = 0.25

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards inside run for real and keep nothing (the tracker's own recordings)."""
        self._pause += 1
        try:
            yield
        finally:
            self._pause -= 1

    def turn_off(self, why: str) -> None:
        """Off for the rest of the run: forwards restored, kept outputs freed."""
        if self.off is None:
            self.off = why
        self.close()

    def close(self) -> None:
        """Restore the frozen modules' forwards and free the kept outputs (idempotent)."""
        for name, module in self._modules.items():
            restore_forward(module, self._saved.get(name))
        self._modules, self._saved, self.levels, self.order, self._position = {}, {}, [], [], {}
        self._plan = None

    def note_window(self, name: str = "training window") -> None:
        """Call at the end of each training window (the tracker's freeze window, or an epoch).
        A window that began with training rows kept at the newest level and served less than
        ``MIN_SERVED`` of its training lookups turns the cache off and frees what it kept:
        nothing repeats (random augmentation), so memory would be spent for nothing. Also
        compares the prefix's weights bit for bit with those at its check."""
        if self.off is not None:
            return
        looked, served = self._window
        if self._kept_at_window_start and looked and served < self.MIN_SERVED * looked:
            self.turn_off(f"it served {served} of the {looked} training samples of a whole {name} "
                          "(random augmentation? the cache serves inputs that repeat exactly)")
            return
        why = self._watch.content_changed() if self._watch is not None else None
        if why is not None:
            self.turn_off(why)
            return
        self._window = [0, 0]
        self._kept_at_window_start = self._kept_train

    def update(self, frozen: Dict[str, nn.Module], example: Any) -> None:
        """Start serving the frozen modules ``frozen`` (outermost only) after a freeze;
        ``example`` is a few probe inputs on the model's device (a tensor, or
        :class:`~svcca_torch.recorder.Inputs` for a model of several), for one traced forward (the
        frozen modules' call order, each called once) and the structural check."""
        if self.off is not None or not frozen or self._changed(full=True):  # changed since the last forward: stale
            return
        why = self._check_structure(frozen, example)
        if why is not None:
            self.turn_off(why)
            return
        # what the prefix's output depends on: watched before every forward
        prefix = {**frozen, **self._between}
        if not self.levels[-1].modules:
            self.levels[-1].modules = [m for module in prefix.values() for m in module.modules()]
        self._watch = StateWatch(prefix)

    def _serve(self, frozen: Dict[str, nn.Module], order: List[str]) -> None:
        """Install the dispatchers for ``order`` and a level at its last module; kept levels whose
        boundary is still a frozen module to run stay valid (frozen modules never change)."""
        self.suspended = None
        self.levels = [lv for lv in self.levels if lv.boundary in order]
        for lv in self.levels:
            lv.position = order.index(lv.boundary)
        self._install(frozen, order)
        if not self.levels or self.levels[-1].boundary != order[-1]:
            self.levels.append(_Level(order[-1], len(order) - 1))
            self._kept_train = self._kept_at_window_start = 0  # a new level is judged from its second window

    def _install(self, frozen: Dict[str, nn.Module], order: List[str]) -> None:
        for name in [n for n in self._modules if n not in frozen]:  # only when a containing module froze
            restore_forward(self._modules.pop(name), self._saved.pop(name))
        self.order = list(order)
        self._position = {n: i for i, n in enumerate(order)}
        for name in order:
            if name not in self._modules:
                module = frozen[name]
                self._modules[name] = module
                self._saved[name] = module.__dict__.get("forward")
                module.forward = self._dispatcher(name, module)  # type: ignore[method-assign]

    # ------------------------------------------------------------------ per forward
    def _dispatcher(self, name: str, module: nn.Module) -> Callable[..., Any]:
        real = real_forward(module, self._saved[name])

        def forward(*args: Any, **kwargs: Any) -> Any:
            pos = self._position.get(name, -1)
            if pos == 0:
                self._plan = self._forced or self._decide(args, kwargs)
                if self._plan is not None and self._plan.serve < len(self.order) - 1:  # something in the prefix runs
                    x = input_tensor(args, kwargs)
                    self._plan.streams = RandomStreams(x.device if x is not None else None)
            plan = self._plan
            if plan is None or pos != plan.next:
                self._plan = None
                return real(*args, **kwargs)
            if pos > 0 and len(_tensors([args, kwargs])) > 1:  # e.g. an attention mask: not in the key
                self._plan = None
                self.turn_off(f"{name!r} takes tensors besides the previous frozen module's output (e.g. an "
                              "attention mask), which the key (the first frozen module's input) does not cover")
                return real(*args, **kwargs)
            plan.next += 1
            if pos <= plan.serve:
                x = input_tensor(args, kwargs)
                assert x is not None and plan.rows is not None
            if pos < plan.serve:  # zeros shaped like its output: whatever runs between frozen modules accepts them
                if name in self._shapes:
                    shape, dtype = self._shapes[name]
                    return torch.zeros((x.shape[0], *shape), dtype=dtype, device=x.device)
                return torch.zeros_like(x)
            if pos == plan.serve:
                if pos == len(self.order) - 1:
                    self._plan = None
                return plan.rows.to(x.device)
            out = real(*args, **kwargs)
            if pos == len(self.order) - 1:
                self._plan = None
                drawn = plan.streams.drawn() if plan.streams is not None else None
                if drawn is not None:  # skipping the prefix would shift the stream everything after it draws from
                    self.turn_off(f"the frozen prefix draws random numbers ({drawn}: dropout, stochastic depth, "
                                  "noise), so skipping it would change what the layers above it draw")
                    return out
            if plan.verify is not None and pos == plan.verify.position:
                self._verify(plan, out)
            if plan.keys is not None and self.off is None:
                level = next((lv for lv in self.levels if lv.position == pos), None)
                if level is not None and pos in plan.keys:
                    self._keep(level, plan.keys[pos], out)
            return out

        return forward

    def _decide(self, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[_Plan]:
        if self._pause or self.off is not None or self.suspended is not None or not self.levels:
            return None
        x = args[0] if len(args) == 1 and not kwargs else None
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[0] == 0 or x.requires_grad:
            return None
        if self._changed():
            return None
        context = (tuple(x.shape[1:]), x.dtype, str(x.device), forward_context(x.device.type), self.model.training)
        hashes = bits_hash(x.detach().reshape(x.shape[0], -1))
        keys = {lv.position: lv.keys(context, hashes) for lv in self.levels}
        self.lookups += len(hashes)
        training = self.model.training
        if training:
            self._window[0] += len(hashes)
        current = self.levels[-1]
        for lv in reversed(self.levels):
            mine = keys[lv.position]
            if all(k in lv.rows for k in mine):
                above = {p: k for p, k in keys.items() if p > lv.position}  # kept at the boundaries above it
                rows = torch.stack([lv.rows[k] for k in mine])
                if not lv.verified:  # the first batch a level could serve runs for real and is compared
                    return _Plan(keys=above, verify=lv, rows=rows)
                self.served += len(hashes)
                if training:
                    self._window[1] += len(hashes)
                return _Plan(serve=lv.position, rows=rows, keys=above if lv is not current else None)
        return _Plan(keys=keys)

    def _changed(self, full: bool = False) -> bool:
        """Whether what the kept outputs depend on changed since the prefix's check (then off);
        ``full`` also compares the weights' bits."""
        if self._watch is None:
            return False
        why = self._watch.changed() or (self._watch.content_changed() if full else None)
        if why is not None:
            self.turn_off(f"{why} after the frozen prefix was checked")
            return True
        return False

    def _verify(self, plan: _Plan, out: Any) -> None:
        lv = plan.verify
        assert lv is not None and plan.rows is not None
        if isinstance(out, torch.Tensor) and _same(out.detach().to(plan.rows.device), plan.rows):
            lv.verified = True
        else:
            self.turn_off(f"the output of {lv.boundary!r} differs between two forwards of the same inputs "
                          "(dropout or other randomness in the frozen prefix)")

    def _keep(self, level: _Level, keys: List[Key], out: Any) -> None:
        """Keep ``out`` (the output of ``level``'s boundary) for the samples it lacks. Every
        level that runs gets them, not only the newest: after a freeze in mid-epoch the older
        levels complete within the epoch and serve the next, while the newest fills."""
        if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.shape[0] != len(keys):
            self.turn_off(f"{level.boundary!r} does not return one tensor with a row per input")
            return
        new = [i for i, k in enumerate(keys) if k not in level.rows]
        if not new or self.suspended is not None:
            return
        size = out[0].numel() * out.element_size() * len(new)
        if level is not self.levels[-1] and self.nbytes + size > self.max_bytes:
            return  # an older level is a convenience: never at the newest's expense
        while self.nbytes + size > self.max_bytes and len(self.levels) > 1:
            self.levels.pop(0)  # the oldest level first
        if self.nbytes + size > self.max_bytes:
            self.levels = [_Level(level.boundary, level.position)]
            self._kept_train = self._kept_at_window_start = 0
            self.suspended = (f"the kept outputs of {level.boundary!r} need more than {self.max_bytes} bytes "
                              "(raise the cache's size)")
            return
        rows = out.detach()[new].to("cpu", copy=True)
        for i, row in zip(new, rows):
            level.rows[keys[i]] = row
        level.nbytes += size
        if self.model.training and level is self.levels[-1]:
            self._kept_train += len(new)
        # an older level all of whose inputs the newest keeps can never serve again
        newest = self.levels[-1]
        self.levels = [lv for lv in self.levels[:-1]
                       if len(lv.rows) > len(newest.rows) or not all(k in newest.rows for k in lv.rows)] + [newest]

    # ------------------------------------------------------------------ structural check
    def _check_structure(self, frozen: Dict[str, nn.Module], example: Any) -> Optional[str]:
        """On ``example`` (eval mode, no grad), one traced forward gives the frozen modules'
        call order (and serving starts on it), a second with the prefix served checks it: why
        the prefix cannot be served, or None. It cannot when a frozen module is not called
        exactly once, when a module that runs inside the prefix, or one around it (its own
        parameters), is trainable, or when the model's output with the boundary serving its own
        output differs from the real output."""
        inside = lambda n: any(n == f or n.startswith(f + ".") for f in frozen)  # noqa: E731
        done: List[str] = []
        kept: Dict[str, Any] = {}
        outs: List[Any] = []

        def make(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                done.append(name)
                if name in frozen and isinstance(out, torch.Tensor) and out.ndim and not out.is_nested:
                    self._shapes.setdefault(name, (tuple(out.shape[1:]), out.dtype))
                    kept.setdefault(name, out.detach().clone())
            return hook

        modules = dict(self.model.named_modules())
        try:
            with self.paused(), streams_kept():  # the dispatchers of an earlier freeze run for real
                self._run_eval(example, {n: make(n) for n in modules}, outs)
            order = [n for n in done if n in frozen]
            if sorted(order) != sorted(frozen):
                return "a frozen module is not called exactly once per forward"
            self._serve(frozen, order)
            boundary = self.levels[-1]
            rows = kept.get(boundary.boundary)
            if rows is None:
                return f"{boundary.boundary!r} does not return one tensor"
            first, last = done.index(order[0]), done.index(boundary.boundary)
            # modules that finish between the first frozen module and the boundary, outside them
            between = [n for n in dict.fromkeys(done[first + 1:last]) if not inside(n)]
            around = [n for n in modules if (n == "" or any(f.startswith(n + ".") for f in frozen)) and not inside(n)]
            trainable = [n for n in between if any(p.requires_grad for p in modules[n].parameters())]
            trainable += [n or "the model" for n in around
                          if any(p.requires_grad for p in modules[n].parameters(recurse=False))]
            if trainable:
                return f"{trainable[0]!r} runs inside or around the frozen prefix and is not frozen"
            self._between = {n: modules[n] for n in between}
            self._forced = _Plan(serve=boundary.position, rows=rows)
            try:
                with streams_kept():
                    self._run_eval(example, {}, outs)
            finally:
                self._forced = None
        except Exception as e:  # the cache is an optimisation: any failure means running in full
            return f"checking it failed ({type(e).__name__}: {e})"
        full, short = _tensors(outs[0]), _tensors(outs[1])
        if not (full and len(full) == len(short) and all(_same(s, f) for s, f in zip(short, full))):
            return (f"the model's output depends on the frozen prefix other than through {boundary.boundary!r}'s "
                    "output (e.g. a skip connection past it)")
        return None

    def _run_eval(self, example: Any, hooks: Dict[str, Callable], outs: List[Any]) -> None:
        # ``example``: a tensor, or :class:`~svcca_torch.recorder.Inputs` for a model of several inputs
        call = example.call if isinstance(example, Inputs) else lambda m: m(example)
        _modes_and_hooks_restored(self.model, hooks, lambda: outs.append(call(self.model)))
