"""Iterative magnitude pruning with late resetting: train dense, then prune -> rewind -> train, round by round.

Each round is an idempotent step whose output (a ticket directory) is written last and atomically, so
rerunning a killed job continues at the first missing round.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save as st_save
from tqdm.auto import tqdm

from lth.config import Params, flatten
from lth.data.splits import stratified_sample
from lth.data.store import PreparedDataset, load_prepared
from lth.fsutil import atomic_write_bytes
from lth.models import build_model
from lth.provenance import code_version, data_version
from lth.pruning import Mask, apply_mask, full_mask, prune_global, sparsity, sparsity_report
from lth.tickets import MASK, TICKET_JSON, TicketMeta, load_ticket, read_ticket_meta, save_ticket, ticket_dir
from lth.tracking import NullTracker, Run, Tracker, dataset_inputs
from lth.study.step import Step, StepResult, end_metrics, run_step

DENSE = "dense"  # <seed dir>/dense/epochNN.safetensors: the dense run's early checkpoints (rewind points)


@dataclass(frozen=True)
class ImpJob:
    """One IMP job: a source dataset and a seed, with where its tickets go."""

    source: str
    seed: int
    out_dir: Path  # <models>/tickets/<source>/seed<s>
    rewind_epoch: int
    rounds: int
    dense_dir: Path  # where round 0 and the dense checkpoints live (shared across rewind epochs)
    train_fraction: float = 1.0  # < 1: tickets found on a stratified fraction of the training split
    purpose: str = ""  # e.g. "tune-rewind3": tickets for another use, logged apart and never registered

    @property
    def registers(self) -> bool:
        """Whether its tickets go to the registry: the study's own tickets only (full data, no other purpose)."""
        return self.train_fraction >= 1 and not self.purpose

    @property
    def label(self) -> str:
        """Name used in run names: the source, with the training fraction when reduced."""
        return self.source if self.train_fraction >= 1 else f"{self.source}@{self.train_fraction:g}"


def size_dir(models_root: str | Path, target: str, fraction: float, seed: int) -> Path:
    """models/size/<target>/f<fraction>/seed<s>: tickets found on a reduced training split."""
    return Path(models_root) / "size" / target / f"f{fraction:.2f}" / f"seed{seed}"


def make_job(source: str, seed: int, params: Params, *, rewind_epoch: int | None = None,
             rounds: int | None = None, out_dir: Path | None = None, train_fraction: float = 1.0,
             purpose: str = "") -> ImpJob:
    """The job for `source` and `seed`; `out_dir` lets `lth tune` keep per-rewind-epoch tickets elsewhere."""
    home = ticket_dir(params.paths.models, source, seed, 0).parent
    if train_fraction < 1:
        home = size_dir(params.paths.models, source, train_fraction, seed)
    return ImpJob(
        source=source,
        seed=seed,
        out_dir=out_dir or home,
        rewind_epoch=params.imp.rewind_epoch if rewind_epoch is None else rewind_epoch,
        rounds=params.imp.rounds if rounds is None else rounds,
        dense_dir=home,
        train_fraction=train_fraction,
        purpose=purpose,
    )


def load_job_data(job: ImpJob, params: Params) -> PreparedDataset:
    """The source's prepared data, its training split reduced to `job.train_fraction` (stratified, seeded)."""
    data = load_prepared(params.paths.data, job.source)
    if job.train_fraction >= 1:
        return data
    labels = data.train.labels.numpy()
    keep = stratified_sample(labels, max(1, round(job.train_fraction * len(labels))),
                             np.random.default_rng(job.seed))
    return replace(data, splits={**data.splits, "train": data.train.subset(keep)})


def dense_checkpoint(job: ImpJob, epoch: int) -> Path:
    """Path of the dense run's weights after `epoch` epochs."""
    return job.dense_dir / DENSE / f"epoch{epoch:02d}.safetensors"


def rewind_points(params: Params, rewind_epoch: int) -> list[int]:
    """The dense epochs whose weights the dense run keeps: 0..max(imp.keep_epochs, rewind_epoch)."""
    return list(range(0, max(params.imp.keep_epochs, rewind_epoch) + 1))


def dense_done(job: ImpJob, params: Params) -> bool:
    """Whether the job's dense run is complete: its round-0 ticket and every rewind point are on disk."""
    return (round_dir(job, 0) / MASK).is_file() and all(
        dense_checkpoint(job, e).is_file() for e in rewind_points(params, job.rewind_epoch))


def round_dir(job: ImpJob, round_: int) -> Path:
    """Where round `round_`'s ticket lives (round 0, the dense run, in the job's dense_dir)."""
    base = job.dense_dir if round_ == 0 else job.out_dir
    return base / f"round{round_:02d}"


def _round_run(job: ImpJob, round_: int, frac: float, params: Params,
               rewind_epoch: int | None = None) -> tuple[str, dict, dict[str, str]]:
    """Name, params and tags of a round's nested MLflow run (rewind epoch: the job's unless given)."""
    rewind = job.rewind_epoch if rewind_epoch is None else rewind_epoch
    tags = {"source": job.source, "seed": str(job.seed), "round": str(round_), "arch": params.model.name,
            "train_fraction": f"{job.train_fraction:g}",
            "sparsity": f"{frac:.4f}", "rewind_epoch": str(rewind)}
    return f"imp {job.label} s{job.seed} r{round_:02d}", {"round": round_, "sparsity": round(frac, 6)}, tags


def _catch_up_registration(job: ImpJob, directory: Path, params: Params, tracker: Tracker, parent: Run) -> None:
    """A ticket a killed try wrote but may not have registered: register it unless the registry has it."""
    if not job.registers:
        return
    meta = read_ticket_meta(directory)
    name, run_params, tags = _round_run(job, meta.round, meta.sparsity, params, meta.rewind_epoch)
    tracker.ensure_registered(parent, name, directory, meta, params=run_params, tags=tags,
                              metrics=end_metrics(meta.metrics))


def _train_round(
    job: ImpJob, round_: int, data: PreparedDataset, params: Params, tracker: Tracker, parent: Run,
    start_state: dict[str, torch.Tensor], mask: Mask, keep_epochs: list[int],
) -> Path:
    """Train one round from `start_state` under `mask` and write its ticket (round 0: and the rewind points)."""
    model = build_model(params.model, data.num_classes, job.seed)
    model.load_state_dict(start_state)
    frac = sparsity(mask)
    name, run_params, tags = _round_run(job, round_, frac, params)
    step = Step(name, run_params, tags, seed=job.seed * 1000 + round_, mask=mask,
                checkpoint=job.out_dir / ".checkpoints" / f"round{round_:02d}.safetensors",
                keep_epochs=tuple(keep_epochs), extra={"sparsity": frac},
                train_fraction=job.train_fraction)

    def save(run: Run, done: StepResult | None) -> Path:
        assert done is not None
        result = done.fit
        rewind = start_state if round_ > 0 else result.kept[job.rewind_epoch]
        if round_ == 0:  # rewind points before the ticket: the round-0 ticket means the dense run is done
            for epoch, state in result.kept.items():
                atomic_write_bytes(dense_checkpoint(job, epoch), st_save({k: v.contiguous() for k, v in state.items()}))
        meta = TicketMeta(
            source=job.source, arch=params.model.name, seed=job.seed, round=round_, sparsity=frac,
            rewind_epoch=job.rewind_epoch, num_classes=data.num_classes, prunable=tuple(mask),
            pruning_rate=params.imp.pruning_rate, code_version=code_version(),
            data_version=data_version(params.paths.data, job.source), metrics=done.metrics,
            train_fraction=job.train_fraction,
        )
        extra = {"history.json": [m.__dict__ for m in result.history], "sparsity.json": sparsity_report(mask)}
        out = save_ticket(round_dir(job, round_), meta, apply_mask(rewind, mask), mask,
                          trained=apply_mask(result.best_state, mask), extra_json=extra)
        if job.registers:
            tracker.register_ticket(run, out, read_ticket_meta(out))  # as saved: with the files' sha256
        return out

    return run_step(tracker, parent, model, data, params, step, save)


def _ensure_dense(job: ImpJob, data: PreparedDataset, params: Params, tracker: Tracker, parent: Run) -> None:
    """Round 0: the dense run, keeping its early checkpoints as rewind points."""
    if dense_done(job, params):
        _catch_up_registration(job, round_dir(job, 0), params, tracker, parent)
        return
    model = build_model(params.model, data.num_classes, job.seed)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    _train_round(job, 0, data, params, tracker, parent, init, full_mask(model), rewind_points(params, job.rewind_epoch))


def round_inputs(job: ImpJob, round_: int, params: Params) -> list[Path]:
    """Files and ticket directories round `round_` reads besides the prepared data (round 0: none)."""
    if round_ == 0:
        return []
    return [dense_checkpoint(job, job.rewind_epoch), round_dir(job, round_ - 1)]


def round_outputs(job: ImpJob, round_: int, params: Params) -> list[Path]:
    """What round `round_` writes, the ticket directory last (round 0: the rewind points before it)."""
    points = [dense_checkpoint(job, e) for e in rewind_points(params, job.rewind_epoch)] if round_ == 0 else []
    return [*points, round_dir(job, round_)]


def job_run(job: ImpJob, params: Params) -> tuple[str, str, dict, dict[str, str]]:
    """Experiment, name, params and tags of the job's parent MLflow run."""
    job_params = flatten(params.imp, "imp") | flatten(params.train, "train") | flatten(params.model, "model")
    job_params |= {"source": job.source, "seed": job.seed, "rewind_epoch_used": job.rewind_epoch,
                   "train_fraction": job.train_fraction}
    tags = {"source": job.source, "seed": str(job.seed), "arch": params.model.name,
            "data_version": data_version(params.paths.data, job.source)}
    name = f"imp {job.label} s{job.seed}" + (f" {job.purpose}" if job.purpose else "")
    if job.purpose:  # named apart, so it is not mistaken for the study's IMP job
        tags |= {"lth.purpose": job.purpose}
    return f"imp/{job.source}", name, job_params, tags


def imp_round(job: ImpJob, round_: int, data: PreparedDataset, params: Params, tracker: Tracker,
              parent: Run) -> Path:
    """Run (or catch up) one round: 0 is the dense run; r prunes round r-1's trained weights and rewinds.

    Needs only round r-1's ticket and the rewind checkpoint on disk, so each round is a unit of work alone.
    """
    if round_ == 0:
        _ensure_dense(job, data, params, tracker, parent)
        return round_dir(job, 0)
    out = round_dir(job, round_)
    if (out / TICKET_JSON).is_file():
        _catch_up_registration(job, out, params, tracker, parent)
        return out
    rewind = load_file(str(dense_checkpoint(job, job.rewind_epoch)))
    prev = load_ticket(round_dir(job, round_ - 1), with_trained=True)
    assert prev.trained is not None
    mask = prune_global(prev.trained, prev.mask, params.imp.pruning_rate)
    return _train_round(job, round_, data, params, tracker, parent, apply_mask(rewind, mask), mask, [])


def run_imp(job: ImpJob, params: Params, tracker: Tracker | None = None) -> list[Path]:
    """Run (or finish) an IMP job, the local executor's loop over imp_round; returns rounds 0..job.rounds."""
    tracker = tracker or NullTracker()
    data = load_job_data(job, params)
    experiment, name, job_params, tags = job_run(job, params)
    with tracker.job(experiment, name, params=job_params, tags=tags) as parent:
        parent.log_inputs(dataset_inputs(params.paths.data, data, train_fraction=job.train_fraction))
        dirs = [imp_round(job, 0, data, params, tracker, parent)]
        for round_ in tqdm(range(1, job.rounds + 1), desc=f"imp {job.label} s{job.seed}", unit="round",
                           disable=None):
            dirs.append(imp_round(job, round_, data, params, tracker, parent))
        parent.log_metrics({"rounds_done": float(job.rounds)})
    return dirs
