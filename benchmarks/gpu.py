"""ResNet-50 at the paper's settings (224-px crops, batch 64, Nesterov SGD) on a CUDA device: img/s of fp32 vs
bf16 autocast + channels_last (fit's `amp` and `channels_last` switches), optionally + torch.compile."""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.common import interleaved, median, report
from lth.config import ModelConfig
from lth.models import build_model
from lth.training.optim import MaskedSGD

BATCH, CROP, STEPS = 64, 224, 10


def _stepper(amp: bool, channels_last: bool, compiled: bool):
    device = torch.device("cuda")
    model = build_model(ModelConfig(arch="resnet50"), 10, 0).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = MaskedSGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    forward = torch.compile(model) if compiled else model
    x = torch.randn(BATCH, 3, CROP, CROP, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (BATCH,), device=device)

    def run() -> None:
        for _ in range(STEPS):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                loss = nn.functional.cross_entropy(forward(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def run(args) -> dict:
    if not torch.cuda.is_available():
        return report("gpu", ["status"], [["skipped: no CUDA device"]], {"skipped": "no CUDA device"})
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    torch.backends.cudnn.allow_tf32 = False
    variants = {"fp32": _stepper(False, False, False), "bf16+channels_last": _stepper(True, True, False)}
    if getattr(args, "compile", False):
        variants["bf16+channels_last+compile"] = _stepper(True, True, True)
    times = interleaved(variants, 3 if getattr(args, "quick", False) else 5, warmup=2)
    ips = {n: STEPS * BATCH / median(t) for n, t in times.items()}
    rows = [[n, v, v / ips["fp32"]] for n, v in ips.items()]
    return report("gpu", ["variant", "img/s", "x fp32"], rows,
                  {"batch": BATCH, "crop": CROP, "steps_per_timing": STEPS, "img_per_s": ips,
                   "speedup_vs_fp32": {n: v / ips["fp32"] for n, v in ips.items()}})
