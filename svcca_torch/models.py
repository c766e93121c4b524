"""The paper's two network families, sized for CPU experiments: a plain ConvNet with
BatchNorm, and a CIFAR-style ResNet.

Inputs are images ``(N, C, H, W)``; outputs are logits ``(N, num_classes)``.

Module names are chosen so that layers can be selected by name and freeze groups are
obvious: every convolution lives with its BatchNorm and ReLU in one small block
(``features.block1 = (conv, bn, relu)``, ``stem = (conv, bn, relu)``), residual blocks are
``layer<stage>.<index>``, and the output layer is always ``fc``. ``model.layer_names`` lists
the natural representation layers (block outputs and linear layers), bottom-up.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence

import torch
from torch import nn

from .utils.validation import check_positive_int

__all__ = ["ConvBNReLU", "ConvNet", "BasicBlock", "ResNet", "resnet18_cifar", "resnet_small"]


class ConvBNReLU(nn.Sequential):
    """``conv -> bn -> relu`` as one module (children named ``conv``, ``bn``, ``relu``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                bn=nn.BatchNorm2d(out_channels),
                relu=nn.ReLU(),
            )
        )


class ConvNet(nn.Module):
    """Plain ConvNet with BatchNorm (the paper's CIFAR-10 ConvNet family).

    ``depth`` blocks ``features.block<i> = conv3x3 -> BatchNorm -> ReLU``; after every
    ``pool_every`` blocks a 2x2 max-pool (``features.pool<i>``) halves the map and the width
    doubles, as long as the map stays at least 2x2. Then average pooling to a grid of at
    most 4x4 (``image_size`` sets its side), flattening, a hidden linear layer ``fc1`` (+ReLU, skipped when ``hidden == 0``) and the output layer ``fc``.

    Args:
        in_channels: image channels (1 for digits, 3 for CIFAR-10).
        num_classes: number of output logits.
        width: channels of the first block.
        depth: number of conv blocks.
        image_size: input side in pixels; decides how many pools fit.
        pool_every: blocks between pools.
        hidden: width of the hidden linear layer (0: none).

    The defaults train an epoch of 8x8 digits in about a second on one CPU thread.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        depth: int = 4,
        image_size: int = 8,
        pool_every: int = 2,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width),
                            ("depth", depth), ("image_size", image_size), ("pool_every", pool_every)):
            check_positive_int(value, name)
        check_positive_int(hidden, "hidden", minimum=0)
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        channels, side, n_pools = in_channels, image_size, 0
        out = width
        self._blocks: List[str] = []
        for i in range(1, depth + 1):
            layers[f"block{i}"] = ConvBNReLU(channels, out)
            self._blocks.append(f"features.block{i}")
            channels = out
            if i % pool_every == 0 and i < depth and side >= 4:
                n_pools += 1
                layers[f"pool{n_pools}"] = nn.MaxPool2d(2)
                side //= 2
                out = channels * 2
        self.features = nn.Sequential(layers)
        # Keep a small spatial grid (not global pooling): digit identity lives in the layout.
        grid = min(side, 4)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.flatten = nn.Flatten()
        channels = channels * grid * grid
        if hidden:
            self.fc1 = nn.Linear(channels, hidden)
            self.relu_fc1 = nn.ReLU()
            channels = hidden
        else:
            self.fc1 = None
            self.relu_fc1 = None
        self.fc = nn.Linear(channels, num_classes)

    @property
    def layer_names(self) -> List[str]:
        """Representation layers, bottom-up: each conv block's output, ``fc1``, ``fc``."""
        return self._blocks + (["fc1"] if self.fc1 is not None else []) + ["fc"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, C, H, W)``."""
        x = self.flatten(self.pool(self.features(x)))
        if self.fc1 is not None:
            x = self.relu_fc1(self.fc1(x))
        return self.fc(x)


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 conv-BN pairs and a shortcut, then ReLU.

    Children: ``conv1, bn1, relu1, conv2, bn2, shortcut`` (identity, or a 1x1 conv + BN
    named ``shortcut.conv``/``shortcut.bn`` when the shape changes) and ``relu`` (output).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                    bn=nn.BatchNorm2d(out_channels),
                )
            )
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: a 3x3 ``stem`` (conv, bn, relu), stages ``layer1..layerS`` of
    :class:`BasicBlock` (each stage after the first halves the map), global average
    pooling and the output layer ``fc``.

    Args:
        blocks: number of blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        widths: channels per stage, same length as ``blocks``.
        in_channels: image channels.
        num_classes: number of output logits.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (1, 1, 1),
        widths: Sequence[int] = (16, 32, 64),
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        blocks, widths = list(blocks), list(widths)
        if not blocks or len(blocks) != len(widths):
            raise ValueError(
                f"`blocks` and `widths` must be non-empty and of equal length (one entry per stage), "
                f"got {len(blocks)} and {len(widths)}."
            )
        for b in blocks:
            check_positive_int(b, "blocks[i]")
        for w in widths:
            check_positive_int(w, "widths[i]")
        check_positive_int(in_channels, "in_channels")
        check_positive_int(num_classes, "num_classes")
        self.stem = ConvBNReLU(in_channels, widths[0])
        self._layer_names = ["stem"]
        channels = widths[0]
        for s, (n_blocks, width) in enumerate(zip(blocks, widths), start=1):
            stage = nn.Sequential(
                *[BasicBlock(channels if i == 0 else width, width, stride=2 if (i == 0 and s > 1) else 1)
                  for i in range(n_blocks)]
            )
            self.add_module(f"layer{s}", stage)
            self._layer_names += [f"layer{s}.{i}" for i in range(n_blocks)]
            channels = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        self._n_stages = len(blocks)
        self._layer_names.append("fc")

    @property
    def layer_names(self) -> List[str]:
        """Representation layers, bottom-up: ``stem``, every residual block, ``fc``."""
        return list(self._layer_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, C, H, W)``."""
        x = self.stem(x)
        for s in range(1, self._n_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(self.flatten(self.pool(x)))


def resnet18_cifar(in_channels: int = 3, num_classes: int = 10) -> ResNet:
    """ResNet-18 widths and depths (2, 2, 2, 2 blocks of 64..512 channels) for 32x32 images."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), in_channels=in_channels, num_classes=num_classes)


def resnet_small(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> ResNet:
    """A small ResNet (2 blocks in each of 3 stages, ``width``..4x``width`` channels), the
    CPU-sized stand-in for the paper's CIFAR ResNet."""
    return ResNet((2, 2, 2), (width, 2 * width, 4 * width), in_channels=in_channels, num_classes=num_classes)
