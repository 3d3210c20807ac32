"""The study as a plan: params -> units of work (plain frozen data) and what each needs before it can run.

Units: `prepare` per dataset; `imp` per (source, seed, round), round r needing round r-1 (round 0 is the
dense run that writes the rewind points); `finetune` per entry of lth.study.transfer.plan, needing only
its ticket's round; `size` rounds (the size arm's reduced-data IMP), chained like `imp`; `results` per
target (assembles the CSV once its fine-tunes and size rounds are done); the `report`. Every executor runs
this same plan; a unit is idempotent: its output, written atomically, means done.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from lth.config import Params
from lth.data.store import DATASET_JSON, prepared_dir
from lth.study.imp import ImpJob, make_job, round_dir, round_outputs
from lth.study.transfer import FineTune, plan as finetune_plan, results_csv, results_dir, size_jobs
from lth.tickets import TICKET_JSON

KINDS = ("prepare", "imp", "size", "finetune", "results", "report")
TRAINING = ("imp", "size", "finetune")  # the kinds that train (executors may send them to other hosts)


@dataclass(frozen=True)
class Unit:
    """One unit of work: its kind, identity and the keys of the units it needs."""

    kind: str
    key: str  # unique in a plan, e.g. imp/fashion-mnist/s0/r01
    needs: tuple[str, ...] = ()
    dataset: str = ""  # prepare: the dataset; imp/size: the source; finetune/results: the target
    seed: int = 0
    round: int = 0
    train_fraction: float = 1.0  # size rounds: the reduced training fraction
    finetune: FineTune | None = None

    def job(self, params: Params) -> ImpJob:
        """The IMP job an imp/size round belongs to."""
        return make_job(self.dataset, self.seed, params, train_fraction=self.train_fraction)


def _rounds(kind: str, source: str, seed: int, fraction: float, rounds: int, prep: str) -> list[Unit]:
    prefix = f"{kind}/{source}" + (f"/f{fraction:.2f}" if kind == "size" else "") + f"/s{seed}"
    return [Unit(kind, f"{prefix}/r{r:02d}", (prep,) if r == 0 else (f"{prefix}/r{r - 1:02d}",), source, seed, r,
                 fraction) for r in range(rounds + 1)]


def imp_key(source: str, seed: int, round_: int) -> str:
    """Key of the study's IMP round (the one that writes models/tickets/<source>/seed<s>/round<kk>)."""
    return f"imp/{source}/s{seed}/r{round_:02d}"


def build_plan(params: Params) -> list[Unit]:
    """Every unit of the study, each after the units it needs (so the list is also a serial order)."""
    prep = {name: f"prepare/{name}" for name in params.prepare.datasets}
    units = [Unit("prepare", key, (), name) for name, key in prep.items()]
    t = params.transfer
    fts = {target: finetune_plan(target, params, t.arms) for target in t.targets}
    # imp.sources x imp.seeds, and every (source, seed) a planned fine-tune takes a ticket from
    jobs = dict.fromkeys([*((s, seed) for s in params.imp.sources for seed in params.imp.seeds),
                          *((ft.source, ft.seed) for todo in fts.values() for ft in todo if ft.arm != "scratch")])
    for source, seed in jobs:
        units += _rounds("imp", source, seed, 1.0, params.imp.rounds, prep.get(source, ""))
    for target in t.targets:
        for ft in fts[target]:
            needs = (prep.get(target, ""),) if ft.arm == "scratch" else (
                prep.get(target, ""), imp_key(ft.source, ft.seed, ft.round))
            units.append(Unit("finetune", f"finetune/{target}/{ft.key}", needs, target, ft.seed, ft.round,
                              finetune=ft))
        size = []
        if "size" in t.arms:
            for job in size_jobs(target, params):
                size += _rounds("size", target, job.seed, job.train_fraction, job.rounds, prep.get(target, ""))
        units += size
        units.append(Unit("results", f"results/{target}", tuple(u.key for u in units
                                                                 if u.dataset == target and u.kind in ("finetune", "size")),
                          target))
    units.append(Unit("report", "report", tuple(u.key for u in units if u.kind == "results")))
    keys = {u.key for u in units}
    return [_drop_unknown_needs(u, keys) for u in units]


def _drop_unknown_needs(unit: Unit, keys: set[str]) -> Unit:
    """A dataset prepared outside this plan (not in prepare.datasets) is an input, not a unit."""
    needs = tuple(n for n in unit.needs if n in keys)
    return unit if needs == unit.needs else Unit(unit.kind, unit.key, needs, unit.dataset, unit.seed, unit.round,
                                                 unit.train_fraction, unit.finetune)


def missing_inputs(plan: list[Unit], params: Params) -> list[str]:
    """Tickets a fine-tune needs that the plan does not make (a round past imp.rounds) and that are not on disk."""
    keys = {u.key for u in plan}
    missing = []
    for u in plan:
        ft = u.finetune
        if ft is not None and ft.arm != "scratch" and imp_key(ft.source, ft.seed, ft.round) not in keys:
            path = round_dir(make_job(ft.source, ft.seed, params), ft.round) / TICKET_JSON
            if not path.is_file():
                missing.append(f"{u.key} needs {path}")
    return missing


def outputs(unit: Unit, params: Params) -> list[Path]:
    """What a unit writes; all of them present means the unit is done."""
    if unit.kind == "prepare":
        return [prepared_dir(params.paths.data, unit.dataset) / DATASET_JSON]
    if unit.kind in ("imp", "size"):
        return round_outputs(unit.job(params), unit.round, params)
    if unit.kind == "finetune":
        assert unit.finetune is not None
        return [finetune_row_path(unit.finetune, params)]
    if unit.kind == "results":
        return [results_csv(params, unit.dataset)]
    return [Path(params.paths.reports) / "index.html"]


def finetune_row_path(ft: FineTune, params: Params) -> Path:
    """results/transfer/<target>/runs/<key>.json: the fine-tune's result row."""
    return results_dir(params, ft.target) / "runs" / f"{ft.key}.json"


def is_done(unit: Unit, params: Params) -> bool:
    """Whether every output exists (a ticket directory counts once its ticket.json is in it)."""
    if unit.kind in ("results", "report"):
        return False  # cheap and derived from the others: always redone, so they never go stale
    for path in outputs(unit, params):
        if unit.kind in ("imp", "size") and path == round_dir(unit.job(params), unit.round):
            path = path / TICKET_JSON
        if not path.is_file():
            return False
    return True


def ready(units: Iterable[Unit], done: set[str]) -> list[Unit]:
    """The units not done whose needs are all done, in plan order."""
    return [u for u in units if u.key not in done and all(n in done for n in u.needs)]
