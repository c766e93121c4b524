"""Argument validation, in one place (the scikit-learn habit).

Every public entry point of :mod:`svcca_torch` checks its inputs here, so that an
error always names the argument at fault and says how to fix it.

Activations are ``(datapoints, neurons)`` (PyTorch's batch-first layout), or
``(N, C, H, W)`` for convolutional layers where a function says it accepts them.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Any, Optional, Tuple, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]

#: CCA needs several datapoints per kept direction; below this many it reports
#: spuriously high similarity (two independent Gaussian layers of 50 neurons on
#: 2,000 datapoints already give a mean CCA of about 0.13).
MIN_DATAPOINTS_PER_DIRECTION = 5


class FewDatapointsWarning(UserWarning):
    """Too few datapoints per kept direction: CCA similarities are inflated."""


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """Turn ``x`` (tensor, numpy array or nested list) into a tensor, keeping its device."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray) or isinstance(x, (list, tuple)):
        arr = np.asarray(x)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise TypeError(f"`{name}` must hold numbers, got an array of dtype {arr.dtype}.")
        return torch.from_numpy(np.ascontiguousarray(arr))
    raise TypeError(
        f"`{name}` must be a torch.Tensor or a numpy array of shape (datapoints, neurons), "
        f"got {type(x).__name__}."
    )


#: The dtypes the kernels compute in, and the names accepted for them.
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "torch.float32": torch.float32,
           "torch.float64": torch.float64, "float": torch.float32, "double": torch.float64}


def check_dtype(dtype: Any, name: str = "dtype") -> Optional[torch.dtype]:
    """``dtype`` is None, ``torch.float32``/``torch.float64`` or one of their names ("float64").

    Half precision is rejected: its 11-bit products cannot resolve the Gram matrices
    (half-precision *inputs* are accepted and computed in float32). Complex is rejected:
    the kernels compare real activations.
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        if key in _DTYPES:
            return _DTYPES[key]
    elif isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float64):
        return dtype
    elif isinstance(dtype, (np.dtype, type)):
        try:
            key = np.dtype(dtype).name
        except TypeError:
            key = ""
        if key in _DTYPES:
            return _DTYPES[key]
    extra = ""
    if dtype in (torch.float16, torch.bfloat16, "float16", "bfloat16", "half"):
        extra = (" Half precision cannot resolve the Gram products; float16/bfloat16 activations are "
                 "computed in float32 automatically, so leave `dtype` unset.")
    raise ValueError(
        f"`{name}` must be torch.float32 or torch.float64 (or the strings 'float32'/'float64'), "
        f"got {dtype!r}.{extra}"
    )


def compute_dtype(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    """The floating dtype to compute in: ``dtype`` if given, else ``x``'s, half types upcast."""
    dtype = check_dtype(dtype)
    if dtype is not None:
        return dtype
    if x.dtype in (torch.float16, torch.bfloat16) or not x.dtype.is_floating_point:
        return torch.float32
    return x.dtype


def check_activations(
    x: Any,
    name: str = "x",
    *,
    dtype: Optional[torch.dtype] = None,
    allow_conv: bool = False,
    min_datapoints: int = 2,
) -> torch.Tensor:
    """Validate one layer's activations and return them as a floating tensor.

    Args:
        x: activations ``(datapoints, neurons)``; ``(N, C, H, W)`` too if ``allow_conv``.
        name: the argument's name, used in error messages.
        dtype: dtype to cast to (default: ``x``'s own, float16/bfloat16 upcast to float32).
        allow_conv: accept 4-D convolutional activations.
        min_datapoints: the fewest datapoints accepted.

    Raises:
        ValueError: wrong number of dimensions, too few datapoints, no neurons, complex values,
            NaN or Inf, or a ``dtype`` other than float32/float64.
    """
    t = as_tensor(x, name)
    dims = (2, 4) if allow_conv else (2,)
    if t.ndim not in dims:
        layout = "(datapoints, neurons)" + (" or (N, C, H, W)" if allow_conv else "")
        hint = ""
        if t.ndim == 1:
            hint = " For a single neuron use x[:, None]."
        elif t.ndim == 4 and not allow_conv:
            hint = " Reduce conv maps first with svcca_torch.conv_to_datapoints or conv_pair_to_datapoints."
        elif t.ndim > 2:
            hint = " Flatten the trailing dimensions with x.flatten(1) or reduce them first."
        raise ValueError(f"`{name}` must have shape {layout}, got {t.ndim} dimensions {tuple(t.shape)}.{hint}")
    if t.shape[0] < min_datapoints:
        raise ValueError(
            f"`{name}` has {t.shape[0]} datapoints (rows); at least {min_datapoints} are needed. "
            "Activations are (datapoints, neurons): if yours are (neurons, datapoints), pass x.T."
        )
    if t.shape[1] < 1 or t[0].numel() == 0:
        raise ValueError(f"`{name}` has no neurons (shape {tuple(t.shape)}).")
    if t.is_complex():
        raise ValueError(
            f"`{name}` is complex ({t.dtype}); the similarity kernels compare real activations. Pass the "
            "real activations (e.g. x.real or x.abs()); for conv maps, dft_cca does its own complex transform."
        )
    t = t.to(compute_dtype(t, dtype))
    # A finite sum proves every value finite without a full boolean mask (10x cheaper);
    # only a non-finite sum (a NaN/Inf, or an overflowing sum) pays for the exact check.
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise non_finite_error(name, t)
    return t


class NonFiniteError(ValueError):
    """Activations hold NaN or Inf values (a ``ValueError``; callers that know more, e.g.
    the layer and step of a capture, catch this type). ``count``: non-finite values,
    ``nan``: of which NaN, ``rows``: datapoints holding one, ``n_rows``: datapoints in all."""

    def __init__(self, message: str, *, count: int = 0, nan: int = 0, rows: int = 0, n_rows: int = 0) -> None:
        super().__init__(message)
        self.count, self.nan, self.rows, self.n_rows = count, nan, rows, n_rows


def non_finite_error(name: str, t: torch.Tensor) -> NonFiniteError:
    """The error for activations ``t`` (datapoints first) holding NaN or Inf values."""
    bad = ~torch.isfinite(t)
    count, nan = int(bad.sum()), int(torch.isnan(t).sum())
    rows = int(bad.reshape(t.shape[0], -1).any(1).sum())
    return NonFiniteError(
        f"`{name}` contains {count} NaN or Inf values ({nan} NaN, {count - nan} Inf, in {rows} of "
        f"{t.shape[0]} datapoints); remove those datapoints or fix the model (e.g. torch.nan_to_num) "
        "before comparing.", count=count, nan=nan, rows=rows, n_rows=int(t.shape[0]))


def check_same_datapoints(x: torch.Tensor, y: torch.Tensor, names: Tuple[str, str] = ("x", "y")) -> None:
    """Both sides must describe the same datapoints, in the same order."""
    if x.shape[0] != y.shape[0]:
        a, b = names
        raise ValueError(
            f"`{a}` has {x.shape[0]} datapoints and `{b}` has {y.shape[0]}: both must be activations "
            "of the same inputs, (datapoints, neurons) each. If one is (neurons, datapoints), transpose it."
        )
    if x.device != y.device:
        raise ValueError(f"`{names[0]}` is on {x.device} and `{names[1]}` on {y.device}; move them to one device.")


def check_keep(keep: Any, name: str = "keep") -> Union[int, float]:
    """``keep`` is an int >= 1 (number of directions) or a float in (0, 1] (a fraction)."""
    if isinstance(keep, (bool, np.bool_)) or not isinstance(keep, numbers.Real):
        raise ValueError(f"`{name}` must be an int >= 1 or a float in (0, 1], got {keep!r}.")
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise ValueError(f"`{name}` as an int is a number of directions and must be >= 1, got {keep}.")
        return int(keep)
    keep = float(keep)
    if not 0.0 < keep <= 1.0:
        raise ValueError(
            f"`{name}` as a float is a fraction and must lie in (0, 1], got {keep}. "
            "Pass an int to keep a fixed number of directions."
        )
    return keep


def check_choice(value: Any, name: str, choices: Tuple[str, ...]) -> str:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")
    return value


class ZeroVarianceError(ValueError):
    """A layer is constant over the datapoints, so it spans no direction to compare (a
    ``ValueError``; callers that know more, e.g. the step of a capture, catch this type)."""


def zero_variance_error(name: str, neurons: Optional[int] = None,
                        dtype: Optional[torch.dtype] = None) -> ZeroVarianceError:
    """The error for a layer with no variance over the datapoints (nothing to compare)."""
    what = "every neuron is" if neurons is None else f"all {neurons} neurons are"
    prec = "" if dtype is None else f" (to within the rounding of their {str(dtype).replace('torch.', '')} values)"
    return ZeroVarianceError(
        f"`{name}` has zero variance: {what} constant over the datapoints{prec}, so it spans no "
        "direction to compare. Check that the layer is not dead on this probe set (e.g. an all-zero "
        "or constant probe, or a saturated activation)."
    )


def warn_if_few_datapoints(n: int, k: int, name: str = "x", stacklevel: int = 3) -> None:
    """Warn when fewer than ~5 datapoints back each direction of the larger side.

    ``k`` is the larger side's rank (CCA) or kept directions (SVCCA): CCA degenerates as
    that approaches the datapoints (at ``k >= n - 1`` every correlation is 1), however
    small the other side is.
    """
    if k > 0 and n < MIN_DATAPOINTS_PER_DIRECTION * k:
        warnings.warn(
            f"`{name}`: {n} datapoints for {k} directions on the larger side ({n / k:.1f} per direction; "
            f"at least {MIN_DATAPOINTS_PER_DIRECTION} are advised). CCA then reports spuriously high "
            "similarity; use more probe datapoints or keep fewer directions (`keep`).",
            FewDatapointsWarning,
            stacklevel=stacklevel,
        )


def warn_keep_capped(keep: int, capped: "list[tuple[str, int]]", stacklevel: int = 3) -> None:
    """One warning for every layer narrower than an int ``keep`` (it keeps all its neurons)."""
    if capped:
        layers = ", ".join(f"`{n}` ({w})" for n, w in capped)
        warnings.warn(
            f"`keep={keep}` exceeds the neurons of {layers}; those keep all their directions. "
            "Pass a smaller `keep` or a fraction to silence this.",
            UserWarning,
            stacklevel=stacklevel,
        )


def check_keep_rule(keep: Any, keep_rule: Any) -> Tuple[Union[int, float], str]:
    """SVCCA's truncation, validated once for every caller (svcca, svd_reduce, similarity_matrix)."""
    return check_keep(keep), check_choice(keep_rule, "keep_rule", ("singular_values", "variance"))


def check_bool(value: Any, name: str) -> bool:
    """``value`` is a bool (numpy bools too); strings and numbers are refused."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def check_rtol(rtol: Any, name: str = "rtol") -> Optional[float]:
    """``rtol`` is None (the dtype's default) or a number in (0, 1)."""
    return None if rtol is None else check_fraction(rtol, name)


def check_names(names: Any) -> Tuple[str, str]:
    """``names`` is a pair of strings used for the two inputs in error messages."""
    if not (isinstance(names, (tuple, list)) and len(names) == 2 and all(isinstance(n, str) for n in names)):
        raise ValueError(f"`names` must be a pair of strings such as ('a.npy', 'b.npy'), got {names!r}.")
    return str(names[0]), str(names[1])


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` is an int >= ``minimum`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


def check_fraction(value: Any, name: str, *, low_inclusive: bool = False, high_inclusive: bool = False) -> float:
    """``value`` is a real number in the interval (0, 1), ends included where asked."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if ok:
        v = float(value)
        ok = v == v and (v >= 0.0 if low_inclusive else v > 0.0) and (v <= 1.0 if high_inclusive else v < 1.0)
    if not ok:
        interval = ("[" if low_inclusive else "(") + "0, 1" + ("]" if high_inclusive else ")")
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}.")
    return float(value)


def check_conv_activations(
    x: Any, name: str = "x", *, dtype: Optional[torch.dtype] = None, min_datapoints: int = 2
) -> torch.Tensor:
    """Validate convolutional activations ``(N, C, H, W)`` and return them as a floating tensor."""
    t = as_tensor(x, name)
    if t.ndim != 4:
        hint = " Fully connected activations (datapoints, neurons) need no folding." if t.ndim == 2 else ""
        raise ValueError(
            f"`{name}` must be convolutional activations of shape (N, C, H, W), got {t.ndim} "
            f"dimensions {tuple(t.shape)}.{hint}"
        )
    if min(t.shape[2:]) < 1:
        raise ValueError(f"`{name}` has an empty spatial map (shape {tuple(t.shape)}).")
    return check_activations(t, name, dtype=dtype, allow_conv=True, min_datapoints=min_datapoints)


def check_spatial_size(size: Any, name: str = "size") -> Tuple[int, int]:
    """``size`` is an int ``s`` (meaning ``(s, s)``) or a pair ``(h, w)`` of ints >= 1."""
    pair = (size, size) if isinstance(size, numbers.Integral) and not isinstance(size, bool) else size
    ok = (
        isinstance(pair, (tuple, list))
        and len(pair) == 2
        and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in pair)
    )
    if not ok:
        raise ValueError(f"`{name}` must be an int >= 1 or a pair (h, w) of ints >= 1, got {size!r}.")
    return int(pair[0]), int(pair[1])


def check_optional_positive_int(value: Any, name: str) -> Optional[int]:
    """``value`` is None or an int >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be None or an int >= 1, got {value!r}.")
    return int(value)


def check_flag_or_bytes(value: Any, name: str, default: int) -> Optional[int]:
    """``value`` is True (``default`` bytes), False (off) or a byte count >= 1; the byte
    count, or None for off."""
    if isinstance(value, (bool, np.bool_)):
        return default if value else None
    if not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be True (up to {default} bytes), False (off) or a number of bytes >= 1, "
                         f"got {value!r}.")
    return int(value)


def check_device(device: Any, name: str = "device") -> Optional[torch.device]:
    """``None`` or a ``torch.device`` (a string such as ``"cpu"``/``"cuda:0"`` is parsed)."""
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`{name}` must be a torch.device or a device string such as 'cpu' or 'cuda', "
                         f"got {device!r} ({err}).") from None


def check_probe(probe: Any) -> Any:
    """``probe`` is a tensor ``(N, ...)`` or a re-iterable of batches (a DataLoader, a list
    of batches); single-use iterators (generators) are refused: the probe is run again at
    every capture and must give the same inputs in the same order."""
    if probe is None:
        raise ValueError("`probe` is None: pass a tensor of probe inputs or a DataLoader over them.")
    if isinstance(probe, torch.Tensor):
        if probe.ndim == 0 or probe.shape[0] < 2:
            raise ValueError(
                f"`probe` must hold at least 2 inputs along dim 0 (datapoints first), got shape {tuple(probe.shape)}."
            )
        return probe
    if not hasattr(probe, "__iter__"):
        raise ValueError(f"`probe` must be a tensor or a DataLoader/iterable of batches, got {type(probe).__name__}.")
    try:
        single_use = iter(probe) is probe
    except TypeError:
        single_use = False
    if single_use:
        raise ValueError(
            f"`probe` is a single-use iterator ({type(probe).__name__}): it is run again at every capture, so it "
            "must be re-iterable. Pass a tensor, a DataLoader (shuffle=False), or a list of batches "
            "(e.g. `list(generator)`)."
        )
    try:
        n = len(probe.dataset) if hasattr(probe, "dataset") else len(probe)
    except TypeError:
        return probe
    if n == 0:
        raise ValueError("`probe` is empty: it must yield at least 2 inputs.")
    return probe
