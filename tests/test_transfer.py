"""The study arms: head swap, reinit, trained weights, result rows, resumability, bad inputs."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest
import torch
from helpers import KillAtEpoch, Killed

from lth.config import RelatedPair
from lth.data.store import load_prepared
from lth.errors import UserError
from lth.study.imp import make_job, run_imp
from lth.tickets import load_ticket, ticket_dir
from lth.study.transfer import FineTune, initial_network, plan, results_csv, run_finetune, run_transfer
from lth.tracking import NullRun, NullTracker


@pytest.fixture
def tickets(study):
    for source in ("fashion-mnist", "digits"):
        run_imp(make_job(source, 0, study), study)
    return study


def test_head_swap_keeps_ticket_and_seeds_new_head(tickets) -> None:
    data = load_prepared(tickets.paths.data, "digits")
    ft = FineTune("digits", "transfer", "fashion-mnist", 0, 2)
    model, mask = initial_network(ft, data, tickets)
    t = load_ticket(ticket_dir(tickets.paths.models, "fashion-mnist", 0, 2))
    state = model.state_dict()
    assert model.fc.out_features == data.num_classes != t.meta.num_classes
    assert all(torch.equal(state[k], v) for k, v in t.weights.items() if not k.startswith("fc."))
    again, _ = initial_network(ft, data, tickets)
    other, _ = initial_network(FineTune("digits", "transfer", "fashion-mnist", 0, 1), data, tickets)
    assert torch.equal(again.fc.weight, model.fc.weight) and not torch.equal(other.fc.weight, model.fc.weight)
    assert all(torch.equal(mask[k], t.mask[k]) for k in t.mask)


def test_reinit_same_mask_new_weights(tickets) -> None:
    data = load_prepared(tickets.paths.data, "digits")
    model, mask = initial_network(FineTune("digits", "reinit", "digits", 0, 2), data, tickets)
    t = load_ticket(ticket_dir(tickets.paths.models, "digits", 0, 2))
    state = model.state_dict()
    for name, m in t.mask.items():
        assert torch.equal(mask[name], m)
        assert bool((state[name][~m] == 0).all())
        assert not torch.equal(state[name][m], t.weights[name][m])


def test_trained_uses_fully_trained_weights_under_the_mask(tickets) -> None:
    data = load_prepared(tickets.paths.data, "digits")
    model, mask = initial_network(FineTune("digits", "trained", "fashion-mnist", 0, 1), data, tickets)
    t = load_ticket(ticket_dir(tickets.paths.models, "fashion-mnist", 0, 1), with_trained=True)
    state = model.state_dict()
    for name in t.mask:
        assert torch.equal(state[name], t.trained[name])
        assert not torch.equal(state[name], t.weights[name])


def test_run_transfer_rows_and_resume(tickets, trained_epochs) -> None:
    csv = run_transfer("digits", tickets, arms=("scratch", "transfer", "reinit", "target", "trained", "size"))
    df = pd.read_csv(csv)
    counts = df.groupby("arm").size().to_dict()
    assert counts == {"scratch": 1, "transfer": 3, "target": 3, "reinit": 2, "trained": 3, "size": 3}
    assert df.test_acc.between(0, 1).all() and (df.epochs >= 1).all()
    transfer = df[df.arm == "transfer"].sort_values("round")
    assert transfer.fraction_pruned.round(3).tolist() == [0.0, 0.2, 0.36]
    assert (df[df.arm == "size"].size_fraction == 0.5).all()
    before = csv.read_bytes()
    # a rerun finds every fine-tune done and rebuilds the same table without training
    del trained_epochs[:]
    run_transfer("digits", tickets, arms=("scratch", "transfer", "reinit", "target", "trained", "size"))
    assert csv.read_bytes() == before
    assert trained_epochs == []


def test_killed_finetune_resumes_where_it_stopped(study, trained_epochs, capsys) -> None:
    # cosine over the fine-tune's own cap, from transfer.lr: the resumed epochs need the same rates
    params = replace(study, train=replace(study.train, lr_schedule="cosine"),
                     transfer=replace(study.transfer, lr=0.03, max_epochs=3))
    data = load_prepared(params.paths.data, "digits")
    ft = FineTune("digits", "scratch", "", 0, 0)
    clean = run_finetune(ft, data, params, NullTracker(), NullRun())
    with pytest.raises(Killed):
        run_finetune(ft, data, params, KillAtEpoch("scratch", 1), NullRun())
    del trained_epochs[:]
    resumed = run_finetune(ft, data, params, NullTracker(), NullRun())
    assert [e for _, e in trained_epochs] == list(range(2, clean["epochs"] + 1)) and clean["epochs"] >= 2
    assert "resuming transfer digits scratch - s0 r00 after epoch 1/3" in capsys.readouterr().err
    assert {k: v for k, v in resumed.items() if k != "seconds"} == {k: v for k, v in clean.items() if k != "seconds"}


def test_missing_tickets_and_unprepared_target(study) -> None:
    with pytest.raises(UserError, match="run `lth imp fashion-mnist --seed 0`"):
        run_transfer("digits", study, arms=("transfer",))
    with pytest.raises(UserError, match="lth prepare bio-textures"):
        run_transfer("bio-textures", study, arms=("scratch",))
    with pytest.raises(UserError, match="unknown dataset"):
        run_transfer("nope", study, arms=("scratch",))
    assert not results_csv(study, "digits").exists()


def test_plan_covers_related_pairs(study) -> None:
    params = replace(study, transfer=replace(study.transfer, related=(RelatedPair("digits", "x"),)))
    todo = plan("x", params, ("related",))
    assert {(f.arm, f.source) for f in todo} == {("related", "digits")}
    assert [f.round for f in todo] == [0, 1, 2]
