"""Convolutional layers: turning ``(N, C, H, W)`` maps into ``(datapoints, neurons)``, and
the paper's DFT-CCA (Raghu et al. 2017, §2.2).

A conv layer's neurons are its channels, and every spatial position of every image is a
datapoint (the paper's convention): :func:`conv_to_datapoints` folds an ``(N, C, H, W)``
map into ``(N * h * w, C)`` activations, optionally resizing it first and subsampling the
rows; :func:`conv_pair_to_datapoints` does the same for two layers at once, bringing maps of
different spatial sizes (or a conv layer and a linear one) to common datapoints.

Subsampling is reproducible by construction: the kept rows are drawn by a private
``torch.Generator`` seeded with ``seed`` and depend only on ``(N, h, w, max_datapoints,
seed)``, never on the values, the channels, the device or the global RNG state. Two layers
with maps of the same size, or one layer at two training checkpoints, therefore get the
*same* datapoints (image, position) -- which CCA needs: its inputs must be activations of
the same datapoints, row for row. :func:`conv_datapoint_indices` returns those rows.

:func:`dft_cca` treats every (channel, position) as a neuron but does one small CCA per
spatial frequency instead of one huge one (see its docstring for the exact statement).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ._linalg import canonical_from_grams, default_rtol, eigh_desc, prefer_datapoint_gram, rank_mask
from ..utils.validation import (
    check_activations,
    check_choice,
    check_conv_activations,
    check_optional_positive_int,
    check_rtol,
    check_same_datapoints,
    check_spatial_size,
    warn_if_few_datapoints,
)

__all__ = [
    "DFTCCAResult",
    "conv_datapoint_indices",
    "conv_pair_to_datapoints",
    "conv_to_datapoints",
    "dft_cca",
]

Size = Union[int, Tuple[int, int]]


# --------------------------------------------------------------------------- folding


def conv_datapoint_indices(
    n: int, size: Size, *, max_datapoints: Optional[int] = None, seed: int = 0
) -> Optional[torch.Tensor]:
    """The rows :func:`conv_to_datapoints` keeps from ``n`` images of an ``h x w`` map.

    Rows are numbered image-major, ``row = image * h * w + i * w + j`` for position
    ``(i, j)``; the returned indices are sorted ascending, so they keep that order. The
    draw uses a private CPU ``torch.Generator`` seeded with ``seed`` and depends only on
    ``(n, h, w, max_datapoints, seed)``, so every layer with an ``h x w`` map, at every
    checkpoint, gets the same datapoints.

    Returns:
        A CPU ``int64`` tensor of ``max_datapoints`` row indices, or ``None`` when all
        ``n * h * w`` rows are kept (``max_datapoints`` is None or not smaller).
    """
    h, w = check_spatial_size(size, "size")
    max_datapoints = check_optional_positive_int(max_datapoints, "max_datapoints")
    total = int(n) * h * w
    if max_datapoints is None or total <= max_datapoints:
        return None
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randperm(total, generator=gen)[:max_datapoints].sort().values


def _fold(x: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """``(N, C, h, w)`` -> ``(N*h*w, C)`` image-major, keeping only ``rows`` if given."""
    n, c, h, w = x.shape
    flat = x.flatten(2)  # (N, C, h*w)
    if rows is None:
        return flat.transpose(1, 2).reshape(n * h * w, c)
    rows = rows.to(x.device)
    # Gather only the kept rows instead of materialising the whole folded map.
    return flat[rows // (h * w), :, rows % (h * w)]


RESIZE_MODES = ("avgpool", "interpolate")


def resize_map(x: torch.Tensor, size: Tuple[int, int], resize: str) -> torch.Tensor:
    """Bring ``(N, C, H, W)`` to spatial ``size``: adaptive average pooling along axes that
    shrink, bilinear interpolation along axes that grow (or everywhere if ``resize`` says so)."""
    current = tuple(x.shape[-2:])
    if current == size:
        return x
    if resize == "interpolate":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    pooled = (min(size[0], current[0]), min(size[1], current[1]))
    if pooled != current:
        x = F.adaptive_avg_pool2d(x, pooled)
    if pooled != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


def conv_to_datapoints(
    x: Any,
    *,
    size: Optional[Size] = None,
    resize: str = "avgpool",
    max_datapoints: Optional[int] = None,
    seed: int = 0,
) -> torch.Tensor:
    """Fold a conv layer's activations ``(N, C, H, W)`` into ``(datapoints, neurons)``.

    Channels are the neurons; every spatial position of every image is a datapoint, in
    image-major order: row ``n * h * w + i * w + j`` is image ``n`` at position ``(i, j)``.

    Args:
        x: activations ``(N, C, H, W)`` (tensor or numpy array; a tensor stays on its device).
        size: bring the map to this spatial size ``h`` or ``(h, w)`` before folding. With
            ``resize="avgpool"`` axes that shrink are adaptive-average-pooled and axes that
            grow are bilinearly interpolated; ``resize="interpolate"`` interpolates always.
            ``size=1`` is global average pooling and gives ``(N, C)``.
        resize: ``"avgpool"`` (default) or ``"interpolate"``, see ``size``.
        max_datapoints: keep at most this many rows, drawn uniformly without replacement
            and kept in image-major order. The draw depends only on ``(N, h, w,
            max_datapoints, seed)`` (see :func:`conv_datapoint_indices`), so two layers of
            the same map size, or the same layer at two checkpoints, get the same datapoints.
        seed: seed of the private generator used for ``max_datapoints``; the global RNG is
            not touched.

    Returns:
        ``(N * h * w, C)`` activations, or ``(max_datapoints, C)`` when subsampled.
    """
    t = check_conv_activations(x, "x", min_datapoints=1)  # one image still has H*W positions
    check_choice(resize, "resize", RESIZE_MODES)
    if size is not None:
        t = resize_map(t, check_spatial_size(size, "size"), resize)
    n, _, h, w = t.shape
    return _fold(t, conv_datapoint_indices(n, (h, w), max_datapoints=max_datapoints, seed=seed))


def _spatial(t: torch.Tensor) -> Tuple[int, int]:
    return (int(t.shape[2]), int(t.shape[3])) if t.ndim == 4 else (1, 1)


def _describe(t: torch.Tensor) -> str:
    return "(N, D) with no spatial axes" if t.ndim == 2 else f"{t.shape[2]}x{t.shape[3]}"


def conv_pair_to_datapoints(
    x: Any,
    y: Any,
    *,
    mode: str = "auto",
    max_datapoints: Optional[int] = None,
    seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bring two layers to common datapoints: each ``(N, C, H, W)`` or ``(N, D)`` in,
    ``(datapoints, neurons)`` out for both, rows matching.

    Modes (``N`` must agree):

    - ``"fold"``: every (image, position) is a datapoint; both maps must share ``H x W``.
    - ``"avgpool"``: adaptive-average-pool the larger map down to the smaller one's size.
    - ``"interpolate"``: bilinearly upsample the smaller map to the larger one's size
      (the paper's choice for layers of different resolution).
    - ``"mean"``: global average pooling of both: one datapoint per image, ``(N, C)``.
    - ``"auto"`` (default): ``"fold"`` if the sizes match, else ``"interpolate"``; when one
      side is ``(N, D)`` (e.g. a linear layer) the conv side is mean-pooled.

    ``"avgpool"`` and ``"interpolate"`` need one map to be at least as large as the other
    along both axes; otherwise resize explicitly with :func:`conv_to_datapoints` (``size=``).
    ``max_datapoints``/``seed`` subsample rows as in :func:`conv_to_datapoints`, with the
    same rows for both sides.

    Returns:
        ``(x2, y2)``, each ``(datapoints, neurons)``, rows are the same (image, position).
    """
    xt = check_activations(x, "x", allow_conv=True, min_datapoints=1)
    yt = check_activations(y, "y", allow_conv=True, min_datapoints=1)
    check_same_datapoints(xt, yt)
    check_choice(mode, "mode", ("auto", "fold", "avgpool", "interpolate", "mean"))
    sx, sy = _spatial(xt), _spatial(yt)
    if mode == "auto":
        if xt.ndim != yt.ndim:
            mode = "mean"
        else:
            mode = "fold" if sx == sy else "interpolate"

    if mode == "mean":
        target = (1, 1)
    elif mode == "fold":
        if sx != sy:
            fix = (
                "use mode='mean' (or 'auto') to mean-pool the conv layer"
                if xt.ndim != yt.ndim
                else "use mode='interpolate' (upsample the smaller map, the paper's choice), "
                "'avgpool' (pool the larger map) or 'mean' (global average pooling)"
            )
            raise ValueError(
                f"`mode='fold'` needs both layers to share a spatial size, but `x` is {_describe(xt)} "
                f"and `y` is {_describe(yt)}; {fix}."
            )
        target = sx
    else:  # avgpool / interpolate
        if xt.ndim != yt.ndim and mode == "interpolate":
            raise ValueError(
                f"`mode='interpolate'` cannot upsample a layer without spatial axes (`x` is {_describe(xt)}, "
                f"`y` is {_describe(yt)}); use mode='mean' (or 'auto') to mean-pool the conv layer."
            )
        x_le_y = sx[0] <= sy[0] and sx[1] <= sy[1]
        y_le_x = sy[0] <= sx[0] and sy[1] <= sx[1]
        if not (x_le_y or y_le_x):
            raise ValueError(
                f"`mode={mode!r}` needs one map to be at least as large as the other along both axes, "
                f"but `x` is {_describe(xt)} and `y` is {_describe(yt)}. Resize both to a common size "
                "with conv_to_datapoints(..., size=(h, w)), or use mode='mean'."
            )
        small, large = (sx, sy) if x_le_y else (sy, sx)
        target = small if mode == "avgpool" else large

    def bring(t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 2:
            return t.unsqueeze(-1).unsqueeze(-1)
        return resize_map(t, target, "avgpool" if mode in ("avgpool", "mean", "fold") else "interpolate")

    x4, y4 = bring(xt), bring(yt)
    rows = conv_datapoint_indices(xt.shape[0], target, max_datapoints=max_datapoints, seed=seed)
    return _fold(x4, rows), _fold(y4, rows)


# --------------------------------------------------------------------------- DFT-CCA


@dataclass
class DFTCCAResult:
    """Result of :func:`dft_cca`.

    Attributes:
        coefficients: ``(k,)`` canonical correlations, descending: the union over all kept
            spatial frequencies ``f`` *and* ``-f`` (a real map's ``f`` and ``-f`` give the same
            coefficients, each counted, exactly as in the CCA of the whole layers).
        mean: ``coefficients.mean()`` as a float.
        per_frequency: ``(h, w, r)`` coefficients per spatial frequency (FFT order along both
            axes, see ``frequencies``), descending along ``r = min(C_x, C_y)``, padded with NaN
            past each frequency's number of coefficients; only with ``return_per_frequency``.
        frequencies: the signed spatial frequencies (cycles per map) of ``per_frequency``'s
            first two axes, as ``(freq_h, freq_w)``; only with ``return_per_frequency``.
    """

    coefficients: torch.Tensor
    mean: float
    per_frequency: Optional[torch.Tensor] = None
    frequencies: Optional[Tuple[torch.Tensor, torch.Tensor]] = None


def _kept_period(lx: int, ly: int) -> int:
    """How many signed frequencies along one axis both maps share.

    Equal sizes keep all ``L``. Otherwise only those strictly below the smaller map's
    Nyquist frequency, ``|u| <= (l - 1) // 2``: for even ``l`` the smaller map's Nyquist
    term aliases ``+l/2`` and ``-l/2``, which the larger map keeps apart."""
    if lx == ly:
        return lx
    return 2 * ((min(lx, ly) - 1) // 2) + 1


def _canonical_from_datapoints(zx: torch.Tensor, zy: torch.Tensor, rtol: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Canonical correlations per frequency from the images' side, for channels outnumbering
    the images: ``zx`` ``(F, N, Cx)``, ``zy`` ``(F, N, Cy)`` centred spectra.

    Each side's ``Z Zᴴ`` ``(F, N, N)`` has the nonzero eigenvalues of its channel Gram
    ``Zᴴ Z``, so :func:`_linalg.rank_mask` keeps the same directions as
    :func:`_linalg.canonical_from_grams`' whitener; the kept eigenvectors ``U`` are the
    whitened directions over the images, and the correlations are the singular values of
    ``Uxᴴ Uy``. Returns ``rho`` ``(F, min(Cx, Cy))`` (zeros past the valid ones) and the
    number valid per frequency, ``min(rank_x, rank_y)``, as that function does.
    """
    sides = []
    for z in (zx, zy):
        e = eigh_desc((z @ z.mH).to(torch.complex128))
        mask = rank_mask(e.values, rtol)
        sides.append((e.vectors * mask.unsqueeze(-2).to(e.vectors.dtype), mask.sum(-1)))
    (ux, rx), (uy, ry) = sides
    s = torch.linalg.svdvals(ux.mH @ uy)  # (F, N) descending
    n_valid = torch.minimum(rx, ry)
    r = min(int(zx.shape[-1]), int(zy.shape[-1]))
    if s.shape[-1] < r:
        s = torch.cat([s, s.new_zeros(s.shape[:-1] + (r - s.shape[-1],))], -1)
    s = s[..., :r]
    idx = torch.arange(r, device=s.device)
    return torch.where(idx < n_valid.unsqueeze(-1), s.clamp(0.0, 1.0), 0.0), n_valid


def _axis_index(q: int, length: int, device: torch.device) -> torch.Tensor:
    """Indices, in a length-``length`` FFT axis, of the ``q`` kept signed frequencies in FFT
    order (``0, 1, ..., then the negatives``)."""
    i = torch.arange(q, device=device)
    return torch.where(i <= q // 2, i, length - (q - i))


def dft_cca(
    x: Any,
    y: Any,
    *,
    centering: str = "per_frequency",
    dtype: Optional[torch.dtype] = None,
    rtol: Optional[float] = None,
    return_per_frequency: bool = False,
) -> DFTCCAResult:
    """CCA of two conv layers with every (channel, position) a neuron, one CCA per
    spatial frequency (Raghu et al. 2017, §2.2).

    Both maps ``(N, C, H, W)`` are 2-D Fourier transformed over their spatial axes; for
    every spatial frequency ``f`` the complex channel vectors ``X_n(f)`` and ``Y_n(f)`` of
    the ``N`` images are compared by CCA. All frequencies are solved in one batch (Grams
    ``(F, C, C)`` from one batched matmul, one batched eigen/SVD call): the cost is
    ``O(N H W C^2 + H W C^3)`` instead of ``O(N H W (C H W)^2 + (C H W)^3)`` for the flat CCA.
    With more channels than images (``max(C_x, C_y) > N``) each frequency works from the
    images' ``(N, N)`` Grams instead (same nonzero eigenvalues, same rank decision):
    ``O(N^2 H W C + H W N^3)``, and no ``(F, C, C)`` array is formed.

    The statement (the paper's Theorem 1): if the dataset is translation invariant, i.e.
    closed under joint circular shifts of both maps, the DFT block-diagonalises the
    covariance of the ``C*H*W`` flattened neurons, so the union of the per-frequency
    coefficients *equals* the coefficients of the CCA between the whole layers flattened
    to ``(N, C*H*W)``. Every frequency is counted, ``f`` and ``-f`` alike: for real maps
    they carry identical coefficients, and the flat CCA has each of them twice too. (Only
    half the frequencies are solved, ``torch.fft.rfft2``; the other half is the mirror.)

    Centring:

    - ``"per_frequency"`` (default): subtract each (channel, frequency)'s mean over the
      ``N`` images, identical to centring every (channel, position) neuron over the images
      as the flat CCA does. On a translation-invariant dataset only the DC term has a mean.
    - ``"dc"``: subtract only each channel's grand mean (which lives in the DC term). The
      result is then exactly the flat CCA over the dataset made of all ``H*W`` joint
      circular shifts of every image, without materialising it: the right reading when
      the given images are the un-augmented originals.

    Maps of different spatial size are compared at the frequencies, in cycles per map, that
    both resolve: along an axis where the sizes agree, all of them; where they differ, the
    ``2 * ((l - 1) // 2) + 1`` signed frequencies ``|u| <= (l - 1) // 2`` of the smaller size
    ``l`` (its Nyquist term is dropped for even ``l``, since it aliases ``+l/2`` and ``-l/2``).
    The theorem above then holds only approximately.

    Args:
        x, y: conv activations ``(N, C_x, H_x, W_x)`` and ``(N, C_y, H_y, W_y)`` of the same
            ``N`` images (tensors stay on their device; numpy arrays are accepted).
        centering: ``"per_frequency"`` or ``"dc"``, see above.
        dtype: ``torch.float32`` or ``torch.float64`` for the transforms and Grams (default
            float64, as in :func:`cca`: telling rank-deficient directions from real ones
            needs it); the small per-frequency eigenproblems always run in complex128.
        rtol: a number in (0, 1), the relative threshold on singular values below which a
            direction of a frequency's channel space counts as absent (default from the dtype).
        return_per_frequency: also return the ``(h, w, r)`` coefficients per frequency.

    Returns:
        :class:`DFTCCAResult` with ``coefficients`` (descending), ``mean`` and optionally
        ``per_frequency`` and ``frequencies``.
    """
    if dtype not in (None, torch.float32, torch.float64):
        raise ValueError(f"`dtype` must be torch.float32 or torch.float64 (the maps are real), got {dtype}.")
    check_choice(centering, "centering", ("per_frequency", "dc"))
    rtol = check_rtol(rtol)
    real = dtype or torch.float64
    xt = check_conv_activations(x, "x", dtype=real)
    yt = check_conv_activations(y, "y", dtype=real)
    check_same_datapoints(xt, yt)
    n, cx, hx, wx = xt.shape
    cy, hy, wy = yt.shape[1:]
    warn_if_few_datapoints(n, min(max(cx, cy), n), name="x and y (per frequency)", stacklevel=3)

    q, p = _kept_period(hx, hy), _kept_period(wx, wy)
    half = p // 2 + 1  # kept non-negative frequencies along w; the rest mirror them
    cdt = torch.complex128 if real == torch.float64 else torch.complex64
    # Both spectra go into one buffer (q, half, N, Cx+Cy): one copy per side, then one bmm.
    z = torch.empty(q, half, n, cx + cy, dtype=cdt, device=xt.device)
    for t, h, cols in ((xt, hx, slice(0, cx)), (yt, hy, slice(cx, cx + cy))):
        s = torch.fft.rfft2(t)[..., :half]  # (N, C, h, half)
        if q != h:
            s = s.index_select(2, _axis_index(q, h, t.device))
        z[..., cols] = s.permute(2, 3, 0, 1)
    z = z.view(q * half, n, cx + cy)  # (F, N, C): frequency (u, v) at F index u * half + v
    # Centring commutes with the DFT, so it is done here on the kept frequencies only.
    # A channel's grand mean lives in the DC term (F index 0) alone.
    if centering == "per_frequency":
        z -= z.mean(dim=1, keepdim=True)
    else:
        z[0] -= z[0].mean(dim=0, keepdim=True)
    if rtol is None:
        rtol = default_rtol(z.dtype)
    if prefer_datapoint_gram(n, max(cx, cy)):
        rho, n_valid = _canonical_from_datapoints(z[..., :cx], z[..., cx:], rtol)
    else:
        g = (z.mH @ z).to(torch.complex128)  # (F, Cx+Cy, Cx+Cy)
        res = canonical_from_grams(g[:, :cx, :cx], g[:, cx:, cx:], g[:, :cx, cx:], rtol)
        rho, n_valid = res.rho, res.n
    rho = rho.to(real)  # (F, r)
    valid = torch.arange(rho.shape[-1], device=rho.device) < n_valid.unsqueeze(-1)

    # Column v of the half spectrum stands for v and -v, unless those coincide (v = 0, or
    # v = p/2 for even p, when the whole axis is kept): then it is its own mirror.
    v = torch.arange(half, device=rho.device)
    mult = torch.where((v == 0) | (2 * v == p), 1, 2).repeat(q)  # (F,)
    coefficients = rho[valid].repeat_interleave(mult.unsqueeze(-1).expand_as(valid)[valid])
    coefficients = coefficients.sort(descending=True).values
    mean = float(coefficients.mean()) if coefficients.numel() else 0.0
    result = DFTCCAResult(coefficients, mean)

    if return_per_frequency:
        per = torch.where(valid, rho, torch.nan).reshape(q, half, -1)
        # Full (q, p) grid in FFT order: column j > p // 2 is frequency (-u, -(p - j)), the
        # mirror of half-spectrum entry (-u, p - j), whose coefficients are the same.
        i = torch.arange(q, device=rho.device).unsqueeze(1)
        j = torch.arange(p, device=rho.device).unsqueeze(0)
        mirrored = j > p // 2
        rows = torch.where(mirrored, (q - i) % q, i)
        cols = torch.where(mirrored, p - j, j)
        result.per_frequency = per[rows, cols]
        result.frequencies = (
            torch.fft.fftfreq(q, 1.0 / q, device=rho.device).round().long(),
            torch.fft.fftfreq(p, 1.0 / p, device=rho.device).round().long(),
        )
    return result
