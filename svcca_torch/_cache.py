"""Skipping the frozen prefix's forward on training inputs seen before (exact, Egeria-style).

Once the lowest layer groups are frozen (``requires_grad=False``, normalisation in eval
mode), the frozen prefix maps each input to a fixed output. A frozen step still runs that
forward (issue 10: 7 of 10 ResNet-18 groups frozen, backward 0.27x but forward 0.90x), and
without random augmentation every epoch shows the network the same inputs again.
:class:`FrozenOutputCache` keeps, per input, the output of the frozen prefix's last module
to run (the *boundary*) and skips the prefix when a whole batch is kept:

- **Keys.** Each sample of the first frozen module's input gets two 64-bit multilinear hashes
  of its bit pattern (arithmetic mod 2^64, on the input's device), with random weights
  chosen by its shape, dtype and the model's train/eval flag. Two different inputs share a key with
  probability <= 2^-64 (inputs differ in a 32-bit word, so the hash difference is a nonzero
  multiple of at most 2^32 per lane).
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
  rows (dropout or other randomness in the prefix breaks this); before each forward, the
  frozen parameters must still be frozen and unchanged (their in-place version counters).
- **Turning off.** More than ``max_bytes`` kept (host memory): off until the next freeze; a
  whole epoch in which no input was seen before (random augmentation): off for the run.

Activations are ``(datapoints, neurons)`` or ``(N, C, H, W)``; the kept rows are whatever
tensor the boundary returns, one row per sample, in host memory (a GPU's memory is not held).
The cache never serves a forward whose input requires grad, and it is paused while the
tracker records the probe (:meth:`FrozenOutputCache.paused`). Forward hooks on the modules
inside the frozen ones do not run for a served batch (those on the frozen modules do).
"""
from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._prefix import _same, input_tensor, real_forward, restore_forward
from .recorder import _modes_and_hooks_restored

#: Most bytes of kept boundary outputs (host memory) by default.
CACHE_BYTES = 1 << 30

_LANES = 2
_CHUNK = 1 << 22  # elements of int64 scratch per hashing chunk

Key = Tuple[int, int]


@dataclass
class _Level:
    boundary: str  # the module whose output is kept
    position: int  # its place in the call order of the frozen modules
    rows: Dict[Key, torch.Tensor] = field(default_factory=dict)
    nbytes: int = 0
    verified: bool = False


@dataclass
class _Plan:
    """What the frozen modules do in one forward (decided at the first of them)."""

    next: int = 0  # the call-order position expected next
    serve: int = -1  # position that returns ``rows`` (-1: none, everything runs)
    rows: Optional[torch.Tensor] = None
    keys: Optional[List[Key]] = None  # the samples, whose outputs at the boundaries that run are kept
    verify: Optional[_Level] = None  # level whose rows the real output is compared with


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

    Call :meth:`update` after every freeze, :meth:`note_epoch` as epochs pass and
    :meth:`close` at the end of training.

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
        self._params: List[torch.Tensor] = []
        self._versions: List[int] = []
        self._weights: Dict[Tuple[Any, ...], torch.Tensor] = {}
        self._plan: Optional[_Plan] = None
        self._forced: Optional[_Plan] = None
        self._between: List[nn.Module] = []  # modules that run inside the prefix, outside the frozen ones
        self._shapes: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}  # frozen module -> output (shape[1:], dtype)
        self._pause = 0
        # the augmentation rule: training samples looked up / found this epoch, kept before it
        self._epoch: Optional[int] = None
        self._epoch_seen = [0, 0]
        self._kept_train = 0
        self._kept_before = 0

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

    def note_epoch(self, epoch: int) -> None:
        """Tell the cache the training epoch (turns it off after a whole epoch in which no
        input had been seen before: random augmentation, nothing to serve)."""
        if epoch == self._epoch:
            return
        looked, found = self._epoch_seen
        if self._epoch is not None and looked and not found and self._kept_before and self.off is None:
            self.turn_off(f"no training input of epoch {self._epoch} had been seen before (random augmentation?); "
                          "the cache serves inputs that repeat exactly")
        self._epoch, self._epoch_seen, self._kept_before = epoch, [0, 0], self._kept_train

    def update(self, frozen: Dict[str, nn.Module], example: Any) -> None:
        """Start serving the frozen modules ``frozen`` (outermost only) after a freeze;
        ``example`` is a few probe inputs on the model's device, for one traced forward (the
        frozen modules' call order, each called once) and the structural check."""
        if self.off is not None or not frozen or self._changed():  # changed since the last forward: stale
            return
        why = self._check_structure(frozen, example)
        if why is not None:
            self.turn_off(why)
            return
        # what the prefix's output depends on: watched before every forward
        self._params = [t for m in (*frozen.values(), *self._between) for t in (*m.parameters(), *m.buffers())]
        self._versions = [t._version for t in self._params]

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
            plan = self._plan
            if plan is None or pos != plan.next:
                self._plan = None
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
            if plan.verify is not None and pos == plan.verify.position:
                self._verify(plan, out)
            if plan.keys is not None:
                level = next((lv for lv in self.levels if lv.position == pos), None)
                if level is not None:
                    self._keep(level, plan.keys, out)
            if pos == len(self.order) - 1:
                self._plan = None
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
        keys = self._keys(x)
        self.lookups += len(keys)
        if self.model.training:
            self._epoch_seen[0] += len(keys)
            self._epoch_seen[1] += sum(any(k in lv.rows for lv in self.levels) for k in keys)
        current = self.levels[-1]
        for lv in reversed(self.levels):
            if all(k in lv.rows for k in keys):
                store = None if lv is current else keys  # keep them at the boundaries above it
                if not lv.verified:  # the first batch a level could serve runs for real and is compared
                    return _Plan(keys=store, verify=lv, rows=torch.stack([lv.rows[k] for k in keys]))
                self.served += len(keys)
                return _Plan(serve=lv.position, rows=torch.stack([lv.rows[k] for k in keys]), keys=store)
        return _Plan(keys=keys)

    def _changed(self) -> bool:
        """Whether what the kept outputs depend on was unfrozen or changed in place (then off)."""
        if any(t.requires_grad or t._version != v for t, v in zip(self._params, self._versions)):
            self.turn_off("a frozen parameter or buffer was unfrozen or changed")
            return True
        return False

    def _keys(self, x: torch.Tensor) -> List[Key]:
        flat = x.detach().reshape(x.shape[0], -1).contiguous()
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(x.shape[0], -1)
        if flat.dtype == torch.bool:
            flat = flat.view(torch.uint8)
        elif flat.is_floating_point() or flat.element_size() == 8:
            # words of at most 32 bits: two different inputs then differ by a multiple of at most
            # 2^31 in some word, which a random 64-bit weight maps to 0 with probability <= 2^-33
            flat = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int32}[flat.element_size()])
        d = flat.shape[1]
        # the sample's shape, dtype and the train/eval flag choose the weights (a part of the key)
        sig = (tuple(x.shape[1:]), str(x.dtype), self.model.training, str(flat.device))
        if sig not in self._weights:
            g = torch.Generator().manual_seed(zlib.crc32(repr(sig[:3]).encode()))
            self._weights[sig] = torch.randint(-(2 ** 63), 2 ** 63 - 1, (_LANES, d), generator=g,
                                               dtype=torch.int64).to(flat.device)
        w = self._weights[sig]
        rows = max(1, _CHUNK // max(d, 1))
        parts = []
        for chunk in flat.split(rows):
            c = chunk.to(torch.int64)
            parts.append(torch.stack([(c * w[i]).sum(1) for i in range(_LANES)], 1))  # wraps mod 2^64
        return list(map(tuple, torch.cat(parts).tolist()))

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
            self._kept_train = self._kept_before = 0
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
                if name in frozen and isinstance(out, torch.Tensor) and out.ndim:
                    self._shapes.setdefault(name, (tuple(out.shape[1:]), out.dtype))
                    kept.setdefault(name, out.detach().clone())
            return hook

        modules = dict(self.model.named_modules())
        try:
            with self.paused():  # the dispatchers of an earlier freeze run for real
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
            self._between = [modules[n] for n in between]
            self._forced = _Plan(serve=boundary.position, rows=rows)
            try:
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
        _modes_and_hooks_restored(self.model, hooks, lambda: outs.append(self.model(example)))
