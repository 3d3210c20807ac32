"""The study's arms on one target: scratch, transferred tickets, the target's own tickets and the controls.

Every fine-tune is an idempotent step: its result row is written atomically to
results/transfer/<target>/runs/<key>.json, so a rerun skips what is done; the CSV is assembled at the end.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch
from tqdm.auto import tqdm

from lth.config import Params, arm_rounds, flatten
from lth.data.registry import get_spec
from lth.data.store import PreparedDataset, load_prepared, read_dataset_meta
from lth.errors import UserError
from lth.fsutil import atomic_write_json, atomic_write_text
from lth.study.imp import ImpJob, make_job, round_dir, run_imp
from lth.models import build_model, replace_head
from lth.pruning import apply_mask, full_mask, sparsity
from lth.tickets import TicketMeta, load_ticket, read_ticket_meta, ticket_dir
from lth.tracking import NullTracker, Run, Tracker, dataset_inputs
from lth.study.step import Step, StepResult, run_step

COLUMNS = [
    "target", "arm", "source", "seed", "round", "fraction_pruned", "size_fraction",
    "test_acc", "test_loss", "val_acc", "val_loss", "best_epoch", "epochs", "seconds",
]
TICKET_ARMS = ("transfer", "target", "reinit", "trained", "related")  # arms that start from a ticket


@dataclass(frozen=True)
class FineTune:
    """One fine-tune of the study: which arm, whose ticket (source, seed, round)."""

    target: str
    arm: str
    source: str
    seed: int
    round: int

    @property
    def key(self) -> str:
        """File-name-safe identity, e.g. transfer-fashion-mnist-s0-r03."""
        return f"{self.arm}-{self.source or 'none'}-s{self.seed}-r{self.round:02d}"

    @property
    def fit_seed(self) -> int:
        """Seed of the fine-tune's batches and new head: a pure function of its identity."""
        return zlib.crc32(f"{self.target}/{self.key}".encode()) % (2**31)


def result_row(target: str, arm: str, source: str, seed: int, round_: int, size_fraction: float,
               metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One row of results/transfer/<target>.csv: the fine-tune's identity and its end metrics, in COLUMNS order."""
    found = {"target": target, "arm": arm, "source": source, "seed": seed, "round": round_,
             "size_fraction": size_fraction, **metrics}
    return {k: found[k] for k in COLUMNS}


def results_dir(params: Params, target: str) -> Path:
    """results/transfer/<target>/ (one JSON per fine-tune under runs/)."""
    return Path(params.paths.results) / "transfer" / target


def results_csv(params: Params, target: str) -> Path:
    """results/transfer/<target>.csv: the assembled rows."""
    return Path(params.paths.results) / "transfer" / f"{target}.csv"


def plan(target: str, params: Params, arms: tuple[str, ...]) -> list[FineTune]:
    """Every fine-tune of `arms` on `target` (the `size` arm is an IMP job, planned separately)."""
    t = params.transfer
    related = [p.source for p in t.related if p.target == target]
    todo: list[FineTune] = []
    for seed in t.seeds:
        if "scratch" in arms:
            todo.append(FineTune(target, "scratch", "", seed, 0))
        for arm in TICKET_ARMS:
            if arm not in arms:
                continue
            sources = {"transfer": t.sources, "trained": t.sources, "target": (target,), "reinit": (target,),
                       "related": related}[arm]
            for source in sources:
                for r in arm_rounds(params, arm):
                    todo.append(FineTune(target, arm, source, seed, r))
    return todo


def check_transfer_inputs(target: str, params: Params, todo: list[FineTune]) -> None:
    """Fail before any training: unknown datasets, unprepared target, missing tickets."""
    get_spec(target)
    read_dataset_meta(params.paths.data, target)
    for pair in params.transfer.related:
        get_spec(pair.source)
        get_spec(pair.target)
    for ft in todo:
        if ft.arm == "scratch":
            continue
        d = ticket_dir(params.paths.models, ft.source, ft.seed, ft.round)
        if not (d / "ticket.json").is_file():
            raise UserError(
                f"no ticket for source {ft.source!r} seed {ft.seed} round {ft.round} ({d} missing): "
                f"run `lth imp {ft.source} --seed {ft.seed}` (imp.rounds >= {ft.round})"
            )
        arch = read_ticket_meta(d).arch
        if arch != params.model.name:
            raise UserError(f"{d}: ticket is for arch {arch!r}, the study uses {params.model.name!r} (model.*)")
    # Checksums and shapes of every ticket now, not after hours of fine-tuning the ones before a corrupt one.
    trained: dict[Path, bool] = {}
    for ft in todo:
        if ft.arm != "scratch":
            d = ticket_dir(params.paths.models, ft.source, ft.seed, ft.round)
            trained[d] = trained.get(d, False) or ft.arm == "trained"
    for d, with_trained in trained.items():
        load_ticket(d, with_trained=with_trained)


def initial_network(ft: FineTune, data: PreparedDataset, params: Params) -> tuple[torch.nn.Module, dict]:
    """The network an arm starts from, and its mask (all True for scratch)."""
    if ft.arm == "scratch":
        model = build_model(params.model, data.num_classes, ft.fit_seed)
        return model, full_mask(model)
    ticket_path = ticket_dir(params.paths.models, ft.source, ft.seed, ft.round)
    ticket = load_ticket(ticket_path, with_trained=ft.arm == "trained")
    meta: TicketMeta = ticket.meta
    if meta.arch != params.model.name:
        raise UserError(f"{ticket_path}: ticket is for arch {meta.arch!r}, the study uses {params.model.name!r}")
    if ft.arm == "reinit":
        model = build_model(params.model, data.num_classes, ft.fit_seed)
        model.load_state_dict(apply_mask(model.state_dict(), ticket.mask))
        return model, ticket.mask
    model = build_model(params.model, meta.num_classes, 0)
    weights = ticket.trained if ft.arm == "trained" else ticket.weights
    assert weights is not None
    model.load_state_dict(weights)
    if ft.arm != "target":  # a ticket from another dataset gets a new, seeded, random head
        replace_head(model, data.num_classes, ft.fit_seed)
    return model, ticket.mask


def run_finetune(ft: FineTune, data: PreparedDataset, params: Params, tracker: Tracker, parent: Run,
                 save_to: Path | None = None) -> dict:
    """Fine-tune one arm's network on the target; returns its result row (also written to `save_to`)."""
    model, mask = initial_network(ft, data, params)
    frac = sparsity(mask)
    tags = {"target": ft.target, "arm": ft.arm, "source": ft.source, "seed": str(ft.seed),
            "round": str(ft.round), "sparsity": f"{frac:.4f}"}
    step = Step(f"transfer {ft.target} {ft.arm} {ft.source or '-'} s{ft.seed} r{ft.round:02d}",
                {"arm": ft.arm, "source": ft.source, "round": ft.round, "fit_seed": ft.fit_seed}, tags,
                seed=ft.fit_seed, mask=mask,
                checkpoint=results_dir(params, ft.target) / ".checkpoints" / f"{ft.key}.safetensors",
                lr=params.transfer.lr, max_epochs=params.transfer.max_epochs, extra={"fraction_pruned": frac},
                ticket=None if ft.arm == "scratch" else read_ticket_meta(
                    ticket_dir(params.paths.models, ft.source, ft.seed, ft.round)))

    def save(run: Run, done: StepResult | None) -> dict:
        assert done is not None
        row = result_row(ft.target, ft.arm, ft.source, ft.seed, ft.round, 1.0, done.metrics)
        if save_to is not None:  # inside the run: a kill now leaves a run marked FAILED, never a second FINISHED one
            atomic_write_json(save_to, row)
        return row

    return run_step(tracker, parent, model, data, params, step, save)


def size_jobs(target: str, params: Params) -> list[ImpJob]:
    """The `size` arm's IMP jobs: the target's tickets found on each reduced training fraction, per seed."""
    return [make_job(target, seed, params, train_fraction=fraction)
            for fraction in params.transfer.size_fractions for seed in params.transfer.seeds]


def _size_rows(target: str, params: Params) -> list[dict]:
    """The `size` arm's rows: its tickets' own (trained and tested) metrics, read from their ticket.json."""
    rows = []
    for job in size_jobs(target, params):
        for r in range(job.rounds + 1):
            meta = read_ticket_meta(round_dir(job, r))
            if meta.round not in arm_rounds(params, "size"):
                continue
            rows.append(result_row(target, "size", target, job.seed, meta.round, job.train_fraction,
                                   {**meta.metrics, "fraction_pruned": meta.sparsity}))
    return rows


def write_results_csv(target: str, params: Params, arms: tuple[str, ...]) -> Path:
    """Assemble results/transfer/<target>.csv from the finished units' rows on disk (every executor ends here)."""
    runs_dir = results_dir(params, target) / "runs"
    rows = [json.loads((runs_dir / f"{ft.key}.json").read_text()) for ft in plan(target, params, arms)]
    if "size" in arms:
        rows.extend(_size_rows(target, params))
    # dvc.yaml declares models/size/<target> as an out, so it must exist even when the size arm is off
    (Path(params.paths.models) / "size" / target).mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows, columns=COLUMNS).sort_values(["arm", "source", "size_fraction", "seed", "round"])
    csv = results_csv(params, target)
    atomic_write_text(csv, frame.to_csv(index=False, float_format="%.6g"))
    return csv


def run_transfer(target: str, params: Params, tracker: Tracker | None = None,
                 arms: tuple[str, ...] | None = None) -> Path:
    """Run (or finish) every configured arm on `target`; returns the results CSV."""
    tracker = tracker or NullTracker()
    arms = arms or params.transfer.arms
    todo = plan(target, params, arms)
    check_transfer_inputs(target, params, todo)
    data = load_prepared(params.paths.data, target)
    runs_dir = results_dir(params, target) / "runs"
    experiment, name, job_params, tags = job_run(target, params)
    with tracker.job(experiment, name, params=job_params, tags=tags) as parent:
        parent.log_inputs(dataset_inputs(params.paths.data, data))
        for ft in tqdm(todo, desc=f"transfer {target}", unit="run", disable=None):
            out = runs_dir / f"{ft.key}.json"
            if not out.is_file():
                run_finetune(ft, data, params, tracker, parent, save_to=out)
        if "size" in arms:
            for job in size_jobs(target, params):
                run_imp(job, params, tracker)
    return write_results_csv(target, params, arms)


def job_run(target: str, params: Params) -> tuple[str, str, dict, dict[str, str]]:
    """Experiment, name, params and tags of a target's transfer parent MLflow run."""
    job_params = flatten(params.transfer, "transfer") | flatten(params.train, "train") | {"target": target}
    return f"transfer/{target}", f"transfer {target}", job_params, {"target": target, "arch": params.model.name}
