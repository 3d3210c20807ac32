"""ResNet-50 in torchvision's layout and small CIFAR-style ResNets, Xavier-initialised, with a swappable head."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet50 as tv_resnet50

from lth.config import ModelConfig

HEAD = "fc"  # the classification head's module name in every architecture here


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (depth 6n+2): 3x3 stem, three stages of n blocks, widths w, 2w, 4w."""

    def __init__(self, depth: int, width: int, num_classes: int) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers = []
        in_planes = width
        for stage, planes in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def xavier_init_(model: nn.Module, generator: torch.Generator) -> None:
    """Glorot-normal weights for every conv and linear layer; BN to (1, 0); biases to 0."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(module.weight, generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def build_model(cfg: ModelConfig, num_classes: int, seed: int) -> nn.Module:
    """A freshly Xavier-initialised network; the same seed gives the same weights bit for bit."""
    if cfg.arch == "resnet50":
        model: nn.Module = tv_resnet50(weights=None, num_classes=num_classes)
    else:
        model = CifarResNet(cfg.depth, cfg.width, num_classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        xavier_init_(model, generator)
    return model


def replace_head(model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """Swap the classification head for a new, seeded, Xavier-initialised one with `num_classes` outputs."""
    old = getattr(model, HEAD)
    head = nn.Linear(old.in_features, num_classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nn.init.xavier_normal_(head.weight, generator=generator)
        nn.init.zeros_(head.bias)
    setattr(model, HEAD, head.to(old.weight.device))
    return model


def num_classes_of(model: nn.Module) -> int:
    """Outputs of the classification head."""
    return int(getattr(model, HEAD).out_features)
