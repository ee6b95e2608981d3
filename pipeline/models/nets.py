"""The architectures: an MLP and a small CNN for digits, and the DMM-line ResNet-9 (algorithms.md 1.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.stacked import StackedModel
from pipeline.models.layers import (
    StackedBatchNorm2d, StackedConv2d, StackedLinear, to_channels,
)


class MLP(StackedModel):
    """flatten -> Linear(in, h) -> ReLU -> Linear(h, h) -> ReLU -> [features] -> Linear(h, classes)."""

    def __init__(self, gens, in_shape, classes: int, hidden: int):
        super().__init__()
        d_in = math.prod(in_shape)
        self.fc1 = StackedLinear(gens, d_in, hidden, relu=True)
        self.fc2 = StackedLinear(gens, hidden, hidden, relu=True)
        self.fc = StackedLinear(gens, hidden, classes)

    def stacked_features(self, x):
        return self.fc2(self.fc1(x.flatten(2)))

    def stacked_head(self, z):
        return self.fc(z)


class ConvBN(nn.Module):
    def __init__(self, gens, c_in, c_out, k=3, stride=1, padding=None):
        super().__init__()
        self.conv = StackedConv2d(gens, c_in, c_out, k, stride, padding)
        self.bn = StackedBatchNorm2d(len(gens), c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class CNN(StackedModel):
    """conv_bn(C, h) -> conv_bn(h, 2h, stride 2) -> global max pool -> [features] -> Linear(2h, classes)."""

    def __init__(self, gens, in_shape, classes: int, hidden: int):
        super().__init__()
        self.block1 = ConvBN(gens, in_shape[0], hidden)
        self.block2 = ConvBN(gens, hidden, 2 * hidden, stride=2)
        self.fc = StackedLinear(gens, 2 * hidden, classes)

    def stacked_features(self, x):
        m = x.shape[0]
        h = self.block2(self.block1(to_channels(x)))
        return F.adaptive_max_pool2d(h, 1).view(h.shape[0], m, -1).transpose(0, 1)

    def stacked_head(self, z):
        return self.fc(z)


class Residual(nn.Module):
    def __init__(self, gens, c):
        super().__init__()
        self.a, self.b = ConvBN(gens, c, c), ConvBN(gens, c, c)

    def forward(self, x):
        return x + self.b(self.a(x))


class ResNet9(StackedModel):
    """conv_bn(3,w) -> conv_bn(w,2w,k5,s2,p2) -> Res(2w) -> conv_bn(2w,4w) -> maxpool2 -> Res(4w)
    -> conv_bn(4w,2w,k3,p0) -> global max pool -> [features] -> Linear(2w, classes, no bias) * 0.2.
    w = 64 gives the DMM-line ResNet-9."""

    def __init__(self, gens, in_shape, classes: int, width: int = 64):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            ConvBN(gens, in_shape[0], w),
            ConvBN(gens, w, 2 * w, k=5, stride=2, padding=2),
            Residual(gens, 2 * w),
            ConvBN(gens, 2 * w, 4 * w),
            nn.MaxPool2d(2),
            Residual(gens, 4 * w),
            ConvBN(gens, 4 * w, 2 * w, padding=0),
        )
        self.fc = StackedLinear(gens, 2 * w, classes, bias=False)

    def stacked_features(self, x):
        m = x.shape[0]
        h = self.body(to_channels(x).contiguous(memory_format=torch.channels_last))
        return F.adaptive_max_pool2d(h, 1).view(h.shape[0], m, -1).transpose(0, 1)

    def stacked_head(self, z):
        return 0.2 * self.fc(z)
