"""The frozen prefix's contract: what a served output may depend on, and the pieces that check it.

A served output may depend on the input's bits (:func:`bits_hash`, part of the key), the
forward's context (:func:`forward_context`, part of the key), the prefix's state
(:class:`StateWatch`) and no random numbers (:class:`RandomStreams`: skipping a prefix that
draws any would shift the stream everything after it draws from; :func:`streams_kept` lets a
check's extra forwards draw nothing a plain run would not). Also the helpers every stub
uses: :func:`outermost`, :func:`input_tensor`, :func:`real_forward`, :func:`restore_forward`.
"""
from __future__ import annotations

import contextlib
import random
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..freeze.groups import contains
from ..recorder import first_tensor


def outermost(modules: Dict[str, nn.Module]) -> Dict[str, nn.Module]:
    """The modules not inside another of ``modules`` (names as in ``model.named_modules()``)."""
    return {n: m for n, m in modules.items() if not any(o != n and contains(o, n) for o in modules)}


def input_tensor(args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
    """The first tensor a module was called with (positional, then keyword), else None."""
    return first_tensor((*args, *kwargs.values()))


def tensors(out: Any) -> List[torch.Tensor]:
    """Every tensor in ``out`` (a tensor, or nested lists, tuples and dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in tensors(o)]
    return []


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


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within 1e-4 of the layer's scale: float32 rounding where a kept output was
    computed in another batch (a GPU may pick another algorithm for it) stays far below, a
    prefix that does not determine what follows is far above. Nested tensors are padded."""
    a, b = (t.to_padded_tensor(0.0) if t.is_nested else t for t in (a, b))
    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    a, b = a.double(), b.double()
    return bool((a - b).abs().max() <= 1e-4 * b.abs().max().clamp_min(1e-30))
