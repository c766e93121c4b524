"""Conv-layer reductions (folding, resizing, subsampling) and the paper's DFT-CCA."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from svcca_torch import cca
from svcca_torch.functional.conv import (
    conv_datapoint_indices,
    conv_pair_to_datapoints,
    conv_to_datapoints,
    dft_cca,
)


def textbook_cca(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Björck-Golub CCA in float64: singular values of Qaᵀ Qb for the QR of the centred data."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    qa, _ = np.linalg.qr(a)
    qb, _ = np.linalg.qr(b)
    return np.linalg.svd(qa.T @ qb, compute_uv=False)


def circular_conv(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Multi-channel circular convolution ``(B, C, H, W) * (D, C, H, W) -> (B, D, H, W)``."""
    spec = np.einsum("dcuv,bcuv->bduv", np.fft.fft2(kernel), np.fft.fft2(x))
    return np.fft.ifft2(spec).real


def all_circular_shifts(*maps: np.ndarray) -> list[np.ndarray]:
    """Every image under all its H*W circular shifts, the same shift for every map."""
    h, w = maps[0].shape[2:]
    shifts = [(a, b) for a in range(h) for b in range(w)]
    return [np.concatenate([np.roll(m, s, axis=(2, 3)) for s in shifts]) for m in maps]


def translation_pair(b: int = 40, c: int = 3, d: int = 2, h: int = 4, w: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, c, h, w)) + 0.7  # a non-zero mean, carried by the DC term
    y = circular_conv(x, rng.standard_normal((d, c, h, w))) + 0.5 * rng.standard_normal((b, d, h, w))
    return x, y


# --------------------------------------------------------------------------- folding


def test_fold_shape_and_image_major_row_order():
    x = torch.randn(3, 2, 4, 5)
    f = conv_to_datapoints(x)
    assert f.shape == (3 * 4 * 5, 2)
    expected = torch.stack([x[n, :, i, j] for n in range(3) for i in range(4) for j in range(5)])
    assert torch.equal(f, expected)


def test_fold_keeps_the_dtype():
    assert conv_to_datapoints(torch.randn(2, 3, 4, 4), size=2).dtype == torch.float32
    assert conv_to_datapoints(torch.randn(2, 3, 4, 4, dtype=torch.float64), size=8).dtype == torch.float64


def test_fold_accepts_numpy_and_keeps_values():
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 2))
    f = conv_to_datapoints(x)
    assert isinstance(f, torch.Tensor) and f.dtype == torch.float64
    np.testing.assert_array_equal(f.numpy(), x.transpose(0, 2, 3, 1).reshape(-1, 3))


def test_a_single_image_folds_into_its_positions():
    x = torch.randn(1, 2, 3, 3)
    assert conv_to_datapoints(x).shape == (9, 2)
    x2, y2 = conv_pair_to_datapoints(x, 2 * x, max_datapoints=4)
    assert x2.shape == (4, 2)
    torch.testing.assert_close(y2, 2 * x2)


def test_size_one_is_global_average_pooling():
    x = torch.randn(5, 3, 6, 7)
    f = conv_to_datapoints(x, size=1)
    assert f.shape == (5, 3)
    torch.testing.assert_close(f, x.mean(dim=(2, 3)))


def test_avgpool_shrinks_by_block_means():
    x = torch.randn(2, 3, 4, 6)
    f = conv_to_datapoints(x, size=(2, 3))
    blocks = x.reshape(2, 3, 2, 2, 3, 2).mean(dim=(3, 5))  # 2x2 blocks
    torch.testing.assert_close(f, blocks.permute(0, 2, 3, 1).reshape(-1, 3))


def test_growing_and_forced_interpolation_are_bilinear():
    x = torch.randn(2, 3, 4, 4)
    up = conv_to_datapoints(x, size=8)
    ref = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, ref.permute(0, 2, 3, 1).reshape(-1, 3))
    down = conv_to_datapoints(x, size=2, resize="interpolate")
    ref = F.interpolate(x, size=(2, 2), mode="bilinear", align_corners=False)
    torch.testing.assert_close(down, ref.permute(0, 2, 3, 1).reshape(-1, 3))
    # Mixed: pool the axis that shrinks, interpolate the one that grows.
    mixed = conv_to_datapoints(x, size=(2, 8))
    ref = F.interpolate(F.adaptive_avg_pool2d(x, (2, 4)), size=(2, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(mixed, ref.permute(0, 2, 3, 1).reshape(-1, 3))


# --------------------------------------------------------------------------- subsampling


def test_subsampling_is_deterministic_and_shared_across_layers():
    torch.manual_seed(0)
    x = torch.randn(10, 4, 5, 5)
    other_layer = torch.randn(10, 7, 5, 5)  # different channels, same N and map size
    state = torch.get_rng_state()
    a = conv_to_datapoints(x, max_datapoints=37, seed=3)
    b = conv_to_datapoints(x, max_datapoints=37, seed=3)
    c = conv_to_datapoints(other_layer, max_datapoints=37, seed=3)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must not be touched"
    assert a.shape == (37, 4) and c.shape == (37, 7)
    assert torch.equal(a, b)
    rows = conv_datapoint_indices(10, 5, max_datapoints=37, seed=3)
    assert torch.equal(a, conv_to_datapoints(x)[rows])
    assert torch.equal(c, conv_to_datapoints(other_layer)[rows])  # the same (image, position)s
    assert torch.equal(rows, rows.unique())  # sorted, no repeats: image-major order kept
    assert not torch.equal(rows, conv_datapoint_indices(10, 5, max_datapoints=37, seed=4))


def test_subsampling_rows_follow_the_resized_map_size():
    x = torch.randn(6, 2, 8, 8)
    a = conv_to_datapoints(x, size=4, max_datapoints=20, seed=1)
    rows = conv_datapoint_indices(6, (4, 4), max_datapoints=20, seed=1)
    assert torch.equal(a, conv_to_datapoints(x, size=4)[rows])


def test_no_subsampling_when_max_datapoints_is_not_smaller():
    assert conv_datapoint_indices(2, (3, 3), max_datapoints=18) is None
    x = torch.randn(2, 1, 3, 3)
    assert torch.equal(conv_to_datapoints(x, max_datapoints=100), conv_to_datapoints(x))


# --------------------------------------------------------------------------- pairs


def test_pair_fold_uses_the_same_rows_for_both_sides():
    x = torch.randn(8, 3, 4, 4)
    y = 3.0 * x[:, :2]
    x2, y2 = conv_pair_to_datapoints(x, y, mode="fold", max_datapoints=30, seed=5)
    assert x2.shape == (30, 3) and y2.shape == (30, 2)
    torch.testing.assert_close(y2, 3.0 * x2[:, :2])
    x3, _ = conv_pair_to_datapoints(x, y, max_datapoints=30, seed=5)  # auto: same size -> fold
    assert torch.equal(x3, x2)


def test_pair_interpolate_avgpool_and_mean():
    x = torch.randn(4, 3, 8, 8)
    y = torch.randn(4, 2, 4, 4)
    fold = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # noqa: E731
    x2, y2 = conv_pair_to_datapoints(x, y, mode="interpolate")
    torch.testing.assert_close(x2, fold(x))
    torch.testing.assert_close(y2, fold(F.interpolate(y, size=(8, 8), mode="bilinear", align_corners=False)))
    x_auto, y_auto = conv_pair_to_datapoints(x, y)  # auto: sizes differ -> interpolate
    assert torch.equal(x_auto, x2) and torch.equal(y_auto, y2)
    x2, y2 = conv_pair_to_datapoints(y, x, mode="avgpool")  # the larger side is pooled
    torch.testing.assert_close(x2, fold(y))
    torch.testing.assert_close(y2, fold(F.avg_pool2d(x, 2)))
    x2, y2 = conv_pair_to_datapoints(x, y, mode="mean")
    torch.testing.assert_close(x2, x.mean((2, 3)))
    torch.testing.assert_close(y2, y.mean((2, 3)))


def test_pair_with_a_linear_layer_mean_pools_the_conv_side():
    x = torch.randn(6, 3, 5, 5)
    logits = torch.randn(6, 10)
    for mode in ("auto", "mean", "avgpool"):
        x2, y2 = conv_pair_to_datapoints(x, logits, mode=mode)
        torch.testing.assert_close(x2, x.mean((2, 3)))
        assert torch.equal(y2, logits)
    y2, x2 = conv_pair_to_datapoints(logits, x, max_datapoints=4, seed=0)
    rows = conv_datapoint_indices(6, 1, max_datapoints=4, seed=0)
    assert torch.equal(y2, logits[rows])
    torch.testing.assert_close(x2, x.mean((2, 3))[rows])


def test_pair_errors_name_the_argument_and_the_fix():
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(ValueError, match=r"`mode='fold'` needs both layers to share a spatial size.*interpolate"):
        conv_pair_to_datapoints(x, torch.randn(4, 2, 4, 4), mode="fold")
    with pytest.raises(ValueError, match=r"`mode='fold'`.*mode='mean'"):
        conv_pair_to_datapoints(x, torch.randn(4, 2), mode="fold")
    with pytest.raises(ValueError, match=r"`mode='interpolate'` cannot upsample.*mode='mean'"):
        conv_pair_to_datapoints(x, torch.randn(4, 2), mode="interpolate")
    with pytest.raises(ValueError, match=r"at least as large as the other along both axes.*size="):
        conv_pair_to_datapoints(torch.randn(4, 3, 8, 4), torch.randn(4, 3, 4, 8))
    with pytest.raises(ValueError, match=r"`x` has 4 datapoints and `y` has 5"):
        conv_pair_to_datapoints(x, torch.randn(5, 3, 8, 8))
    with pytest.raises(ValueError, match=r"`y` must have shape .*got 3 dimensions"):
        conv_pair_to_datapoints(x, torch.randn(4, 3, 8))
    with pytest.raises(ValueError, match=r"`mode` must be one of"):
        conv_pair_to_datapoints(x, x, mode="bilinear")


def test_conv_to_datapoints_errors():
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(ValueError, match=r"`x` must be convolutional activations of shape \(N, C, H, W\)"):
        conv_to_datapoints(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"`size` must be an int >= 1 or a pair"):
        conv_to_datapoints(x, size=0)
    with pytest.raises(ValueError, match=r"`size`"):
        conv_to_datapoints(x, size=(2,))
    with pytest.raises(ValueError, match=r"`resize` must be one of"):
        conv_to_datapoints(x, size=2, resize="nearest")
    with pytest.raises(ValueError, match=r"`max_datapoints` must be None or an int >= 1"):
        conv_to_datapoints(x, max_datapoints=0)
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        conv_to_datapoints(torch.full((2, 1, 2, 2), float("nan")))


# --------------------------------------------------------------------------- DFT-CCA


@pytest.mark.parametrize("h,w", [(4, 4), (3, 5), (2, 6)])
def test_dft_cca_equals_flat_cca_on_a_translation_invariant_dataset(h, w):
    """The paper's Theorem 1: with every image under all its circular shifts, the union of the
    per-frequency coefficients is the CCA with every (channel, position) a neuron."""
    x, y = translation_pair(h=h, w=w)
    xa, ya = all_circular_shifts(x, y)
    m = xa.shape[0]
    flat = textbook_cca(xa.reshape(m, -1), ya.reshape(m, -1))
    res = dft_cca(xa, ya)
    assert res.coefficients.shape == (2 * h * w,) == flat.shape
    np.testing.assert_allclose(res.coefficients.numpy(), flat, atol=1e-6)
    assert res.mean == pytest.approx(flat.mean(), abs=1e-7)
    lib = cca(xa.reshape(m, -1), ya.reshape(m, -1)).coefficients  # the library's flat CCA agrees
    np.testing.assert_allclose(lib.numpy(), flat, atol=1e-6)
    # centering="dc" on the un-augmented images gives the same, without the H*W copies.
    dc = dft_cca(x, y, centering="dc")
    np.testing.assert_allclose(dc.coefficients.numpy(), flat, atol=1e-6)


def test_dft_cca_theorem_needs_translation_invariance():
    # y mixes positions with a dense (not shift-equivariant) map: no block-diagonal structure.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 3, 4, 4))
    y = (x.reshape(200, -1) @ rng.standard_normal((48, 32))).reshape(200, 2, 4, 4)
    y += 0.5 * rng.standard_normal(y.shape)
    flat = textbook_cca(x.reshape(200, -1), y.reshape(200, -1))
    union = dft_cca(x, y).coefficients.numpy()
    assert union.shape == flat.shape
    assert flat.mean() - union.mean() > 0.1


def test_dft_cca_per_frequency_is_conjugate_symmetric_and_makes_the_union():
    x, y = translation_pair(b=60, h=4, w=6)
    res = dft_cca(x, y, return_per_frequency=True)
    per = res.per_frequency
    assert per.shape == (4, 6, 2)
    fh, fw = res.frequencies
    assert fh.tolist() == [0, 1, -2, -1] and fw.tolist() == [0, 1, 2, -3, -2, -1]
    neg_h, neg_w = (-torch.arange(4)) % 4, (-torch.arange(6)) % 6
    torch.testing.assert_close(per, per[neg_h][:, neg_w])  # f and -f agree
    union = per.flatten()[~per.flatten().isnan()].sort(descending=True).values
    torch.testing.assert_close(union, res.coefficients)
    # Every frequency solved directly (full complex DFT, no mirroring) agrees.
    for i in range(4):
        for j in range(6):
            xf = np.fft.fft2(x - x.mean(0))[:, :, i, j]
            yf = np.fft.fft2(y - y.mean(0))[:, :, i, j]
            qa, qb = np.linalg.qr(xf)[0], np.linalg.qr(yf)[0]
            direct = np.linalg.svd(qa.conj().T @ qb, compute_uv=False)
            np.testing.assert_allclose(per[i, j].numpy(), direct, atol=1e-8)


def test_dft_cca_is_invariant_to_joint_shifts_and_channel_mixing():
    x, y = translation_pair(b=60, h=4, w=5)
    base = dft_cca(x, y).coefficients
    shifted = dft_cca(np.roll(x, (1, 3), axis=(2, 3)), np.roll(y, (1, 3), axis=(2, 3))).coefficients
    torch.testing.assert_close(shifted, base)
    mix = np.random.default_rng(3).standard_normal((3, 3)) + 3 * np.eye(3)  # invertible
    mixed = dft_cca(np.einsum("dc,nchw->ndhw", mix, x), y).coefficients
    torch.testing.assert_close(mixed, base)


def test_dft_cca_on_one_by_one_maps_is_plain_cca():
    x, y = torch.randn(80, 4, 1, 1, dtype=torch.float64), torch.randn(80, 3, 1, 1, dtype=torch.float64)
    y = y + x[:, :3]
    torch.testing.assert_close(dft_cca(x, y).coefficients, cca(x.flatten(1), y.flatten(1)).coefficients)


def test_dft_cca_of_a_layer_with_itself_is_one():
    x = torch.randn(60, 3, 5, 4)
    for dtype in (None, torch.float32):
        res = dft_cca(x, x, dtype=dtype)
        assert res.coefficients.shape == (3 * 5 * 4,)
        torch.testing.assert_close(res.coefficients, torch.ones_like(res.coefficients), atol=1e-5, rtol=0)
        assert res.mean == pytest.approx(1.0, abs=1e-5)


def test_dft_cca_rank_deficient_channels_are_dropped():
    x = torch.randn(50, 3, 4, 4, dtype=torch.float64)
    dup = torch.cat([x, x[:, :1], torch.zeros(50, 1, 4, 4, dtype=torch.float64)], dim=1)
    res = dft_cca(dup, x, return_per_frequency=True)
    assert res.coefficients.shape == (3 * 16,)
    torch.testing.assert_close(res.coefficients, torch.ones(48, dtype=torch.float64))
    assert res.per_frequency.shape == (4, 4, 3)


def test_dft_cca_mismatched_sizes_compare_shared_low_frequencies():
    # Signals band-limited to |u|, |v| <= 1 cycle per map; y is x sampled every other pixel,
    # so both maps carry the same content at those frequencies.
    rng = np.random.default_rng(1)
    n, c, size = 50, 3, 8
    i = np.arange(size)
    x = np.zeros((n, c, size, size))
    for u in (0, 1):
        for v in (-1, 0, 1):
            phase = 2 * np.pi * (u * i[:, None] + v * i[None, :]) / size
            a, b = rng.standard_normal((2, n, c, 1, 1))
            x += a * np.cos(phase) + b * np.sin(phase)
    y = x[:, :, ::2, ::2]
    res = dft_cca(x, y, return_per_frequency=True)
    assert res.per_frequency.shape == (3, 3, c)  # even l=4: |u| <= 1, Nyquist dropped
    assert res.frequencies[0].tolist() == [0, 1, -1]
    assert res.coefficients.shape == (9 * c,)
    np.testing.assert_allclose(res.coefficients.numpy(), 1.0, atol=1e-6)
    unrelated = dft_cca(x, rng.standard_normal((n, c, 4, 4)))
    assert unrelated.mean < 0.6


def test_dft_cca_errors():
    x = torch.randn(10, 3, 4, 4)
    with pytest.raises(ValueError, match=r"`y` must be convolutional activations"):
        dft_cca(x, torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"`x` has 10 datapoints and `y` has 9"):
        dft_cca(x, torch.randn(9, 3, 4, 4))
    for bad in (torch.complex64, torch.float16):
        with pytest.raises(ValueError, match=r"`dtype` must be torch.float32 or torch.float64"):
            dft_cca(x, x, dtype=bad)
    with pytest.raises(ValueError, match=r"`centering` must be one of"):
        dft_cca(x, x, centering="none")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensors_stay_on_their_device():
    x = torch.randn(20, 3, 4, 4, device="cuda")
    assert conv_to_datapoints(x, max_datapoints=7).device == x.device
    assert all(t.device == x.device for t in conv_pair_to_datapoints(x, x[:, :, :2, :2], max_datapoints=9))
    res = dft_cca(x, x, return_per_frequency=True)
    assert res.coefficients.device == x.device and res.per_frequency.device == x.device
    cpu = dft_cca(x.cpu(), x.cpu())
    torch.testing.assert_close(res.coefficients.cpu(), cpu.coefficients)


@pytest.mark.parametrize("rtol", [0, 1, -0.5, 2.0, float("nan"), True])
def test_dft_cca_rtol_outside_the_unit_interval_is_an_error(rtol):
    x = torch.randn(10, 3, 4, 4)
    with pytest.raises(ValueError, match=r"`rtol` must be a number in \(0, 1\)"):
        dft_cca(x, x, rtol=rtol)
