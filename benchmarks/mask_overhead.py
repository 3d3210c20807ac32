"""Masked training step (lth's MaskedSGD) vs the dense step vs the alternatives, same model, batch and data.

Variants, each on its own copy of the same initial weights:
  dense         fit's step on an unpruned model (MaskedSGD without masks): the limit to reach
  ours          fit's step on a pruned model: MaskedSGD folds the mask into its last multiply-add
  zero_after    torch.optim.SGD, then pruned weights multiplied by the mask after each step (the old way)
  prune_hooks   torch.nn.utils.prune.global_unstructured's forward pre-hooks + torch.optim.SGD
  torch_dense   torch.optim.SGD on the unpruned model (reference: torch's own dense step)
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from benchmarks.common import interleaved, median, paired_ratio, report
from lth.config import ModelConfig
from lth.models import build_model
from lth.training.optim import MaskedSGD
from lth.pruning import MaskEnforcer, full_mask, prunable_names, prune_global

SGD = dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
ROUNDS = 3  # the mask of IMP round 3: 1 - 0.8^3 = 49% pruned


def _mask(model: nn.Module) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    mask = full_mask(model)
    for _ in range(ROUNDS):
        mask = prune_global({n: params[n] for n in prunable_names(model)}, mask, 0.2)
    return mask


def _stepper(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int, after=None):
    loss_fn = nn.CrossEntropyLoss()

    def run() -> None:
        for _ in range(steps):
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after is not None:
                after()

    return run


def variants(base: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict:
    """One training-step closure per variant."""
    mask = _mask(base)
    out = {}
    m = copy.deepcopy(base)
    out["dense"] = _stepper(m, MaskedSGD(m.parameters(), **SGD), x, y, steps)
    m = copy.deepcopy(base)
    MaskEnforcer(m, mask)()
    named = dict(m.named_parameters())
    out["ours"] = _stepper(m, MaskedSGD(m.parameters(), masks={named[n]: v for n, v in mask.items()}, **SGD),
                           x, y, steps)
    m = copy.deepcopy(base)
    enforce = MaskEnforcer(m, mask)
    enforce()
    out["zero_after"] = _stepper(m, torch.optim.SGD(m.parameters(), **SGD), x, y, steps, after=enforce)
    m = copy.deepcopy(base)
    modules = dict(m.named_modules())
    targets = [(modules[n.rsplit(".", 1)[0]], "weight") for n in prunable_names(m)]
    pruned = 1 - sum(int(v.sum()) for v in mask.values()) / sum(v.numel() for v in mask.values())
    tprune.global_unstructured(targets, pruning_method=tprune.L1Unstructured, amount=pruned)
    out["prune_hooks"] = _stepper(m, torch.optim.SGD(m.parameters(), **SGD), x, y, steps)
    m = copy.deepcopy(base)
    out["torch_dense"] = _stepper(m, torch.optim.SGD(m.parameters(), **SGD), x, y, steps)
    return out


def measure(label: str, model: nn.Module, image: int, batch: int, steps: int, repeats: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image, image, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    times = interleaved(variants(model, x, y, steps), repeats)
    rows = {n: {"img_per_s": steps * batch / median(t), "vs_dense": paired_ratio(times, n, "dense"),
                "vs_torch_dense": paired_ratio(times, n, "torch_dense")} for n, t in times.items()}
    return {"setting": label, "image": image, "batch": batch, "steps_per_timing": steps, "repeats": repeats,
            "device": str(device), "variants": rows, "ours_vs_dense": rows["ours"]["vs_dense"]}


def run(args) -> dict:
    quick = getattr(args, "quick", False)
    settings = [
        measure("CifarResNet-20 w16, 32 px", build_model(ModelConfig(arch="resnet", depth=20, width=16), 10, 0),
                32, 64, 2 if quick else 4, 3 if quick else 5),
        measure("ResNet-50, 32 px", build_model(ModelConfig(arch="resnet50"), 10, 0),
                32, 64, 1, 3 if quick else 5),
    ]
    rows = [[s["setting"], n, v["img_per_s"], v["vs_dense"], v["vs_torch_dense"]]
            for s in settings for n, v in s["variants"].items()]
    return report("mask_overhead", ["setting", "variant", "img/s", "x dense", "x torch_dense"], rows,
                  {"target": "ours <= 1.02x dense", "mask_rounds": ROUNDS, "settings": settings,
                   "met": all(s["ours_vs_dense"] <= 1.02 for s in settings)})
