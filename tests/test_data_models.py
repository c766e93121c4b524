"""Digits / CIFAR-10 loaders and the ConvNet / ResNet models."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from svcca_torch.data import load_cifar10, load_digits_dataset, probe_set
from svcca_torch.models import BasicBlock, ConvBNReLU, ConvNet, ResNet, resnet18_cifar, resnet_small


@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_shapes_and_normalisation(size):
    train, test = load_digits_dataset(size=size)
    x, y = train.tensors
    assert x.shape[1:] == (1, size, size) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert len(train) + len(test) == 1797
    assert len(test) == pytest.approx(0.25 * 1797, abs=1)
    assert abs(float(x.mean())) < 1e-4 and float(x.std()) == pytest.approx(1.0, abs=1e-3)
    # stratified: every class appears in both splits in roughly the same proportion
    counts_train = torch.bincount(y, minlength=10).float() / len(y)
    counts_test = torch.bincount(test.tensors[1], minlength=10).float() / len(test)
    assert torch.allclose(counts_train, counts_test, atol=0.01)


def test_digits_split_is_deterministic_and_seeded():
    a, _ = load_digits_dataset(seed=3)
    b, _ = load_digits_dataset(seed=3)
    c, _ = load_digits_dataset(seed=4)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[1], c.tensors[1])


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        load_digits_dataset(size=12)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_dataset(test_fraction=1.5)


def test_probe_set_fixed_ordered_subset():
    train, _ = load_digits_dataset()
    p1, l1 = probe_set(train, 100, seed=1, return_labels=True)
    p2 = probe_set(train, 100, seed=1)
    assert p1.shape == (100, 1, 8, 8) and l1.shape == (100,)
    assert torch.equal(p1, p2)
    assert not torch.equal(p1, probe_set(train, 100, seed=2))
    # the rows are real, distinct items of the dataset, in dataset order
    x = train.tensors[0].flatten(1)
    rows = [int((x == r).all(1).nonzero()[0]) for r in p1.flatten(1)]
    assert rows == sorted(rows) and len(set(rows)) == 100
    assert torch.equal(train.tensors[1][rows], l1)
    with pytest.raises(ValueError, match="`n`"):
        probe_set(train, len(train) + 1)


def test_probe_set_generic_dataset_matches_tensor_dataset():
    train, _ = load_digits_dataset()

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            return train[i]

    assert torch.equal(probe_set(Items(), 50, seed=0), probe_set(train, 50, seed=0))


def test_cifar_missing_data_says_where(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_cifar10(tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "download=True" in msg and "cifar-10-batches-py" in msg


def test_convnet_structure_and_shapes():
    model = ConvNet(image_size=8)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    names = dict(model.named_modules())
    for layer in model.layer_names:
        assert layer in names
    assert isinstance(names["features.block1"], ConvBNReLU)
    assert isinstance(names["features.block1.conv"], nn.Conv2d)
    assert isinstance(names["features.block1.bn"], nn.BatchNorm2d)
    assert model.layer_names[-1] == "fc" and model.layer_names[0] == "features.block1"
    # 8x8 input, depth 4, pool every 2: one pool (after block 2), widths 16, 16, 32, 32
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 1
    assert names["features.block4.conv"].out_channels == 32
    big = ConvNet(in_channels=3, image_size=32, depth=6, width=8)
    assert big(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert ConvNet(hidden=0).layer_names[-2:] == ["features.block4", "fc"]


def test_resnet_structure_and_shapes():
    model = resnet_small()
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 10)
    names = dict(model.named_modules())
    assert model.layer_names == ["stem"] + [f"layer{s}.{i}" for s in (1, 2, 3) for i in (0, 1)] + ["fc"]
    assert isinstance(names["layer2.0"], BasicBlock)
    assert isinstance(names["layer2.0.shortcut.conv"], nn.Conv2d)  # downsampling shortcut
    assert isinstance(names["layer1.0.shortcut"], nn.Identity)
    r18 = resnet18_cifar()
    assert sum(p.numel() for p in r18.parameters()) == pytest.approx(11.17e6, rel=0.01)
    assert r18(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="blocks"):
        ResNet(blocks=(1, 1), widths=(8,))


@pytest.mark.parametrize("make", [lambda: ConvNet(), lambda: ResNet(in_channels=1)])
def test_a_few_training_steps_reduce_the_loss(make):
    torch.manual_seed(0)
    train, _ = load_digits_dataset()
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    x_all, y_all = train.tensors

    def full_loss():
        model.eval()
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(x_all), y_all))

    before = full_loss()
    model.train()
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = full_loss()
    assert after < 0.5 * before
