"""Architectures: torchvision's ResNet-50 layout, Xavier init, seeded head swap."""

from __future__ import annotations

import torch
from torch import nn

from lth.config import ModelConfig
from lth.models import CifarResNet, build_model, replace_head


def test_resnet50_layout_matches_the_paper() -> None:
    model = build_model(ModelConfig(arch="resnet50"), 10, seed=0)
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert [len(s) for s in stages] == [3, 4, 6, 3]
    widths = [(b.conv1.out_channels, b.conv2.out_channels, b.conv3.out_channels) for b in (s[0] for s in stages)]
    assert widths == [(64, 64, 256), (128, 128, 512), (256, 256, 1024), (512, 512, 2048)]
    assert model.fc.in_features == 2048 and model.fc.out_features == 10
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)


def test_xavier_init_statistics_and_seed() -> None:
    a = build_model(ModelConfig(depth=8, width=16), 10, seed=3)
    b = build_model(ModelConfig(depth=8, width=16), 10, seed=3)
    c = build_model(ModelConfig(depth=8, width=16), 10, seed=4)
    w = a.layer2[0].conv1.weight.detach()
    fan_in = w.shape[1] * w[0, 0].numel()
    fan_out = w.shape[0] * w[0, 0].numel()
    assert abs(float(w.std()) - (2.0 / (fan_in + fan_out)) ** 0.5) < 0.1 * (2.0 / (fan_in + fan_out)) ** 0.5
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_cifar_resnet_depth_and_forward() -> None:
    model = CifarResNet(depth=14, width=8, num_classes=5)
    assert len(model.layer1) == 2
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_replace_head_keeps_body_and_is_seeded() -> None:
    model = build_model(ModelConfig(depth=8, width=8), 10, seed=0)
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    replace_head(model, 3, seed=7)
    head_a = model.fc.weight.clone()
    assert model.fc.out_features == 3
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())
    replace_head(model, 3, seed=7)
    assert torch.equal(model.fc.weight, head_a)
    replace_head(model, 3, seed=8)
    assert not torch.equal(model.fc.weight, head_a)
