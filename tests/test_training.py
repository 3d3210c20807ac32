"""fit(): early stopping keeps the best-validation weights, masks hold, same seed -> same bytes, resume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from lth.data.loader import Normalizer, crop_batch, train_batches
from lth.data.store import Split, load_prepared
from lth.models import build_model
from lth.pruning import full_mask, prune_global
from lth.training import EpochMetrics, fit


def _setup(study):
    data = load_prepared(study.paths.data, "digits")
    return data, Normalizer(data.mean, data.std)


def test_learns_and_returns_history(study) -> None:
    data, norm = _setup(study)
    cfg = replace(study.train, max_epochs=4, patience=10)
    model = build_model(study.model, data.num_classes, 0)
    seen: list[EpochMetrics] = []
    result = fit(model, data.train, data.val, norm, cfg, seed=0, on_epoch=seen.append, keep_epochs=[0, 2])
    assert [m.epoch for m in result.history] == [1, 2, 3, 4] == [m.epoch for m in seen]
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert set(result.kept) == {0, 2}
    best = min(result.history, key=lambda m: m.val_loss)
    assert result.best_epoch == best.epoch


def test_early_stopping_keeps_best_weights(study) -> None:
    data, norm = _setup(study)
    # validation labels unrelated to the images: the validation loss soon stops improving
    noisy_val = Split(data.val.images, data.val.labels[torch.randperm(len(data.val), generator=torch.Generator().manual_seed(0))])
    cfg = replace(study.train, max_epochs=12, patience=2, lr=0.2)
    model = build_model(study.model, data.num_classes, 0)
    states = {}
    result = fit(model, data.train, noisy_val, norm, cfg, seed=0,
                 on_epoch=lambda m: states.__setitem__(m.epoch, {k: v.clone() for k, v in model.state_dict().items()}))
    losses = [m.val_loss for m in result.history]
    assert len(result.history) < 10 and result.stopped_early
    # stopped exactly `patience` epochs after the best one, and returned that epoch's weights
    assert len(result.history) == result.best_epoch + 2
    assert result.best_epoch == 1 + losses.index(min(losses))
    for k, v in states[result.best_epoch].items():
        assert torch.equal(result.best_state[k], v)


def test_mask_enforced_and_deterministic(study) -> None:
    data, norm = _setup(study)
    model = build_model(study.model, data.num_classes, 0)
    mask = prune_global(dict(model.named_parameters()), full_mask(model), 0.6)
    a = fit(model, data.train, data.val, norm, study.train, seed=3, mask=mask)
    b = fit(build_model(study.model, data.num_classes, 0), data.train, data.val, norm, study.train, seed=3, mask=mask)
    for name, m in mask.items():
        assert bool((a.best_state[name][~m] == 0).all())
    assert all(torch.equal(a.best_state[k], b.best_state[k]) for k in a.best_state)


def test_resume_from_checkpoint_is_identical(study, tmp_path: Path) -> None:
    data, norm = _setup(study)
    cfg = replace(study.train, max_epochs=3, patience=5)
    full = fit(build_model(study.model, data.num_classes, 0), data.train, data.val, norm, cfg, seed=1)
    ckpt = tmp_path / "ck.safetensors"

    class Kill(Exception):
        pass

    def die_after_2(m: EpochMetrics) -> None:
        if m.epoch == 2:
            raise Kill

    try:
        fit(build_model(study.model, data.num_classes, 0), data.train, data.val, norm, cfg, seed=1,
            checkpoint=ckpt, on_epoch=die_after_2)
    except Kill:
        pass
    resumed = fit(build_model(study.model, data.num_classes, 0), data.train, data.val, norm, cfg, seed=1,
                  checkpoint=ckpt)
    assert [m.epoch for m in resumed.history] == [1, 2, 3]
    assert all(torch.equal(full.best_state[k], resumed.best_state[k]) for k in full.best_state)


def test_batches_depend_only_on_seed_and_epoch(study) -> None:
    data, _ = _setup(study)
    a = [y for _, y in train_batches(data.train, 16, 10, seed=0, epoch=1, device=torch.device("cpu"))]
    b = [y for _, y in train_batches(data.train, 16, 10, seed=0, epoch=1, device=torch.device("cpu"))]
    c = [y for _, y in train_batches(data.train, 16, 10, seed=0, epoch=2, device=torch.device("cpu"))]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert sum(len(y) for y in a) == len(data.train)


def test_crop_batch_takes_the_requested_windows() -> None:
    images = torch.arange(2 * 1 * 5 * 5, dtype=torch.uint8).view(2, 1, 5, 5)
    out = crop_batch(images, 2, torch.tensor([0, 3]), torch.tensor([1, 2]))
    assert torch.equal(out[0, 0], images[0, 0, 0:2, 1:3])
    assert torch.equal(out[1, 0], images[1, 0, 3:5, 2:4])
