"""Reusing the frozen prefix's output on the probe in freeze-signal recordings.

Once the lowest layer groups are frozen (``requires_grad=False``, normalisation in eval
mode), their output on the fixed probe no longer changes, so a freeze-signal recording of
the groups above them need not run them again. :class:`PrefixReuse` keeps the output of the
frozen prefix's last module to run (the *boundary*) for the probe images of one recording;
later recordings replace the frozen modules' ``forward`` for their duration: the boundary
returns its kept output, the frozen modules before it return zeros shaped like their output
when it was kept (an embedding's is not its input's; else of their input's shape), never the
input itself, which may be the caller's probe tensor and could then be changed in place by
the next module. A boundary that returns a nested tensor (``nn.TransformerEncoder``'s eval
fast path with a padding mask) is not kept.

That is exact when everything after the boundary depends on the frozen modules only through
the boundary's output: a chain, as in ResNets and ``nn.Sequential`` models. It is checked for
each (kept prefix, recorded layers) pair on the first few probe images against a full
recording of them, and any difference or error turns the reuse off for the rest of the run
(recordings then run in full, as before). A kept output is dropped (and kept again) when the
forward's context (autocast, precision flags) or the frozen modules' state changed since it was
kept (:class:`StateWatch`, weights' bits included), and a recording that draws random numbers
turns the reuse off (skipping the prefix would shift the stream). This module also holds that
contract's pieces, shared with :mod:`svcca_torch._cache`. Activations are ``(datapoints, neurons)`` or ``(N, C, H, W)``; the kept
output is whatever tensor the boundary module returns, kept in host memory (a GPU's memory is
not held between recordings) and copied to the model's device batch by batch.
"""
from __future__ import annotations

import contextlib
import random
import sys
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from .freeze import _contains
from .recorder import _trace, first_tensor

#: Most bytes of kept boundary output (in host memory); a larger prefix output is not kept.
PREFIX_BYTES = 256 << 20

Recording = Tuple[Optional[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]  # (rows per layer, row -> image)


def outermost(modules: Dict[str, nn.Module]) -> Dict[str, nn.Module]:
    """The modules not inside another of ``modules`` (names as in ``model.named_modules()``)."""
    return {n: m for n, m in modules.items() if not any(o != n and _contains(o, n) for o in modules)}


def call_order(model: nn.Module, modules: Dict[str, nn.Module], example: Any) -> Optional[List[str]]:
    """Names of ``modules`` in the order a forward of ``example`` (eval mode, no grad) calls
    them (the recorder's trace); None when the forward fails or one of them is not called
    exactly once."""
    try:
        order, calls, _ = _trace(model, list(modules), example, None, stop_early=False)
    except Exception:  # the reuse is an optimisation: any failure means recording in full
        return None
    return order if all(c == 1 for c in calls.values()) else None


def input_tensor(args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
    """The first tensor a module was called with (positional, then keyword), else None."""
    return first_tensor((*args, *kwargs.values()))


def real_forward(module: nn.Module, saved: Optional[Callable[..., Any]]) -> Callable[..., Any]:
    """What ``module.forward`` did before it was replaced: ``saved`` (an instance attribute
    it had), else its class's."""
    return saved or type(module).forward.__get__(module, type(module))


def restore_forward(module: nn.Module, saved: Optional[Callable[..., Any]]) -> None:
    """Undo a replaced ``forward``: back to ``saved`` (an instance attribute it had) or the class's."""
    if saved is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = saved  # type: ignore[method-assign]


class _Kept(NamedTuple):
    frozen: Tuple[str, ...]  # the frozen modules (outermost) whose boundary output this is
    first: str  # the first of them to run
    boundary: str  # the last
    outputs: List[torch.Tensor]  # one per probe batch, in host memory
    n_images: int
    device: str
    context: Tuple[Any, ...]  # forward_context when it was kept
    watch: "StateWatch"  # the frozen modules' state when it was kept
    # frozen module -> its output's (shape after the batch dimension, dtype): what its stub returns zeros of
    shapes: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}


class PrefixReuse:
    """The kept boundary output and the checks that allow reusing it (see the module docstring).

    The output kept for a frozen prefix stays valid as more groups freeze above it (frozen
    modules never change), so the first recording after a freeze starts from it and keeps
    the new boundary's output on the way: no recording after the first freeze runs the
    whole prefix again. Before a kept output serves a set of recorded layers, a recording
    of the first few probe images with it is compared with one without it.

    Attributes:
        hits: recordings that started from a kept output.
        disabled: True once a check failed; every later recording runs in full.
    """

    #: probe images of a check (from the first batch)
    CHECK_IMAGES = 8

    def __init__(self, max_bytes: Optional[int] = None) -> None:
        self.max_bytes = PREFIX_BYTES if max_bytes is None else max_bytes
        self.kept: Optional[_Kept] = None
        self.checked: set = set()
        self.orders: Dict[Tuple[str, ...], Optional[List[str]]] = {}
        self.hits = 0
        self.disabled = False

    @contextlib.contextmanager
    def _stubbed(self, kept: _Kept, modules: Dict[str, nn.Module]) -> Iterator[None]:
        """Replace the kept prefix's forwards: per batch, decided at its first module, either
        from the kept output (a batch it covers) or the real computation (a later batch)."""
        state = {"batch": -1, "real": False}
        frozen = {n: modules[n] for n in kept.frozen}
        saved = {n: m.__dict__.get("forward") for n, m in frozen.items()}

        def stub(name: str, module: nn.Module) -> Callable[..., Any]:
            real = real_forward(module, saved[name])

            def forward(*args: Any, **kwargs: Any) -> Any:
                x = input_tensor(args, kwargs)
                if name == kept.first:
                    state["batch"] += 1
                    b = state["batch"]
                    state["real"] = not (x is not None and x.ndim and b < len(kept.outputs)
                                         and kept.outputs[b].shape[0] >= x.shape[0])
                if state["real"]:
                    return real(*args, **kwargs)
                if x is None:
                    raise RuntimeError("a frozen module was called without a tensor input")
                if name == kept.boundary:  # a check runs the first images only: slice
                    return kept.outputs[state["batch"]][: x.shape[0]].to(x.device, copy=True)
                if name in kept.shapes:  # zeros shaped like its output (an embedding's is not its input's)
                    shape, dtype = kept.shapes[name]
                    return torch.zeros((x.shape[0], *shape), dtype=dtype, device=x.device)
                return torch.zeros_like(x)  # never the input: the next module may work in place

            return forward

        for n, m in frozen.items():
            m.forward = stub(n, m)  # type: ignore[method-assign]
        try:
            yield
        finally:
            for n, m in frozen.items():
                restore_forward(m, saved[n])

    def run(self, frozen: Dict[str, nn.Module], layers: Sequence[str], n_images: int,
            record: Callable[[int], Recording], order: Callable[[Dict[str, nn.Module]], Optional[List[str]]],
            device: Any = None) -> Recording:
        """``record(n_images)``, starting from the frozen prefix's kept output when it may.

        Args:
            frozen: the frozen modules, outermost only (:func:`outermost`); ``{}`` for none.
            layers: the layers the recording keeps (all above the frozen prefix).
            n_images: probe images to record.
            record: runs a recording of the first ``n`` probe images: ``(rows per layer,
                row -> probe image per layer)``.
            order: :func:`call_order` of the frozen modules on a probe example.
            device: the model's device (a model moved elsewhere keeps its output again).
        """
        if not frozen or self.disabled:
            return record(n_images)
        names = tuple(frozen)
        if names not in self.orders:
            self.orders[names] = order(frozen)
        calls = self.orders[names]
        if calls is None:  # a frozen module not called exactly once: record in full
            return record(n_images)
        kept = self.kept
        context = forward_context(torch.device(device).type if device is not None else "cpu")
        if kept is not None and not (kept.device == str(device) and set(kept.frozen) <= set(names)
                                     and kept.context == context and kept.watch.changed() is None
                                     and kept.watch.content_changed() is None):
            kept = self.kept = None  # another device, context or prefix state: keep it again
        if kept is not None and not self._check(kept, frozen, layers, record):
            return record(n_images)
        if kept is not None and kept.frozen == names and kept.n_images >= n_images:
            self.hits += 1
            with self._stubbed(kept, frozen):
                return record(n_images)
        # start from the kept output where there is one (an older prefix, or fewer images: the
        # batches it does not cover run in full), and keep this prefix's boundary output
        new = calls[-1]
        outputs: List[torch.Tensor] = []
        size = [0]

        def keep(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and not out.is_nested \
                    and size[0] + out.numel() * out.element_size() <= self.max_bytes:
                size[0] += out.numel() * out.element_size()
                outputs.append(out.detach().to("cpu", copy=True))  # host memory: a GPU's is not held
            else:
                size[0] = self.max_bytes + 1  # not a tensor (or a nested one: no rows to slice), or too large

        shapes: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}

        def shape_of(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                if isinstance(out, torch.Tensor) and out.ndim and not out.is_nested:
                    shapes.setdefault(name, (tuple(out.shape[1:]), out.dtype))
            return hook

        handles = [frozen[new].register_forward_hook(keep)]
        handles += [m.register_forward_hook(shape_of(n)) for n, m in frozen.items() if n != new]
        streams = RandomStreams()
        try:
            if kept is not None:
                self.hits += 1
                with self._stubbed(kept, frozen):
                    result = record(n_images)
            else:
                result = record(n_images)
        finally:
            for handle in handles:
                handle.remove()
        if streams.drawn() is not None:  # skipping the prefix later would shift the random stream
            self.disabled, self.kept = True, None
        elif size[0] <= self.max_bytes and sum(int(t.shape[0]) for t in outputs) == n_images:
            self.kept = _Kept(names, calls[0], new, outputs, n_images, str(device), context, StateWatch(frozen),
                              {**(kept.shapes if kept is not None else {}), **shapes})
        return result

    def _check(self, kept: _Kept, frozen: Dict[str, nn.Module], layers: Sequence[str],
               record: Callable[[int], Recording]) -> bool:
        """Whether recording ``layers`` from ``kept`` gives what a full recording gives, on
        the first few probe images (once per kept prefix and layer set); a difference turns
        the reuse off for the run."""
        key = (kept.frozen, tuple(layers))
        if key in self.checked:
            return True
        m = min(self.CHECK_IMAGES, int(kept.outputs[0].shape[0]))
        with streams_kept():  # the check's recordings are extra: they draw nothing a plain run would not
            full, _ = record(m)
            try:
                with self._stubbed(kept, frozen):
                    short, _ = record(m)
            except Exception:  # the reuse is an optimisation: any failure means recording in full
                short = None
        ok = full is not None and short is not None and all(
            n in short and n in full and _same(short[n], full[n]) for n in layers)
        if ok:
            self.checked.add(key)
        else:
            self.disabled, self.kept = True, None
        return ok


# ------------------------------------------------------------------------- the contract
# What a served output may depend on, shared by the probe-side reuse and the training cache:
# the input's bits (the cache's key), the forward's context (:func:`forward_context`, part of
# the key), the prefix's state (:class:`StateWatch`: any change turns serving off), and no
# random numbers (:class:`RandomStreams`: a prefix that draws any turns serving off, since
# skipping it would shift the stream that everything after it draws from).


def forward_context(device_type: str) -> Tuple[Any, ...]:
    """What changes a forward's numbers besides its input and weights: autocast (on ``device_type``
    and the CPU), grad and inference mode, and the float32 matmul/convolution precision flags."""
    def autocast(dev: str) -> Tuple[Any, ...]:
        try:
            return (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        except (RuntimeError, TypeError, AttributeError):  # a device type without autocast
            return (dev, False, None)

    return (autocast(device_type), autocast("cpu"), torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32, torch.are_deterministic_algorithms_enabled())


class RandomStreams:
    """The global random streams a module may draw from (torch's CPU generator, the CUDA
    generator of ``device`` (default: the current one), Python's ``random``, NumPy's legacy
    global state), to tell whether a forward drew from any. Private ``torch.Generator``
    objects are not seen."""

    def __init__(self, device: Optional[torch.device] = None) -> None:
        self._cuda = device if device is not None and device.type == "cuda" else "cuda"
        self._state = self._now()

    def _now(self) -> Tuple[Any, ...]:
        cuda = (torch.cuda.get_rng_state(self._cuda) if torch.cuda.is_available() and torch.cuda.is_initialized()
                else None)
        return torch.random.get_rng_state(), cuda, random.getstate(), _numpy_state()

    def drawn(self) -> Optional[str]:
        """Which stream was drawn from since this object was made, or None."""
        now = self._now()
        names = ("torch's CPU generator", "torch's CUDA generator", "Python's random", "NumPy's random")
        for name, a, b in zip(names, self._state, now):
            if isinstance(a, torch.Tensor):
                if not (isinstance(b, torch.Tensor) and torch.equal(a, b)):
                    return name
            elif a is not None and not _equal(a, b):
                return name
        return None


@contextlib.contextmanager
def streams_kept() -> Iterator[None]:
    """Run a block (a check's extra forwards) without moving any global random stream: what it
    draws is given back, so a run with the check draws what a run without it draws."""
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    state, np = random.getstate(), _numpy_state()
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(state)
            if np is not None:
                sys.modules["numpy"].random.set_state(np)


def _numpy_state() -> Optional[Tuple[Any, ...]]:
    np = sys.modules.get("numpy")  # only when the program uses NumPy already
    return np.random.get_state() if np is not None else None


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if type(a).__module__ == "numpy":
        return bool((a == b).all()) if getattr(a, "shape", ()) else bool(a == b)
    return bool(a == b)


_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"forward", "train"}


def _value(v: Any) -> Any:
    """A comparable stand-in for an attribute: plain values by value (floats by their bits),
    anything else by identity (an object mutated in place is not seen)."""
    if isinstance(v, float):
        return ("float", v.hex())
    if v is None or isinstance(v, (bool, int, str, torch.dtype, torch.device)):
        return v
    if isinstance(v, (tuple, list)) and len(v) <= 16:
        return (type(v).__name__, tuple(_value(x) for x in v))
    return (type(v).__name__, id(v))


class StateWatch:
    """Everything the output of a set of modules depends on besides its input, taken when
    made and compared later.

    :meth:`changed` (every forward, cheap): each parameter and buffer of the modules and their
    submodules is the same tensor object, with the same storage, shape, dtype, device,
    ``requires_grad`` and in-place version counter; the modules' plain attributes have the same
    values (other objects: the same objects); the same hooks are registered.
    :meth:`content_changed` (less often: it reads every weight): the tensors' bits, which also
    sees in-place writes through ``.data`` (autograd's version counter does not count those).
    """

    def __init__(self, modules: Dict[str, nn.Module]) -> None:
        self._subs = [(f"{name}.{sub}" if sub else name, m) for name, module in modules.items()
                      for sub, m in module.named_modules()]
        self._fast = self._now()
        self._hashes = self._content()

    def _now(self) -> List[Tuple[str, Any]]:
        out: List[Tuple[str, Any]] = []
        for name, m in self._subs:
            for kind, table in (("parameter", m._parameters), ("buffer", m._buffers)):
                for k, t in table.items():
                    out.append((f"{kind} {name}.{k}", None if t is None else (
                        id(t), t.data_ptr(), tuple(t.shape), t.dtype, str(t.device), t.requires_grad, t._version)))
            attrs = tuple(sorted((k, _value(v)) for k, v in m.__dict__.items()
                                 if k not in _MODULE_INTERNALS and not k.startswith("_svcca")))
            out.append((f"attributes of {name!r}", attrs))
            hooks = tuple(tuple(getattr(m, h)) for h in ("_forward_pre_hooks", "_forward_hooks"))
            out.append((f"hooks of {name!r}", hooks))
        return out

    def _tensors(self) -> List[torch.Tensor]:
        return [t for _, m in self._subs for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]

    def _content(self) -> List[Tuple[int, int, int]]:
        return [tensor_hash(t) for t in self._tensors()]

    def changed(self) -> Optional[str]:
        """What changed since this watch was made (cheap checks), or None."""
        now = self._now()
        if len(now) != len(self._fast):
            return "a module's parameters or buffers were added or removed"
        for (what, a), (_, b) in zip(self._fast, now):
            if a != b:
                return f"the {what} changed"
        return None

    def content_changed(self) -> Optional[str]:
        """What changed in the weights' bits (reads every weight), or None."""
        if self._content() != self._hashes:
            return "a frozen weight's values changed (e.g. written through `.data`)"
        return None


_WEIGHTS: Dict[Tuple[int, str], torch.Tensor] = {}
_FOLD = 4096  # words per row when a whole tensor is hashed


def _words(flat: torch.Tensor) -> torch.Tensor:
    """``flat``'s bit pattern as integer words of at most 32 bits (same leading dims)."""
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(*flat.shape[:-1], -1)
    flat = flat.contiguous()
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    if flat.is_floating_point() or flat.element_size() == 8:
        return flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int32}[flat.element_size()])
    return flat


def bits_hash(flat: torch.Tensor) -> List[Tuple[int, int]]:
    """Two 64-bit multilinear hashes of each row's bit pattern (``flat``: ``(rows, d)``), mod
    2^64 on its device, with random weights fixed per ``d``. Words are at most 32 bits wide, so
    two rows that differ, differ by a multiple of at most 2^31 in some word, which a random
    64-bit weight maps to 0 with probability <= 2^-33 per hash."""
    words = _words(flat)
    words = words.reshape(words.shape[0], -1)
    d = words.shape[1]
    key = (d, str(words.device))
    if key not in _WEIGHTS:
        g = torch.Generator().manual_seed(d)
        _WEIGHTS[key] = torch.randint(-(2 ** 63), 2 ** 63 - 1, (_LANES, d), generator=g,
                                      dtype=torch.int64).to(words.device)
    w = _WEIGHTS[key]
    rows = max(1, _CHUNK // max(d, 1))
    parts = [torch.stack([(c.to(torch.int64) * w[i]).sum(1) for i in range(_LANES)], 1)  # wraps mod 2^64
             for c in words.split(rows)]
    return list(map(tuple, torch.cat(parts).tolist())) if parts else []


def tensor_hash(t: torch.Tensor) -> Tuple[int, int, int]:
    """:func:`bits_hash` of a whole tensor of any size: rows of ``_FOLD`` words hashed, then
    their hashes (as 32-bit words) hashed again, so weights stay small."""
    words = _words(t.detach().reshape(1, -1)).reshape(-1)
    pad = (-words.numel()) % _FOLD
    if pad or not words.numel():
        words = torch.cat([words, words.new_zeros(pad or _FOLD)])
    rows = torch.tensor(bits_hash(words.reshape(-1, _FOLD)), dtype=torch.int64)
    return (*bits_hash(rows.reshape(1, -1).view(torch.int32))[0], t.numel())


_LANES = 2
_CHUNK = 1 << 22  # elements of int64 scratch per hashing chunk


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within 1e-4 of the layer's scale: float32 rounding where the kept output was
    computed in a larger batch than the check's (a GPU may pick another algorithm for it)
    stays far below, a prefix that does not determine what follows is far above."""
    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    a, b = a.double(), b.double()
    return bool((a - b).abs().max() <= 1e-4 * b.abs().max().clamp_min(1e-30))
