"""Models: the paper's VGG-11 (± BatchNorm, optional dropout) and MLP (dropout p), a small CNN and a small ResNet."""
from __future__ import annotations

import math

import torch
from torch import nn

VGG11_CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]  # config "A"


def _he_init_convs(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VGG(nn.Module):
    """VGG-11 (config A) with classifier 512-512-512-10, He-normal convolutions, zero biases.

    ``width`` scales the channel counts (1.0 = the paper's). Pooling stops once the map is 1x1, so
    small inputs (28x28, 8x8) work too.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, batch_norm: bool = False,
                 dropout: float = 0.0, width: float = 1.0, input_size: int = 32, cfg=None):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, input_size
        for v in cfg or VGG11_CFG:
            if v == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            out = max(1, int(round(v * width)))
            layers.append(nn.Conv2d(c, out, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            c = out
        self.features = nn.Sequential(*layers)
        feat = c * size * size
        hid = max(1, int(round(512 * width)))
        cls: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate([(feat, hid), (hid, hid)]):
            cls += [nn.Linear(a, b), nn.ReLU(inplace=True)]
            if dropout > 0:
                cls.append(nn.Dropout(dropout))
        cls.append(nn.Linear(hid, num_classes))
        self.classifier = nn.Sequential(*cls)
        _he_init_convs(self)

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """in-hidden-...-out MLP with ReLU and Dropout(p) after each hidden layer (the paper's 784-256-256-10)."""

    def __init__(self, in_features: int, num_classes: int = 10, hidden=(256, 256), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        a = in_features
        for h in hidden:
            layers += [nn.Linear(a, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            a = h
        layers.append(nn.Linear(a, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    """Two or three conv blocks (conv-[BN]-ReLU-[pool]) + linear head; 1-D inputs (C, L) use Conv1d."""

    def __init__(self, input_shape, num_classes: int = 10, channels=(16, 32), batch_norm: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        if len(input_shape) == 1:
            input_shape = (1, input_shape[0])
        one_d = len(input_shape) == 2
        Conv, BN, Pool = (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d) if one_d else (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)
        self.input_shape = tuple(input_shape)
        c, spatial = input_shape[0], list(input_shape[1:])
        layers: list[nn.Module] = []
        for out in channels:
            layers.append(Conv(c, out, 3, padding=1))
            if batch_norm:
                layers.append(BN(out))
            layers.append(nn.ReLU())
            if min(spatial) >= 4:
                layers.append(Pool(2))
                spatial = [s // 2 for s in spatial]
            c = out
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Flatten()]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(c * math.prod(spatial), num_classes))
        self.head = nn.Sequential(*head)
        _he_init_convs(self)

    def forward(self, x):
        x = x.reshape(len(x), *self.input_shape)
        return self.head(self.features(x))


class _Block(nn.Module):
    def __init__(self, cin, cout, stride, batch_norm):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not batch_norm)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not batch_norm)
        self.bn2 = norm(cout)
        self.short = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=not batch_norm), norm(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.short(x))


class SmallResNet(nn.Module):
    """A small ResNet: stem conv, one basic block per stage (widths ``channels``), global average pool, linear."""

    def __init__(self, input_shape, num_classes: int = 10, channels=(16, 32, 64), batch_norm: bool = True):
        super().__init__()
        self.input_shape = tuple(input_shape)
        c = input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, channels[0], 3, 1, 1, bias=not batch_norm),
                                  nn.BatchNorm2d(channels[0]) if batch_norm else nn.Identity(), nn.ReLU())
        blocks, cin = [], channels[0]
        for i, cout in enumerate(channels):
            blocks.append(_Block(cin, cout, 1 if i == 0 else 2, batch_norm))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        _he_init_convs(self)

    def forward(self, x):
        x = x.reshape(len(x), *self.input_shape)
        x = self.blocks(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


MODELS = ("vgg11", "mlp", "cnn", "resnet")


def build_model(name: str, input_shape, num_classes: int, *, batch_norm: bool = False, dropout: float = 0.0,
                width: float = 1.0, hidden=(256, 256), channels=None) -> nn.Module:
    """Build a model by name for inputs of ``input_shape`` (one example, without the batch dimension)."""
    name = name.lower()
    input_shape = tuple(input_shape)
    if name in ("vgg11", "vgg"):
        if len(input_shape) != 3:
            raise ValueError(f"vgg11 needs image inputs (C,H,W), got {input_shape}")
        return VGG(input_shape[0], num_classes, batch_norm, dropout, width, input_shape[1])
    if name == "mlp":
        return MLP(math.prod(input_shape), num_classes, tuple(hidden), dropout)
    if name == "cnn":
        return SmallCNN(input_shape, num_classes, tuple(channels or (16, 32)), batch_norm, dropout)
    if name == "resnet":
        if len(input_shape) != 3:
            raise ValueError(f"resnet needs image inputs (C,H,W), got {input_shape}")
        return SmallResNet(input_shape, num_classes, tuple(channels or (16, 32, 64)), batch_norm)
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
