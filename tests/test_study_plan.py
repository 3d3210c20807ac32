"""The study as a plan (lth.study.plan), the driver's policy (engine.Scheduler) and the Ray executor's checks.

Pure logic, no Ray cluster and no training: the end-to-end runs are in test_study_ray.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import tiny_raw
from lth.config import ConfigError, params_from_dict
from lth.errors import UserError
from lth.study.engine import Scheduler, progress_line
from lth.study.files import file_key, key_path, scratch_params
from lth.study.plan import build_plan, missing_inputs
from lth.study.ray_engine import check_address, check_fits, is_local


def tiny(tmp_path: Path, **overrides):
    return params_from_dict(tiny_raw(tmp_path, **overrides))


def test_plan_units_and_needs(tmp_path: Path) -> None:
    params = tiny(tmp_path, transfer={"arms": ["scratch", "transfer", "target", "size"]})
    plan = build_plan(params)
    keys = [u.key for u in plan]
    assert len(keys) == len(set(keys))
    by_key = {u.key: u for u in plan}
    # the list is a serial order: every unit after what it needs
    seen: set[str] = set()
    for u in plan:
        assert set(u.needs) <= seen, u.key
        seen.add(u.key)
    # IMP round by round: r needs r-1, round 0 the prepared source; target tickets are planned for the target arm
    assert by_key["imp/fashion-mnist/s0/r00"].needs == ("prepare/fashion-mnist",)
    assert by_key["imp/fashion-mnist/s0/r02"].needs == ("imp/fashion-mnist/s0/r01",)
    assert "imp/digits/s0/r02" in by_key
    # a fine-tune needs only its own ticket's round (pipelining), scratch only its data
    assert by_key["finetune/digits/transfer-fashion-mnist-s0-r01"].needs == ("prepare/digits", "imp/fashion-mnist/s0/r01")
    assert by_key["finetune/digits/scratch-none-s0-r00"].needs == ("prepare/digits",)
    # the size arm: reduced-data IMP rounds chained like IMP; results wait for all of the target's units
    assert by_key["size/digits/f0.50/s0/r01"].needs == ("size/digits/f0.50/s0/r00",)
    results = by_key["results/digits"]
    assert {k for k in keys if k.startswith(("finetune/digits/", "size/digits/"))} == set(results.needs)
    assert by_key["report"].needs == ("results/digits",)
    counts = {kind: sum(u.kind == kind for u in plan) for kind in ("imp", "size", "finetune")}
    assert counts == {"imp": 6, "size": 3, "finetune": 1 + 3 + 3}


def test_missing_ticket_outside_the_plan(tmp_path: Path) -> None:
    params = tiny(tmp_path, transfer={"arms": ["transfer"], "rounds": [5]})
    assert missing_inputs(build_plan(params), params) == [
        f"finetune/digits/transfer-fashion-mnist-s0-r05 needs "
        f"{Path(params.paths.models) / 'tickets/fashion-mnist/seed0/round05/ticket.json'}"]


def test_scheduler_feeds_imp_chains_first_and_caps_finetunes(tmp_path: Path) -> None:
    params = tiny(tmp_path, imp={"rounds": 3}, transfer={"arms": ["transfer"]})
    plan = [u for u in build_plan(params) if u.kind in ("imp", "finetune")]
    sched = Scheduler(plan, finetune_slots=3, max_retries=1)
    assert [u.key for u in sched.next_units()] == ["imp/fashion-mnist/s0/r00"]
    sched.succeeded("imp/fashion-mnist/s0/r00")
    # round 1 first; round 0's fine-tune starts now, not when the IMP job ends
    assert [u.key for u in sched.next_units()] == ["imp/fashion-mnist/s0/r01",
                                                   "finetune/digits/transfer-fashion-mnist-s0-r00"]
    sched.succeeded("imp/fashion-mnist/s0/r01")
    assert [u.key for u in sched.next_units()] == ["imp/fashion-mnist/s0/r02",
                                                   "finetune/digits/transfer-fashion-mnist-s0-r01"]
    sched.succeeded("imp/fashion-mnist/s0/r02")
    # three slots: round 3 and two fine-tunes fill them, so round 2's fine-tune waits (never the IMP round)
    assert [u.key for u in sched.next_units()] == ["imp/fashion-mnist/s0/r03"]
    assert sched.running("finetune") == 2
    sched.succeeded("finetune/digits/transfer-fashion-mnist-s0-r00")
    assert [u.key for u in sched.next_units()] == ["finetune/digits/transfer-fashion-mnist-s0-r02"]


def test_scheduler_retries_then_fails_and_holds_dependents(tmp_path: Path) -> None:
    params = tiny(tmp_path, transfer={"arms": ["transfer"]})
    plan = [u for u in build_plan(params) if u.kind in ("imp", "finetune")]
    sched = Scheduler(plan, finetune_slots=4, max_retries=1)
    (unit,) = sched.next_units()
    assert sched.errored(unit.key, "WorkerCrashedError") is True  # one retry
    assert [u.key for u in sched.next_units()] == [unit.key]
    assert sched.records[unit.key].attempts == 2
    assert sched.errored(unit.key, "WorkerCrashedError") is False
    assert sched.next_units() == [] and sched.finished_all()
    assert sched.counts()["failed"] == 1 and sched.counts()["waiting"] == len(plan) - 1
    assert "0/" in progress_line(sched, 0.0) and "1 failed" in progress_line(sched, 0.0)


def test_files_travel_by_root_relative_names(tmp_path: Path) -> None:
    params = tiny(tmp_path)
    path = Path(params.paths.models) / "tickets/x/seed0/round00/mask.safetensors"
    key = file_key(path, params)
    assert key == "models/tickets/x/seed0/round00/mask.safetensors"
    other = scratch_params(params, tmp_path / "scratch")
    assert key_path(key, other) == tmp_path / "scratch/models/tickets/x/seed0/round00/mask.safetensors"


def test_engine_section_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="engine.imp_gpus"):
        tiny(tmp_path, engine={"imp_gpus": 1.5})
    with pytest.raises(ConfigError, match="engine.kind"):
        tiny(tmp_path, engine={"kind": "slurm"})
    assert tiny(tmp_path, engine={"finetune_gpus": 0.25}).engine.finetune_gpus == 0.25


def test_address_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_local("127.0.0.1:6379") and is_local(None) and not is_local("10.0.0.5:6379")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/nonexistent/token")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(UserError, match="RAY_AUTH_MODE=token"):
        check_address("10.0.0.5:6379")
    with pytest.raises(UserError, match="no Ray head answers"):
        check_address("127.0.0.1:1")
    with pytest.raises(UserError, match="host:port"):
        check_address("nohost")


def test_unit_bigger_than_any_node(tmp_path: Path) -> None:
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    check_fits(nodes, tiny(tmp_path, engine={"imp_gpus": 1}).engine, {"imp", "finetune"})
    with pytest.raises(UserError, match=r"engine.finetune_cpus=2 / engine.finetune_gpus=0.5"):
        check_fits(nodes, tiny(tmp_path, engine={"finetune_gpus": 0.5, "finetune_cpus": 2}).engine, {"finetune"})
