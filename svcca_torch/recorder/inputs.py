"""Model inputs: how a probe (and each of its batches) is passed to the model.

A probe is a tensor ``(N, ...)``; or one set of several inputs, a tuple of tensors (called
``model(*inputs)``) or a dict of tensors (``model(**inputs)``), all with the same first
dimension ``N`` and sliced alike into batches; or a DataLoader/iterable of batches, each read
by :func:`model_inputs`. A batch that does not fit the forward's parameters is an error
naming them.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence


def first_tensor(output: Any) -> Optional[torch.Tensor]:
    """The first tensor in a module output (tensor, tuple/list, dict, nested), else None.
    A ``PackedSequence`` gives its padded data (batch first), so an ``nn.LSTM`` fed one gives
    its output sequence."""
    if isinstance(output, PackedSequence):
        return pad_packed_sequence(output, batch_first=True)[0]
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            t = first_tensor(item)
            if t is not None:
                return t
    if isinstance(output, dict):
        for item in output.values():
            t = first_tensor(item)
            if t is not None:
                return t
    return None


#: Dict keys taken as the model input of a dict batch, in this order of preference.
INPUT_KEYS: Tuple[str, ...] = ("x", "input", "inputs", "image", "images", "img", "pixel_values", "input_ids", "data")

#: Names of forward parameters taken as a padding mask ``(N, L)`` of the probe's sequences
#: (see :class:`ActivationRecorder`'s ``padding_mask``).
MASK_NAMES: Tuple[str, ...] = ("attention_mask", "padding_mask", "key_padding_mask", "src_key_padding_mask", "mask")


class Inputs:
    """One batch of model inputs, called as ``model(*args, **kwargs)``.

    Tensors with at least one dimension (in ``args`` and ``kwargs``) are the per-input
    values and share their first dimension (:attr:`rows`); anything else is passed as it is
    to every batch. :func:`model_inputs` builds one from a probe batch."""

    __slots__ = ("args", "kwargs")

    def __init__(self, args: Sequence[Any] = (), kwargs: Optional[Mapping[str, Any]] = None) -> None:
        self.args: Tuple[Any, ...] = tuple(args)
        self.kwargs: Dict[str, Any] = dict(kwargs or {})

    def _items(self) -> List[Tuple[str, Any]]:
        return [(f"input {i}", a) for i, a in enumerate(self.args)] + [(repr(k), v) for k, v in self.kwargs.items()]

    def tensors(self) -> List[torch.Tensor]:
        """The per-input tensors (at least one dimension), positional first."""
        return [v for _, v in self._items() if isinstance(v, torch.Tensor) and v.ndim > 0]

    @property
    def rows(self) -> int:
        """How many inputs the batch holds (the tensors' common first dimension)."""
        items = [(k, v) for k, v in self._items() if isinstance(v, torch.Tensor) and v.ndim > 0]
        if not items:
            raise ValueError(f"`probe` batch {self.describe()} holds no tensor with a batch dimension.")
        sizes = {int(v.shape[0]) for _, v in items}
        if len(sizes) > 1:
            raise ValueError(
                f"`probe`: the model inputs of one batch must share their first dimension (one row per probe input); "
                f"got {self.describe()}."
            )
        return sizes.pop()

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Inputs":
        """``fn`` applied to every per-input tensor."""
        def f(v: Any) -> Any:
            return fn(v) if isinstance(v, torch.Tensor) and v.ndim > 0 else v
        return Inputs([f(a) for a in self.args], {k: f(v) for k, v in self.kwargs.items()})

    def slice(self, start: int, stop: Optional[int] = None) -> "Inputs":
        """Inputs ``start:stop`` of the batch."""
        return self.map(lambda t: t[start:stop])

    def call(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)

    def first(self) -> Optional[torch.Tensor]:
        return first_tensor([*self.args, *self.kwargs.values()])

    def describe(self) -> str:
        def one(v: Any) -> str:
            if isinstance(v, torch.Tensor):
                return f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
            return type(v).__name__
        return "(" + ", ".join(f"{k}: {one(v)}" for k, v in self._items()) + ")"

    def __repr__(self) -> str:
        return f"Inputs{self.describe()}"


def _forward_signature(model: Optional[nn.Module]) -> Optional[inspect.Signature]:
    """The signature of ``model.forward`` (through wrappers whose forward is ``(*args,
    **kwargs)``: ``.module`` of DDP, ``._orig_mod`` of ``torch.compile``), else None."""
    seen = 0
    while model is not None and seen < 4:
        try:
            sig = inspect.signature(model.forward)
        except (TypeError, ValueError):
            return None
        kinds = {p.kind for p in sig.parameters.values()}
        if kinds and kinds <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
            inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
            if isinstance(inner, nn.Module):
                model, seen = inner, seen + 1
                continue
            return None
        return sig
    return None


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _positional_counts(sig: Optional[inspect.Signature]) -> Tuple[int, float]:
    """(required positional parameters, most positional arguments) of a forward."""
    if sig is None:
        return 1, float("inf")
    params = list(sig.parameters.values())
    required = sum(1 for p in params if p.kind in _POSITIONAL and p.default is inspect.Parameter.empty)
    most = float("inf") if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params) else \
        sum(1 for p in params if p.kind in _POSITIONAL)
    return required, most


def _dict_kwargs(batch: Mapping[str, Any], sig: Optional[inspect.Signature]) -> Optional[Dict[str, Any]]:
    """The entries of a dict batch that name parameters of the forward, when they cover every
    required one (then the forward takes them as keywords), else None."""
    if sig is None:
        return None
    params = [p for p in sig.parameters.values() if p.kind in (*_POSITIONAL, inspect.Parameter.KEYWORD_ONLY)]
    names = {p.name for p in params}
    required = {p.name for p in params if p.default is inspect.Parameter.empty}
    keys = [k for k in batch if k in names]
    if keys and required <= set(keys):
        return {k: batch[k] for k in keys}
    return None


def _same_rows(values: Sequence[Any]) -> bool:
    sizes = {int(v.shape[0]) for v in values if isinstance(v, torch.Tensor) and v.ndim > 0}
    return len(sizes) == 1 and all(isinstance(v, torch.Tensor) and v.ndim > 0 for v in values)


def model_inputs(batch: Any, model: Optional[nn.Module] = None) -> Inputs:
    """How one probe batch is passed to ``model``: :class:`Inputs` ``(args, kwargs)``.

    * a tensor: the one input, ``model(x)``;
    * a dict: its entries that name parameters of ``model.forward``, when they cover every
      required one, as keywords (``model(**inputs)``: ``{"input_ids": ..., "attention_mask":
      ..., "labels": ...}`` for ``forward(input_ids, attention_mask=None)`` passes the first
      two); else the value of the first of :data:`INPUT_KEYS` it has (else its only tensor);
    * a tuple/list: when the forward requires ``k >= 2`` positional inputs, its first ``k``
      elements (``(ids, mask, labels)`` for ``forward(ids, mask)``); else ``(inputs,
      targets, ...)``: its first element (itself a tensor, tuple or dict as above).
    Without ``model`` only the single-input readings apply."""
    if isinstance(batch, Inputs):
        return batch
    if isinstance(batch, torch.Tensor):
        return Inputs((batch,))
    sig = _forward_signature(model) if model is not None else None
    if isinstance(batch, Mapping):
        kwargs = _dict_kwargs(batch, sig)
        if kwargs is not None:
            return Inputs((), kwargs)
        required = [p.name for p in (sig.parameters.values() if sig is not None else ())
                    if p.kind in (*_POSITIONAL, inspect.Parameter.KEYWORD_ONLY) and p.default is inspect.Parameter.empty]
        if len(required) >= 2:
            raise ValueError(
                f"`probe`: a dict batch is passed by keyword to the model's forward{_signature_text(sig)}, which requires "
                f"{[k for k in required if k not in batch]} too; the batch has keys {list(batch)}. Name its entries "
                "as the forward's parameters."
            )
        return Inputs((batch_inputs(batch),))
    if isinstance(batch, (tuple, list)) and batch:
        required, _ = _positional_counts(sig)
        if required >= 2 and len(batch) >= required and all(isinstance(b, torch.Tensor) for b in batch[:required]):
            return Inputs(batch[:required])
        if isinstance(batch[0], (tuple, list, Mapping)):
            return model_inputs(batch[0], model)
    return Inputs((batch_inputs(batch),))


def batch_inputs(batch: Any) -> torch.Tensor:
    """The (single) model input of one probe batch: a tensor as it is, the first element of an
    ``(inputs, targets, ...)`` tuple/list, or from a dict the value of the first of
    :data:`INPUT_KEYS` it has (else its only tensor value). :func:`model_inputs` also reads
    batches of several inputs."""
    if isinstance(batch, Mapping):
        key = next((k for k in INPUT_KEYS if k in batch), None)
        if key is None:
            tensors = [k for k, v in batch.items() if isinstance(v, torch.Tensor)]
            if len(tensors) != 1:
                raise ValueError(
                    f"`probe` yields dict batches with keys {list(batch)}; name the model input one of "
                    f"{list(INPUT_KEYS)}, or name them as the parameters of the model's forward (they are then "
                    "passed as keywords), or yield (inputs, targets) tuples."
                )
            key = tensors[0]
        batch = batch[key]
    elif isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise ValueError(
            f"`probe` batches must be tensors, (inputs, targets) tuples or dicts; got {type(batch).__name__}."
        )
    return batch


def _input_set(probe: Any, model: Optional[nn.Module]) -> Optional[Inputs]:
    """A probe that is itself one set of model inputs (to be cut into batches): a tuple/list of
    tensors with the same first dimension that the forward takes positionally (it requires
    two or more, or it is a tuple and the forward takes that many), or a dict of tensors; None
    for an iterable of batches."""
    if isinstance(probe, Inputs):
        return probe
    sig = _forward_signature(model) if model is not None else None
    if isinstance(probe, Mapping):
        if not probe:
            raise ValueError("`probe` is an empty dict: pass the model inputs as {name: tensor (N, ...)}.")
        inputs = model_inputs(probe, model)
        inputs.rows  # noqa: B018  (same first dimension, else a ValueError naming the shapes)
        return inputs
    if isinstance(probe, (tuple, list)) and len(probe) >= 2 and all(isinstance(t, torch.Tensor) for t in probe):
        required, most = _positional_counts(sig)
        if len(probe) <= most and (required >= 2 or (isinstance(probe, tuple) and most >= len(probe))):
            inputs = Inputs(probe)
            if not _same_rows(probe):
                raise ValueError(
                    f"`probe`: a {type(probe).__name__} of tensors is read as the model's {len(probe)} positional "
                    f"inputs (its forward takes them), and they must share their first dimension (one row per "
                    f"probe input); got {inputs.describe()}."
                )
            return inputs
    return None


def _iter_probe(probe: Any, batch_size: int, model: Optional[nn.Module] = None) -> Iterator[Inputs]:
    """Batches of model inputs (:class:`Inputs`) from a tensor (split along dim 0), one set of
    inputs (a tuple/list/dict of tensors, see :func:`_input_set`, sliced along dim 0) or an
    iterable of batches (each read by :func:`model_inputs`)."""
    if isinstance(probe, torch.Tensor):
        if probe.ndim == 0 or probe.shape[0] == 0:
            raise ValueError(f"`probe` must hold at least one input along dim 0, got shape {tuple(probe.shape)}.")
        for t in probe.split(batch_size):
            yield Inputs((t,))
        return
    whole = _input_set(probe, model)
    if whole is not None:
        n = whole.rows
        if n == 0:
            raise ValueError(f"`probe` holds no inputs: {whole.describe()}.")
        for start in range(0, n, batch_size):
            yield whole.slice(start, start + batch_size)
        return
    try:
        iterator = iter(probe)
    except TypeError:
        raise ValueError(
            f"`probe` must be a tensor of inputs, a tuple/dict of input tensors or a DataLoader/iterable of "
            f"batches, got {type(probe).__name__}."
        ) from None
    for batch in iterator:
        yield model_inputs(batch, model)


def _first_batch(probe: Any, batch_size: int, model: Optional[nn.Module]) -> Inputs:
    try:
        return next(iter(_iter_probe(probe, batch_size, model)))
    except StopIteration:
        raise ValueError("`probe` yielded no batches; pass at least one input.") from None

def _reiterable(probe: Any) -> bool:
    """Whether iterating ``probe`` twice gives the data twice (not a one-shot iterator)."""
    if isinstance(probe, (torch.Tensor, Mapping)):
        return True
    try:
        return iter(probe) is not probe
    except TypeError:
        return False


def to_model(x: Any, model: nn.Module, device: Optional[torch.device] = None) -> Any:
    """``x`` (a tensor or :class:`Inputs`) moved to ``device`` (default: the model's), floating
    tensors cast to the model's floating dtype (a float16/bfloat16 model gets float16/bfloat16
    inputs); integer and boolean tensors (token ids, masks) keep their dtype."""
    dtype = None
    for t in (*model.parameters(), *model.buffers()):
        if device is None:
            device = t.device
        if t.is_floating_point():
            dtype = t.dtype
            break

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

    return x.map(move) if isinstance(x, Inputs) else move(x)


def _signature_text(sig: inspect.Signature) -> str:
    """``(ids, mask=..., *args, **kwargs)``: the parameters without annotations."""
    parts = []
    for p in sig.parameters.values():
        prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(p.kind, "")
        parts.append(prefix + p.name + ("=..." if p.default is not inspect.Parameter.empty else ""))
    return "(" + ", ".join(parts) + ")"


def _check_call(model: nn.Module, inputs: Inputs) -> None:
    """A clear error, before the forward, when the batch does not fit ``model.forward``'s
    parameters (instead of the forward's own TypeError)."""
    sig = _forward_signature(model)
    if sig is None:
        return
    try:
        sig.bind(*inputs.args, **inputs.kwargs)
    except TypeError as err:
        raise ValueError(
            f"the model's forward{_signature_text(sig)} cannot take the probe batch {inputs.describe()} ({err}). A forward with "
            "several inputs takes a probe that is a tuple of tensors (positional) or a dict of tensors (keywords, "
            "named as the forward's parameters), all with the same first dimension, or a DataLoader yielding such "
            "batches; a tuple batch (a, b, ...) is (inputs, targets) unless the forward requires two or more "
            "positional inputs."
        ) from None
