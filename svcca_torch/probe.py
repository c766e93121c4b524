"""The fixed probe of a tracked run: its inputs as model-ready batches, hashed as they are read.

The probe is a tensor ``(N, ...)``, one set of several model inputs (a tuple or dict of
tensors with the same first dimension, for ``forward(ids, mask)``), or a re-iterable of
batches of either (a DataLoader with ``shuffle=False``). Every capture runs it again, so it
must give the same inputs in the same order: :class:`Probe` checks each batch's cumulative
digest against the first pass and raises when the probe changed.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .recorder import Inputs
from .recorder.inputs import _input_set, _iter_probe
from .utils.validation import check_probe

__all__ = ["Probe", "probe_size", "check_probe"]


def probe_size(probe: Any, model: Optional[nn.Module] = None) -> int:
    """Number of inputs in ``probe``: a tensor, one set of several model inputs (a tuple or
    dict of tensors, see :func:`svcca_torch.recorder.model_inputs`; ``model`` tells how its
    forward takes them) or a re-iterable of batches (iterated once when its size is not
    known otherwise)."""
    if isinstance(probe, torch.Tensor):
        return int(probe.shape[0])
    whole = _input_set(probe, model)
    if whole is not None:
        return whole.rows
    dataset = getattr(probe, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    return sum(b.rows for b in _iter_probe(probe, 1 << 62, model))


def _plain(x: Inputs) -> Union[torch.Tensor, Inputs]:
    """A batch of one positional input as that tensor (the single-input paths, as before
    several inputs were read), else the :class:`~svcca_torch.recorder.Inputs`."""
    if len(x.args) == 1 and not x.kwargs and isinstance(x.args[0], torch.Tensor):
        return x.args[0]
    return x


def _cat(batches: Sequence[Union[torch.Tensor, Inputs]]) -> Union[torch.Tensor, Inputs]:
    """Probe batches joined into one: tensors concatenated; :class:`Inputs` input by input (each
    per-input tensor concatenated, anything else taken from the first batch)."""
    if all(isinstance(b, torch.Tensor) for b in batches):
        return torch.cat(list(batches))
    parts = [b if isinstance(b, Inputs) else Inputs((b,)) for b in batches]

    def join(values: Sequence[Any]) -> Any:
        if isinstance(values[0], torch.Tensor) and values[0].ndim > 0:
            return torch.cat(list(values))
        return values[0]

    first = parts[0]
    args = [join([p.args[i] for p in parts]) for i in range(len(first.args))]
    return Inputs(args, {k: join([p.kwargs[k] for p in parts]) for k in first.kwargs})


def _hash_batch(h: Any, x: Inputs) -> None:
    """Feed one probe batch to the digest ``h``: every per-input tensor (shape, dtype and
    bits) and the other values passed with it. A batch of one tensor is hashed as it always
    was (its shape and float32 values), so the digests of earlier runs still match on resume."""
    tensors = x.tensors()
    if len(tensors) == 1 and len(x.args) + len(x.kwargs) == 1:
        t = tensors[0].detach().to("cpu", torch.float32).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
        return
    h.update(b"inputs")
    for key, v in x._items():
        h.update(f"|{key}|".encode())
        if isinstance(v, torch.Tensor):
            t = v.detach().to("cpu").contiguous()
            h.update(f"{tuple(t.shape)} {t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif v is None or isinstance(v, (bool, int, float, str)):
            h.update(repr(v).encode())
        else:
            h.update(type(v).__name__.encode())


class Probe:
    """The probe as batches of model inputs, hashed as they are iterated.

    Batches are read as the recorder reads them (:func:`svcca_torch.recorder.model_inputs`:
    a tensor, ``(inputs, targets)``, or several inputs as a tuple or dict for a forward that
    takes them); a batch of one positional input is handled as that tensor, several as an
    :class:`~svcca_torch.recorder.Inputs` (called ``model(*args, **kwargs)``, sliced input
    by input).

    ``digests[i]`` is the SHA-1 of every input up to and including batch ``i`` (cumulative;
    every tensor of a batch of several inputs), so a capture that runs only the first batches
    (a freeze-signal capture) is checked against the same prefix of the first full pass, and
    a full pass checks every batch."""

    def __init__(self, probe: Any, batch_size: int, model: Optional[nn.Module] = None) -> None:
        self.probe = check_probe(probe)
        self.batch_size = batch_size
        self.model = model
        self.digests: List[str] = []

    def _batches(self) -> Iterator[Inputs]:
        yield from _iter_probe(self.probe, self.batch_size, self.model)

    def size(self) -> int:
        return probe_size(self.probe, self.model)

    def inputs(self, n_images: Optional[int] = None) -> Iterator[Union[torch.Tensor, Inputs]]:
        """Yield input batches (the first ``n_images`` inputs, default all; every input of a
        batch of several sliced alike), checking each batch's cumulative digest against the
        first pass."""
        h = hashlib.sha1()
        seen = 0
        for i, x in enumerate(self._batches()):
            _hash_batch(h, x)
            d = h.hexdigest()
            if i < len(self.digests):
                if d != self.digests[i]:
                    raise ValueError(
                        f"`probe` changed between captures (batch {i} differs): SVCCA compares the same "
                        "datapoints in the same order, so use a fixed tensor or a DataLoader with shuffle=False "
                        "and no random augmentation (e.g. svcca_torch.data.probe_set)."
                    )
            else:
                self.digests.append(d)
            rows = x.rows
            if n_images is not None and seen + rows >= n_images:
                yield _plain(x.slice(0, n_images - seen))
                return
            seen += rows
            yield _plain(x)

    def whole(self, n_images: Optional[int] = None) -> Union[torch.Tensor, Inputs]:
        """The first ``n_images`` inputs (default all) as one batch (hashed as :meth:`inputs`)."""
        return _cat(list(self.inputs(n_images)))

    @property
    def checksum(self) -> Optional[str]:
        """Digest of the whole probe (None before the first full pass)."""
        return self.digests[-1] if self.digests else None

    def head(self, k: int) -> Union[torch.Tensor, Inputs]:
        """The first ``k`` inputs of the first batch (copies; every input of a batch of several)."""
        x = next(iter(self._batches()))
        return _plain(x.slice(0, k).map(lambda t: t.clone()))

    def non_finite(self) -> Tuple[int, int]:
        """(probe inputs holding a NaN or Inf in any of their tensors, the first one's index or -1)."""
        bad, first, seen = 0, -1, 0
        for x in self._batches():
            rows = torch.zeros(x.rows, dtype=torch.bool)
            for t in x.tensors():
                if t.is_floating_point() or t.is_complex():
                    rows |= (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).cpu()
            n = int(rows.sum())
            if n and first < 0:
                first = seen + int(rows.nonzero()[0, 0])
            bad += n
            seen += x.rows
        return bad, first
