"""Data sets for the experiments and tests: scikit-learn's digits (offline) and CIFAR-10.

Images are ``(N, C, H, W)`` float32 tensors (batch-first), labels int64. Everything here is
plain PyTorch (``TensorDataset`` / torchvision datasets, wrap them in a ``DataLoader``).

The probe set of an SVCCA run must be the *same datapoints in the same order* at every
capture; :func:`probe_set` returns such a fixed, ordered subset.
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .utils.validation import check_choice, check_fraction, check_positive_int

__all__ = [
    "DIGITS_SIZES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "load_digits_dataset",
    "probe_set",
    "load_cifar10",
]

#: Image sizes :func:`load_digits_dataset` can produce (8 is the native size).
DIGITS_SIZES = (8, 16, 32)
#: Per-channel mean and standard deviation of the CIFAR-10 training images.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def load_digits_dataset(
    test_fraction: float = 0.25, seed: int = 0, size: int = 8
) -> Tuple[TensorDataset, TensorDataset]:
    """scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes) as tensors.

    The split is stratified by class and fixed by ``seed``. Pixels are standardised with the
    training split's mean and standard deviation (one scalar each, so the test split sees no
    leakage). With ``size`` 16 or 32 the images are upsampled (bilinear), which gives
    ResNet-style networks room for their strided stages.

    Args:
        test_fraction: fraction of the images held out for the test split, in (0, 1).
        seed: seed of the stratified split.
        size: image side in pixels, one of 8, 16, 32.

    Returns:
        ``(train, test)`` ``TensorDataset``s of images ``(N, 1, size, size)`` float32 and
        labels ``(N,)`` int64.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    test_fraction = check_fraction(test_fraction, "test_fraction")
    check_choice(size, "size", DIGITS_SIZES)
    digits = load_digits()
    images = digits.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    labels = digits.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    # Sorted indices keep the original order within each split, so the split is a pure
    # function of (test_fraction, seed).
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    x = torch.from_numpy(images)[:, None]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    x_train = ((x_train - mean) / std).contiguous()
    x_test = ((x_test - mean) / std).contiguous()
    y = torch.from_numpy(labels)
    return TensorDataset(x_train, y[idx_train]), TensorDataset(x_test, y[idx_test])


def probe_set(
    dataset: Dataset, n: int, seed: int = 0, *, return_labels: bool = False
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """A fixed, ordered subset of ``dataset``'s inputs: the same datapoints every call.

    ``n`` distinct items are drawn with a ``seed``-ed generator and kept in dataset order,
    then stacked. Use it as the probe of :class:`~svcca_torch.ActivationRecorder` or of the
    Lightning callback: SVCCA compares activations datapoint by datapoint, so every capture
    must see the same inputs in the same order.

    Args:
        dataset: a map-style dataset whose items are ``(input, label, ...)`` or ``input``.
        n: number of datapoints, at most ``len(dataset)``.
        seed: seed of the draw.
        return_labels: also return the labels (the item's second element).

    Returns:
        inputs ``(n, ...)`` (e.g. ``(n, C, H, W)`` images), and with ``return_labels`` an
        int64 tensor ``(n,)`` of labels as well.
    """
    n = check_positive_int(n, "n")
    size = len(dataset)  # type: ignore[arg-type]
    if n > size:
        raise ValueError(f"`n` is {n} but the dataset has only {size} items; pass n <= {size}.")
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(size, generator=gen)[:n].sort().values
    if isinstance(dataset, TensorDataset):
        xs = dataset.tensors[0][idx].clone()
        ys = dataset.tensors[1][idx].clone() if len(dataset.tensors) > 1 else None
    else:
        items = [dataset[int(i)] for i in idx]
        if isinstance(items[0], (tuple, list)):
            xs = torch.stack([torch.as_tensor(it[0]) for it in items])
            ys = torch.as_tensor([int(it[1]) for it in items]) if len(items[0]) > 1 else None
        else:
            xs, ys = torch.stack([torch.as_tensor(it) for it in items]), None
    if not return_labels:
        return xs
    if ys is None:
        raise ValueError("`return_labels=True` but the dataset's items carry no label.")
    return xs, ys.long()


def load_cifar10(
    data_dir: Union[str, Path], download: bool = False, train: bool = True, augment: bool = False
) -> Dataset:
    """The torchvision CIFAR-10 data set with the standard per-channel normalisation.

    Items are ``(image (3, 32, 32) float32, label int)``. With ``augment`` (training only)
    images are randomly cropped (4-pixel padding) and flipped, as usual for CIFAR ResNets.

    Raises:
        FileNotFoundError: the data set is not in ``data_dir`` and ``download`` is False;
            the message says where to put it.
    """
    import torchvision
    from torchvision import transforms

    root = Path(data_dir).expanduser()
    folder = root / "cifar-10-batches-py"
    if not download and not folder.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 not found in {root}: expected the extracted folder {folder} "
            "(from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz). "
            f"Extract the archive into {root}, or pass download=True (--download) to fetch it."
        )
    steps = [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    if augment and train:
        steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] + steps
    try:
        return torchvision.datasets.CIFAR10(
            root=str(root), train=train, download=download, transform=transforms.Compose(steps)
        )
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"CIFAR-10 in {root} is missing or damaged ({err}). Delete {folder} and extract "
            "cifar-10-python.tar.gz there again, or pass download=True (--download)."
        ) from err
