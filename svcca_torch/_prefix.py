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
each (prefix, recorded layers) pair on the first probe batch against the normal recording,
and any difference or error turns the reuse off for the rest of the run (recordings then run
in full, as before). Activations are ``(datapoints, neurons)`` or ``(N, C, H, W)``; the kept
output is whatever tensor the boundary module returns, kept in host memory (a GPU's memory is
not held between recordings) and copied to the model's device batch by batch.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

#: Most bytes of kept boundary output (in host memory); a larger prefix output is not kept.
PREFIX_BYTES = 256 << 20

Recording = Tuple[Optional[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]  # (rows per layer, row -> image)


def outermost(modules: Dict[str, nn.Module]) -> Dict[str, nn.Module]:
    """The modules not inside another of ``modules`` (names as in ``model.named_modules()``)."""
    return {n: m for n, m in modules.items()
            if not any(o != n and (o == "" or n.startswith(o + ".")) for o in modules)}


def call_order(model: nn.Module, modules: Dict[str, nn.Module], example: Any) -> Optional[List[str]]:
    """Names of ``modules`` in the order a forward of ``example`` (eval mode, no grad) calls
    them; None when the forward fails or one of them is not called exactly once."""
    calls: List[str] = []
    handles = [m.register_forward_hook(lambda mod, args, out, name=n: calls.append(name)) for n, m in modules.items()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    except Exception:  # the reuse is an optimisation: any failure means recording in full
        return None
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return calls if sorted(calls) == sorted(modules) else None


class PrefixReuse:
    """The kept boundary output and the checks that allow reusing it (see the module docstring).

    Attributes:
        hits: recordings that reused the kept output.
        disabled: True once a check failed; every later recording runs in full.
    """

    def __init__(self, max_bytes: Optional[int] = None) -> None:
        self.max_bytes = PREFIX_BYTES if max_bytes is None else max_bytes
        self.key: Optional[Tuple[Any, ...]] = None
        self.boundary: Optional[str] = None
        self.outputs: List[torch.Tensor] = []
        self.n_images = 0
        self.checked: set = set()
        self.hits = 0
        self.disabled = False

    def clear(self) -> None:
        self.key, self.boundary, self.outputs, self.n_images = None, None, [], 0

    @contextlib.contextmanager
    def _stubbed(self, frozen: Dict[str, nn.Module]) -> Iterator[None]:
        calls = [0]
        outputs, boundary = self.outputs, self.boundary

        def kept(*args: Any, **kwargs: Any) -> torch.Tensor:
            i = calls[0]
            calls[0] += 1
            x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            out = outputs[i].to(x.device if x is not None else outputs[i].device)
            return out.clone() if out is outputs[i] else out  # the next module may work in place

        def skipped(*args: Any, **kwargs: Any) -> torch.Tensor:
            x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if x is None:
                raise RuntimeError("a frozen module was called without a tensor input")
            return torch.zeros_like(x)

        saved = {n: m.__dict__.get("forward") for n, m in frozen.items()}
        for n, m in frozen.items():
            m.forward = kept if n == boundary else skipped  # type: ignore[method-assign]
        try:
            yield
        finally:
            for n, m in frozen.items():
                if saved[n] is None:
                    del m.forward
                else:
                    m.forward = saved[n]  # type: ignore[method-assign]

    def run(self, frozen: Dict[str, nn.Module], layers: Sequence[str], n_images: int,
            record: Callable[[int], Recording], order: Callable[[Dict[str, nn.Module]], Optional[List[str]]],
            device: Any = None) -> Recording:
        """``record(n_images)``, reusing the frozen prefix's kept output when it may.

        Args:
            frozen: the frozen modules, outermost only (:func:`outermost`); ``{}`` for none.
            layers: the layers the recording keeps (all above the frozen prefix).
            n_images: probe images to record.
            record: runs a recording of the first ``n`` probe images: ``(rows per layer,
                row -> probe image per layer)``.
            order: :func:`call_order` of the frozen modules on a probe example.
            device: the model's device (part of the key: a model moved elsewhere keeps its output again).
        """
        if not frozen or self.disabled:
            return record(n_images)
        key = (tuple(frozen), str(device))
        if self.key == key and self.n_images >= n_images and (key, tuple(layers)) in self.checked:
            self.hits += 1
            with self._stubbed(frozen):
                return record(n_images)
        if self.key != key:
            self.clear()
            names = order(frozen)
            if names is None:
                return record(n_images)
            self.key, self.boundary = key, names[-1]
        kept: List[torch.Tensor] = []
        size = [0]

        def keep(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and size[0] + out.numel() * out.element_size() <= self.max_bytes:
                size[0] += out.numel() * out.element_size()
                kept.append(out.detach().to("cpu", copy=True))  # host memory: a GPU's is not held between recordings
            else:
                size[0] = self.max_bytes + 1  # not a tensor, or too large: keep nothing

        assert self.boundary is not None
        handle = frozen[self.boundary].register_forward_hook(keep)
        try:
            result = record(n_images)
        finally:
            handle.remove()
        if size[0] > self.max_bytes or sum(int(t.shape[0]) for t in kept) != n_images:
            self.clear()  # too large, or the boundary ran other than once per batch
            return result
        self.outputs, self.n_images = kept, n_images
        if (key, tuple(layers)) not in self.checked:
            self._check(frozen, layers, result, record, key)
        return result

    def _check(self, frozen: Dict[str, nn.Module], layers: Sequence[str], full: Recording,
               record: Callable[[int], Recording], key: Tuple[Any, ...]) -> None:
        """The first batch recorded with the reuse must match the full recording."""
        acts, index = full
        m = int(self.outputs[0].shape[0])
        try:
            with self._stubbed(frozen):
                short, _ = record(m)
        except Exception:
            short = None
        ok = acts is not None and short is not None and all(
            n in short and n in acts and _same(short[n], acts[n][(index[n] < m).to(acts[n].device)]) for n in layers)
        if ok:
            self.checked.add((key, tuple(layers)))
        else:
            self.disabled = True
            self.clear()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to rounding (the same kernels on the same inputs give equal results; a GPU's
    algorithm choice may differ in the last bits)."""
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max().clamp_min(1e-30))))
