"""fit(): early stopping keeps the best-validation weights, masks hold, same seed -> same bytes, resume, lr schedule."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import Killed

from lth.data.loader import Normalizer, crop_batch, train_batches
from lth.data.store import Split, load_prepared
from lth.models import build_model
from lth.pruning import full_mask, prune_global
from lth.training import EpochMetrics, LrSchedule, fit


def _setup(study):
    data = load_prepared(study.paths.data, "digits")
    return data, Normalizer(data.mean, data.std)


def test_learns_and_returns_history(study) -> None:
    data, norm = _setup(study)
    cfg = replace(study.train, max_epochs=4, patience=10)
    model = build_model(study.model, data.num_classes, 0)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[EpochMetrics] = []
    states = {}

    def record(m: EpochMetrics) -> None:
        seen.append(m)
        states[m.epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    result = fit(model, data.train, data.val, norm, cfg, seed=0, on_epoch=record, keep_epochs=[0, 2])
    assert [m.epoch for m in result.history] == [1, 2, 3, 4] == [m.epoch for m in seen]
    assert result.history[-1].train_loss < result.history[0].train_loss
    # the kept rewind points are the weights as they were after 0 and 2 epochs
    assert set(result.kept) == {0, 2}
    assert all(torch.equal(result.kept[0][k], initial[k]) for k in initial)
    assert all(torch.equal(result.kept[2][k], states[2][k]) for k in initial)
    assert not all(torch.equal(result.kept[2][k], states[4][k]) for k in initial)
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


def test_min_epochs_and_kept_epochs_hold_off_early_stopping(study) -> None:
    data, norm = _setup(study)
    noisy_val = Split(data.val.images, data.val.labels[torch.randperm(len(data.val), generator=torch.Generator().manual_seed(0))])
    cfg = replace(study.train, max_epochs=8, patience=1, lr=0.2)
    free = fit(build_model(study.model, data.num_classes, 0), data.train, noisy_val, norm, cfg, seed=0)
    assert free.stopped_early and len(free.history) < 5
    held = fit(build_model(study.model, data.num_classes, 0), data.train, noisy_val, norm,
               replace(cfg, min_epochs=6), seed=0)
    kept = fit(build_model(study.model, data.num_classes, 0), data.train, noisy_val, norm, cfg, seed=0,
               keep_epochs=[5])
    assert len(held.history) >= 6 and len(kept.history) >= 5 and 5 in kept.kept


def test_torn_checkpoint_starts_over(study, tmp_path: Path) -> None:
    # killed between writing epoch 2's tensors and its JSON: the JSON still names epoch 1
    data, norm = _setup(study)
    cfg = replace(study.train, max_epochs=3, patience=5)
    ckpt = tmp_path / "ck.safetensors"
    _fit_until_killed(study, data, norm, cfg, ckpt, after=1)
    info_epoch1 = ckpt.with_suffix(".json").read_bytes()
    _fit_until_killed(study, data, norm, cfg, ckpt, after=2)
    ckpt.with_suffix(".json").write_bytes(info_epoch1)
    rerun = fit(build_model(study.model, data.num_classes, 0), data.train, data.val, norm, cfg, seed=1,
                checkpoint=ckpt)
    clean = fit(build_model(study.model, data.num_classes, 0), data.train, data.val, norm, cfg, seed=1)
    assert (rerun.resumed_from, rerun.epochs_trained) == (0, 3)
    assert all(torch.equal(clean.best_state[k], rerun.best_state[k]) for k in clean.best_state)


def test_mask_enforced_and_deterministic(study) -> None:
    data, norm = _setup(study)
    model = build_model(study.model, data.num_classes, 0)
    mask = prune_global(dict(model.named_parameters()), full_mask(model), 0.6)
    a = fit(model, data.train, data.val, norm, study.train, seed=3, mask=mask)
    b = fit(build_model(study.model, data.num_classes, 0), data.train, data.val, norm, study.train, seed=3, mask=mask)
    for name, m in mask.items():
        assert bool((a.best_state[name][~m] == 0).all())
    assert all(torch.equal(a.best_state[k], b.best_state[k]) for k in a.best_state)


SCHEDULES = {
    "constant": {},
    "step": {"lr_schedule": "step", "lr_anneal_epochs": (2,), "lr_anneal_factor": 0.1},
    "cosine": {"lr_schedule": "cosine"},
}


def _fit_until_killed(study, data, norm, cfg, ckpt: Path, after: int, **kw) -> None:
    def die(m: EpochMetrics) -> None:
        if m.epoch == after:
            raise Killed

    with pytest.raises(Killed):
        fit(build_model(study.model, data.num_classes, 0), data.train, data.val, norm, cfg, seed=1,
            checkpoint=ckpt, on_epoch=die, **kw)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_resume_trains_only_the_remaining_epochs(study, tmp_path: Path, schedule: str) -> None:
    data, norm = _setup(study)
    cfg = replace(study.train, max_epochs=3, patience=5, **SCHEDULES[schedule])
    full = fit(build_model(study.model, data.num_classes, 0), data.train, data.val, norm, cfg, seed=1)
    ckpt = tmp_path / "ck.safetensors"
    _fit_until_killed(study, data, norm, cfg, ckpt, after=2)
    resumes: list[tuple[int, int]] = []
    resumed = fit(build_model(study.model, data.num_classes, 0), data.train, data.val, norm, cfg, seed=1,
                  checkpoint=ckpt, on_resume=lambda done, cap: resumes.append((done, cap)))
    # this call trained epoch 3 only, at the schedule's epoch-3 rate: the same bits as the fit never killed
    assert (resumed.resumed_from, resumed.epochs_trained, resumes) == (2, 1, [(2, 3)])
    assert (full.resumed_from, full.epochs_trained) == (0, 3)
    assert [m.epoch for m in resumed.history] == [1, 2, 3]
    assert [m.val_loss for m in resumed.history] == [m.val_loss for m in full.history]
    assert all(torch.equal(full.best_state[k], resumed.best_state[k]) for k in full.best_state)


def test_checkpoint_of_another_schedule_starts_over(study, tmp_path: Path) -> None:
    data, norm = _setup(study)
    cfg = replace(study.train, max_epochs=3, patience=5)
    cosine = replace(cfg, **SCHEDULES["cosine"])
    ckpt = tmp_path / "ck.safetensors"
    _fit_until_killed(study, data, norm, cfg, ckpt, after=2)
    rerun = fit(build_model(study.model, data.num_classes, 0), data.train, data.val, norm, cosine, seed=1,
                checkpoint=ckpt)
    clean = fit(build_model(study.model, data.num_classes, 0), data.train, data.val, norm, cosine, seed=1)
    assert (rerun.resumed_from, rerun.epochs_trained) == (0, 3)
    assert all(torch.equal(clean.best_state[k], rerun.best_state[k]) for k in clean.best_state)
    # the same for a changed base rate (a fine-tune's transfer.lr)
    _fit_until_killed(study, data, norm, cfg, ckpt, after=1)
    other_lr = fit(build_model(study.model, data.num_classes, 0), data.train, data.val, norm, cfg, seed=1,
                   checkpoint=ckpt, lr=cfg.lr / 2)
    assert (other_lr.resumed_from, other_lr.epochs_trained) == (0, 3)


def test_lr_schedules_set_each_epochs_rate(study) -> None:
    base = replace(study.train, max_epochs=4)
    rates = {name: [LrSchedule.from_config(replace(base, **kw), 0.1, 4).lr(e) for e in range(1, 5)]
             for name, kw in SCHEDULES.items()}
    assert rates["constant"] == [0.1] * 4
    assert rates["step"] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    assert rates["cosine"] == pytest.approx([0.1, 0.1 * (1 + 2**-0.5) / 2, 0.05, 0.1 * (1 - 2**-0.5) / 2])
    # and fit() trains with them: the step schedule leaves epochs 1-2 as they were and changes epoch 3
    data, norm = _setup(study)
    cfg = replace(study.train, max_epochs=3, patience=5)
    runs = {name: fit(build_model(study.model, data.num_classes, 0), data.train, data.val, norm,
                      replace(cfg, **SCHEDULES[name]), seed=1).history for name in ("constant", "step")}
    assert [m.train_loss for m in runs["step"][:2]] == [m.train_loss for m in runs["constant"][:2]]
    assert runs["step"][2].val_loss != runs["constant"][2].val_loss


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


@pytest.mark.parametrize(("share", "capped"), [(0.25, True), (1.0, False), (0.0, False)])
def test_a_fractional_gpu_caps_the_process_memory(monkeypatch: pytest.MonkeyPatch, share: float,
                                                  capped: bool) -> None:
    """A unit given 0.25 of a GPU keeps PyTorch's allocator to a quarter of it (ray_engine calls this per task)."""
    from lth.training import cap_gpu_memory

    calls: list[tuple[float, int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    assert cap_gpu_memory(share) is capped
    assert calls == ([(share, 0)] if capped else [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cap_gpu_memory(share) is False  # no CUDA device: nothing to cap
