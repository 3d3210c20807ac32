"""IMP with late resetting: 0.8^k kept, nested masks, rewound weights bit-identical, resumable, deterministic."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import KillAtEpoch, Killed
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


def test_same_seed_gives_identical_bytes_and_resume(study, tmp_path: Path, trained_epochs) -> None:
    job = make_job("fashion-mnist", 0, study, rounds=2)
    first = run_imp(job, study)
    snapshot = {d.name: (d / "weights.safetensors").read_bytes() for d in first}
    mask2 = (first[2] / "mask.safetensors").read_bytes()
    # lose the last round (as after a kill) and rerun: it alone is recomputed, identically
    shutil.rmtree(first[2])
    del trained_epochs[:]
    run_imp(job, study)
    assert {seed for seed, _ in trained_epochs} == {2}  # fit seed = 1000 * job seed + round
    assert (first[2] / "mask.safetensors").read_bytes() == mask2
    # a fresh run from nothing, elsewhere, gives the same bytes
    other = replace(study, paths=replace(study.paths, models=str(tmp_path / "m2")))
    again = run_imp(make_job("fashion-mnist", 0, other, rounds=2), other)
    assert {d.name: (d / "weights.safetensors").read_bytes() for d in again} == snapshot


def test_reduced_training_fraction_has_its_own_dir(study) -> None:
    job = make_job("digits", 0, study, rounds=1, train_fraction=0.5)
    dirs = run_imp(job, study)
    assert "size" in dirs[0].parts and load_ticket(dirs[1]).meta.train_fraction == 0.5


def _tensor_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


def test_killed_round_resumes_where_it_stopped(study, tmp_path: Path, trained_epochs, capsys) -> None:
    # annealed after epoch 2: the resumed epoch 3 must run at the annealed rate to match the clean run
    params = replace(study, train=replace(study.train, lr_schedule="step", lr_anneal_epochs=(2,),
                                          lr_anneal_factor=0.1))
    clean = replace(params, paths=replace(params.paths, models=str(tmp_path / "clean")))
    run_imp(make_job("fashion-mnist", 0, clean, rounds=2), clean)
    job = make_job("fashion-mnist", 0, params, rounds=2)
    with pytest.raises(Killed):
        run_imp(job, params, KillAtEpoch(" r01", 2))
    del trained_epochs[:]
    run_imp(job, params)
    # round 0 is done (not retrained); round 1 (fit seed 1) trains only its last epoch; round 2 all of its own
    assert [s for s, _ in trained_epochs if s == 0] == []
    assert [e for s, e in trained_epochs if s == 1] == [3]
    assert [e for s, e in trained_epochs if s == 2] == [1, 2, 3]
    assert "resuming imp fashion-mnist s0 r01 after epoch 2/3" in capsys.readouterr().err
    assert _tensor_files(Path(params.paths.models)) == _tensor_files(tmp_path / "clean")
