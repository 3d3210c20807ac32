"""IMP with late resetting: 0.8^k kept, nested masks, rewound weights bit-identical, resumable, deterministic."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from lth.study.imp import dense_checkpoint, make_job, run_imp
from lth.tickets import load_ticket


def test_rounds_masks_and_late_resetting(study) -> None:
    job = make_job("fashion-mnist", 0, study, rounds=3)
    dirs = run_imp(job, study)
    assert [d.name for d in dirs] == ["round00", "round01", "round02", "round03"]
    rewind = load_file(str(dense_checkpoint(job, study.imp.rewind_epoch)))
    prev = None
    for k, d in enumerate(dirs):
        t = load_ticket(d, with_trained=True)
        kept = sum(int(m.sum()) for m in t.mask.values()) / sum(m.numel() for m in t.mask.values())
        assert abs(kept - 0.8**k) / 0.8**k < 1e-3, (k, kept)
        assert abs(t.meta.sparsity - (1 - kept)) < 1e-9 and t.meta.round == k
        assert "fc.weight" not in t.mask
        for name, m in t.mask.items():
            # surviving weights are the dense run's epoch-k weights bit for bit; pruned ones are zero
            assert torch.equal(t.weights[name][m], rewind[name][m])
            assert bool((t.weights[name][~m] == 0).all()) and bool((t.trained[name][~m] == 0).all())
            if prev is not None:
                assert not bool((m & ~prev.mask[name]).any()), "a round's mask must lie inside the previous one"
        for name, v in t.weights.items():
            if name not in t.mask:  # head, biases and batch-norm: the rewind point's values
                assert torch.equal(v, rewind[name])
        prev = t


def test_same_seed_gives_identical_bytes_and_resume(study, tmp_path: Path) -> None:
    job = make_job("fashion-mnist", 0, study, rounds=2)
    first = run_imp(job, study)
    snapshot = {d.name: (d / "weights.safetensors").read_bytes() for d in first}
    mask2 = (first[2] / "mask.safetensors").read_bytes()
    # lose the last round (as after a kill) and rerun: it is recomputed identically
    shutil.rmtree(first[2])
    run_imp(job, study)
    assert (first[2] / "mask.safetensors").read_bytes() == mask2
    # a fresh run from nothing, elsewhere, gives the same bytes
    other = replace(study, paths=replace(study.paths, models=str(tmp_path / "m2")))
    again = run_imp(make_job("fashion-mnist", 0, other, rounds=2), other)
    assert {d.name: (d / "weights.safetensors").read_bytes() for d in again} == snapshot


def test_reduced_training_fraction_has_its_own_dir(study) -> None:
    job = make_job("digits", 0, study, rounds=1, train_fraction=0.5)
    dirs = run_imp(job, study)
    assert "size" in dirs[0].parts and load_ticket(dirs[1]).meta.train_fraction == 0.5
