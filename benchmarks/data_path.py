"""Loader throughput (train_batches: gather, random crop, normalise) vs training throughput of the model it feeds.

Two settings: the demo (20-px stored images, 16-px crops, CifarResNet-8 w16) and the paper's image size (a
synthetic 256-px prepared set written with write_prepared, memory-mapped by load_prepared, 224-px crops,
ResNet-50). Loader and model run alternately; the ratio is loader img/s / model img/s (target >= 10).
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from torch import nn

from benchmarks.common import interleaved, median, report
from lth.config import ModelConfig
from lth.data.loader import Normalizer, train_batches
from lth.data.store import Split, load_prepared, write_prepared
from lth.models import build_model

BATCH = 64


def _synthetic(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8), (np.arange(n) % 10).astype(np.int64)


def _loader(split: Split, crop: int, device: torch.device, batches: int):
    norm = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    epoch = [0]

    def run() -> None:
        epoch[0] += 1
        done = 0
        while done < batches:  # whole epochs' worth of batches, as fit() consumes them
            for x, _ in train_batches(split, BATCH, crop, 0, epoch[0], device):
                norm(x)
                done += 1
                if done == batches:
                    break

    return run


def _trainer(model: nn.Module, crop: int, device: torch.device, batch: int, steps: int):
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, crop, crop, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def run() -> None:
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def measure(label: str, split: Split, crop: int, model: nn.Module, *, model_batch: int, model_steps: int,
            loader_batches: int, repeats: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    times = interleaved({"loader": _loader(split, crop, device, loader_batches),
                         "model": _trainer(model, crop, device, model_batch, model_steps)}, repeats)
    loader = loader_batches * BATCH / median(times["loader"])
    trained = model_steps * model_batch / median(times["model"])
    ratios = [(loader_batches * BATCH / a) / (model_steps * model_batch / b)
              for a, b in zip(times["loader"], times["model"])]
    return {"setting": label, "device": str(device), "crop": crop, "stored": int(split.images.shape[-1]),
            "loader_img_per_s": loader, "model_img_per_s": trained, "model_batch": model_batch,
            "ratio": median(ratios), "repeats": repeats}


def run(args) -> dict:
    quick = getattr(args, "quick", False)
    reps = 3 if quick else 7
    settings = []
    demo = Split(*map(torch.from_numpy, _synthetic(2000, 20, 0)))
    settings.append(measure("demo: 20 px stored, 16 crop, CifarResNet-8 w16", demo, 16,
                            build_model(ModelConfig(arch="resnet", depth=8, width=16), 10, 0),
                            model_batch=BATCH, model_steps=4, loader_batches=31, repeats=reps))
    with tempfile.TemporaryDirectory(prefix="lth-bench-") as tmp:
        splits = {s: _synthetic(n, 256, i) for i, (s, n) in enumerate([("train", 500), ("val", 16), ("test", 16)])}
        write_prepared(tmp, "synthetic256", splits, [f"c{i}" for i in range(10)], {"origin": "benchmark"})
        data = load_prepared(tmp, "synthetic256")
        gpu = torch.cuda.is_available()
        # ResNet-50 at 224 px on a CPU takes seconds per image: a few small batches give its rate.
        settings.append(measure("paper size: 256 px memory-mapped, 224 crop, ResNet-50", data.train, 224,
                                build_model(ModelConfig(arch="resnet50"), 10, 0),
                                model_batch=BATCH if gpu else 8, model_steps=10 if gpu else 1,
                                loader_batches=8, repeats=reps if gpu else 3))
    rows = [[s["setting"], s["device"], s["loader_img_per_s"], s["model_img_per_s"], s["ratio"]] for s in settings]
    return report("data_path", ["setting", "device", "loader img/s", "model img/s", "loader/model"], rows,
                  {"target": "loader >= 10x model", "settings": settings,
                   "met": all(s["ratio"] >= 10 for s in settings)})
