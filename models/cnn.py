"""Small, deterministic PyTorch CNNs that exercise the structures graphprune must handle.

Every builder seeds torch, builds the network, randomises BatchNorm statistics and
affine parameters (so BN is never an identity) and returns the module in eval mode.
Each network has well under 1M parameters and runs on a 1x3x32x32 input
(``INPUT_SHAPES`` gives the shape per model).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = [
    "CNN_MODELS",
    "INPUT_SHAPES",
    "randomize_batchnorm",
    "resnet_basic",
    "resnet_bottleneck",
    "mobilenet_v2",
    "mobilenet_v3",
    "densenet",
    "shufflenet",
    "group_conv",
    "flatten_head",
]

DEFAULT_SEED = 0
NUM_CLASSES = 10


# --------------------------------------------------------------------------- helpers


def randomize_batchnorm(module: nn.Module, seed: int = DEFAULT_SEED) -> nn.Module:
    """Give every BatchNorm non-trivial running stats and affine params (in place)."""
    gen = torch.Generator().manual_seed(seed + 1)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features

            def uniform(lo: float, hi: float) -> torch.Tensor:
                return torch.rand(n, generator=gen) * (hi - lo) + lo

            with torch.no_grad():
                m.running_mean.copy_(uniform(-0.5, 0.5))
                m.running_var.copy_(uniform(0.5, 2.0))
                if m.affine:
                    m.weight.copy_(uniform(0.5, 1.5))
                    m.bias.copy_(uniform(-0.3, 0.3))
    return module


def _finish(model: nn.Module, seed: int) -> nn.Module:
    randomize_batchnorm(model, seed)
    return model.eval()


def conv_bn(
    cin: int,
    cout: int,
    k: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BatchNorm -> optional activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def _head(cin: int, num_classes: int = NUM_CLASSES) -> nn.Sequential:
    """Global average pool -> Flatten -> Linear."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """ResNet basic block: 3x3-3x3 with identity or 1x1-conv (strided) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, 1, act=None)
        self.downsample: nn.Module = (
            conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.downsample(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck block: 1x1-3x3-1x1 with expansion 4."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = conv_bn(cin, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride)
        self.conv3 = conv_bn(width, cout, 1, act=None)
        self.downsample: nn.Module = (
            conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + self.downsample(x))


def resnet_basic(seed: int = DEFAULT_SEED) -> nn.Module:
    """ResNet with basic blocks; two stages use a strided 1x1-conv shortcut."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        conv_bn(3, 16, 3),
        BasicBlock(16, 16),
        BasicBlock(16, 32, stride=2),
        BasicBlock(32, 32),
        BasicBlock(32, 64, stride=2),
        _head(64),
    )
    return _finish(model, seed)


def resnet_bottleneck(seed: int = DEFAULT_SEED) -> nn.Module:
    """ResNet with bottleneck blocks (expansion 4)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        conv_bn(3, 16, 3),
        Bottleneck(16, 8),  # 16 -> 32, 1x1 shortcut (channel change)
        Bottleneck(32, 8),  # identity shortcut
        Bottleneck(32, 16, stride=2),  # 32 -> 64, strided shortcut
        Bottleneck(64, 16),
        _head(64),
    )
    return _finish(model, seed)


# --------------------------------------------------------------------------- MobileNet


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1 -> depthwise 3x3 -> project 1x1 (+ residual)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1, act=nn.ReLU6))
        layers += [
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            conv_bn(hidden, cout, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


def mobilenet_v2(seed: int = DEFAULT_SEED) -> nn.Module:
    """MobileNetV2-style network with ReLU6 and inverted residuals."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        conv_bn(3, 16, 3, 2, act=nn.ReLU6),
        InvertedResidual(16, 16, 1, 1),  # no expansion, residual
        InvertedResidual(16, 24, 2, 4),
        InvertedResidual(24, 24, 1, 4),  # residual
        InvertedResidual(24, 32, 2, 4),
        InvertedResidual(32, 32, 1, 4),  # residual
        conv_bn(32, 128, 1, act=nn.ReLU6),
        _head(128),
    )
    return _finish(model, seed)


class SqueezeExcite(nn.Module):
    """AdaptiveAvgPool -> 1x1 conv -> ReLU -> 1x1 conv -> Hardsigmoid -> multiply."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class MBConvV3(nn.Module):
    """MobileNetV3 block: expand 1x1 -> depthwise -> optional SE -> project 1x1 (+ residual)."""

    def __init__(
        self,
        cin: int,
        hidden: int,
        cout: int,
        k: int,
        stride: int,
        use_se: bool,
        act: type[nn.Module],
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if hidden != cin:
            layers.append(conv_bn(cin, hidden, 1, act=act))
        layers.append(conv_bn(hidden, hidden, k, stride, groups=hidden, act=act))
        if use_se:
            layers.append(SqueezeExcite(hidden, max(8, hidden // 4)))
        layers.append(conv_bn(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


def mobilenet_v3(seed: int = DEFAULT_SEED) -> nn.Module:
    """MobileNetV3-style network: hard-swish, depthwise convs and squeeze-excitation."""
    torch.manual_seed(seed)
    hs, relu = nn.Hardswish, nn.ReLU
    model = nn.Sequential(
        conv_bn(3, 16, 3, 2, act=hs),
        MBConvV3(16, 16, 16, 3, 1, True, relu),  # no expansion, SE, residual
        MBConvV3(16, 64, 24, 3, 2, False, relu),
        MBConvV3(24, 72, 24, 3, 1, False, relu),  # residual
        MBConvV3(24, 96, 40, 5, 2, True, hs),
        MBConvV3(40, 120, 40, 5, 1, True, hs),  # SE + residual
        conv_bn(40, 160, 1, act=hs),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(160, 256),
        nn.Hardswish(),
        nn.Linear(256, NUM_CLASSES),
    )
    return _finish(model, seed)


# --------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv-BN-ReLU-3x3 conv producing ``growth`` new channels."""

    def __init__(self, cin: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, bn_size * growth, 1, bias=False),
            nn.BatchNorm2d(bn_size * growth),
            nn.ReLU(),
            nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DenseBlock(nn.Module):
    """Each layer sees the concat of the block input and all previous layer outputs."""

    def __init__(self, cin: int, num_layers: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth) for i in range(num_layers))
        self.out_channels = cin + num_layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return torch.cat(features, dim=1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv-2x2 average pool."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.AvgPool2d(2, 2),
        )


def densenet(seed: int = DEFAULT_SEED) -> nn.Module:
    """DenseNet-style network: two dense blocks joined by a transition layer."""
    torch.manual_seed(seed)
    growth = 12
    block1 = DenseBlock(24, 3, growth)  # 24 -> 60
    block2 = DenseBlock(30, 3, growth)  # 30 -> 66
    model = nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1, bias=False),
        block1,
        Transition(block1.out_channels, 30),
        block2,
        nn.BatchNorm2d(block2.out_channels),
        nn.ReLU(),
        _head(block2.out_channels),
    )
    return _finish(model, seed)


# --------------------------------------------------------------------------- ShuffleNet


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle: view -> transpose -> view."""
    n, c, h, w = x.shape
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: channel split (stride 1) or two-branch downsample (stride 2)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride == 1:
            assert cin == cout
            self.branch1: nn.Module = nn.Identity()
            b2_in = cin // 2
        else:
            self.branch1 = nn.Sequential(
                conv_bn(cin, cin, 3, stride, groups=cin, act=None),
                conv_bn(cin, branch, 1),
            )
            b2_in = cin
        self.branch2 = nn.Sequential(
            conv_bn(b2_in, branch, 1),
            conv_bn(branch, branch, 3, stride, groups=branch, act=None),
            conv_bn(branch, branch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


def shufflenet(seed: int = DEFAULT_SEED) -> nn.Module:
    """ShuffleNetV2-style network with chunk-based channel split and channel shuffle."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        conv_bn(3, 24, 3, 2),
        ShuffleUnit(24, 48, 2),
        ShuffleUnit(48, 48, 1),
        ShuffleUnit(48, 96, 2),
        ShuffleUnit(96, 96, 1),
        conv_bn(96, 128, 1),
        _head(128),
    )
    return _finish(model, seed)


# --------------------------------------------------------------------------- grouped conv


class ResNeXtBlock(nn.Module):
    """1x1 reduce -> 3x3 grouped conv (groups=4) -> 1x1 expand, plus shortcut."""

    def __init__(self, cin: int, width: int, cout: int, stride: int = 1, groups: int = 4) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride, groups=groups)
        self.conv3 = conv_bn(width, cout, 1, act=None)
        self.shortcut: nn.Module = (
            conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


def group_conv(seed: int = DEFAULT_SEED) -> nn.Module:
    """ResNeXt-ish network: grouped 3x3 convs (groups=4, not depthwise) between pointwise convs."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        conv_bn(3, 32, 3),
        ResNeXtBlock(32, 32, 64),
        ResNeXtBlock(64, 32, 64),
        ResNeXtBlock(64, 64, 128, stride=2),
        _head(128),
    )
    return _finish(model, seed)


# --------------------------------------------------------------------------- flatten head


def flatten_head(seed: int = DEFAULT_SEED) -> nn.Module:
    """Convs down to a 32x4x4 map, Flatten (channel-major blocks of 16) -> Linear -> Linear."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        conv_bn(3, 16, 3),
        nn.MaxPool2d(2),  # 16x16
        conv_bn(16, 32, 3),
        nn.MaxPool2d(2),  # 8x8
        conv_bn(32, 32, 3, stride=2),  # 4x4
        nn.Flatten(),  # 32 * 4 * 4 = 512
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, NUM_CLASSES),
    )
    return _finish(model, seed)


# --------------------------------------------------------------------------- registry

CNN_MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3": mobilenet_v3,
    "densenet": densenet,
    "shufflenet": shufflenet,
    "group_conv": group_conv,
    "flatten_head": flatten_head,
}

INPUT_SHAPES: dict[str, tuple[int, ...]] = {name: (1, 3, 32, 32) for name in CNN_MODELS}
