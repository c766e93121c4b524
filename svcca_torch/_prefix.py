"""Reusing the frozen prefix's output on the probe in freeze-signal recordings.

Once the lowest layer groups are frozen (``requires_grad=False``, normalisation in eval
mode), their output on the fixed probe no longer changes, so a freeze-signal recording of
the groups above them need not run them again. :class:`PrefixReuse` keeps the output of the
frozen prefix's last module to run (the *boundary*) for the probe images of one recording;
later recordings replace the frozen modules' ``forward`` for their duration: the boundary
returns its kept output, the frozen modules before it return zeros of their input's shape
(never the input itself, which may be the caller's probe tensor and could then be changed
in place by the next module).

That is exact when everything after the boundary depends on the frozen modules only through
the boundary's output: a chain, as in ResNets and ``nn.Sequential`` models. It is checked for
each (kept prefix, recorded layers) pair on the first few probe images against a full
recording of them, and any difference or error turns the reuse off for the rest of the run
(recordings then run in full, as before). Activations are ``(datapoints, neurons)`` or ``(N, C, H, W)``; the kept
output is whatever tensor the boundary module returns, kept in host memory (a GPU's memory is
not held between recordings) and copied to the model's device batch by batch.
"""
from __future__ import annotations

import contextlib
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
        if kept is not None and not (kept.device == str(device) and set(kept.frozen) <= set(names)):
            kept = self.kept = None
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
            if isinstance(out, torch.Tensor) and size[0] + out.numel() * out.element_size() <= self.max_bytes:
                size[0] += out.numel() * out.element_size()
                outputs.append(out.detach().to("cpu", copy=True))  # host memory: a GPU's is not held
            else:
                size[0] = self.max_bytes + 1  # not a tensor, or too large: keep nothing

        handle = frozen[new].register_forward_hook(keep)
        try:
            if kept is not None:
                self.hits += 1
                with self._stubbed(kept, frozen):
                    result = record(n_images)
            else:
                result = record(n_images)
        finally:
            handle.remove()
        if size[0] <= self.max_bytes and sum(int(t.shape[0]) for t in outputs) == n_images:
            self.kept = _Kept(names, calls[0], new, outputs, n_images, str(device))
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
