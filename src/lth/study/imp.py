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
from lth.data.loader import Normalizer
from lth.data.splits import stratified_sample
from lth.data.store import PreparedDataset, load_prepared
from lth.fsutil import atomic_write_bytes
from lth.models import build_model
from lth.provenance import code_version, data_version
from lth.pruning import Mask, apply_mask, full_mask, prune_global, sparsity, sparsity_report
from lth.tickets import MASK, TICKET_JSON, TicketMeta, load_ticket, read_ticket_meta, save_ticket, ticket_dir
from lth.tracking import NullTracker, Run, Tracker, dataset_inputs
from lth.training import EpochMetrics, evaluate, fit, summary_metrics

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

    @property
    def label(self) -> str:
        """Name used in run names: the source, with the training fraction when reduced."""
        return self.source if self.train_fraction >= 1 else f"{self.source}@{self.train_fraction:g}"


def size_dir(models_root: str | Path, target: str, fraction: float, seed: int) -> Path:
    """models/size/<target>/f<fraction>/seed<s>: tickets found on a reduced training split."""
    return Path(models_root) / "size" / target / f"f{fraction:.2f}" / f"seed{seed}"


def make_job(source: str, seed: int, params: Params, *, rewind_epoch: int | None = None,
             rounds: int | None = None, out_dir: Path | None = None, train_fraction: float = 1.0) -> ImpJob:
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


def _round_dir(job: ImpJob, round_: int) -> Path:
    base = job.dense_dir if round_ == 0 else job.out_dir
    return base / f"round{round_:02d}"


def _log_epoch(run: Run):
    def log(m: EpochMetrics) -> None:
        run.log_metrics(m.as_dict(), step=m.epoch)

    return log


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
    if job.train_fraction < 1:
        return
    meta = read_ticket_meta(directory)
    name, run_params, tags = _round_run(job, meta.round, meta.sparsity, params, meta.rewind_epoch)
    tracker.ensure_registered(parent, name, directory, meta, params=run_params, tags=tags,
                              metrics=summary_metrics(meta.metrics))


def _train_round(
    job: ImpJob, round_: int, data: PreparedDataset, params: Params, tracker: Tracker, parent: Run,
    start_state: dict[str, torch.Tensor], mask: Mask, keep_epochs: list[int],
) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    """Train one round from `start_state` under `mask` and write its ticket; returns (dir, kept epochs)."""
    norm = Normalizer(data.mean, data.std)
    model = build_model(params.model, data.num_classes, job.seed)
    model.load_state_dict(start_state)
    frac = sparsity(mask)
    name, run_params, tags = _round_run(job, round_, frac, params)
    ckpt = job.out_dir / ".checkpoints" / f"round{round_:02d}.safetensors"
    with tracker.child(parent, name, params=run_params, tags=tags) as run:
        run.log_inputs(dataset_inputs(params.paths.data, data, train_fraction=job.train_fraction))
        result = fit(model, data.train, data.val, norm, params.train, seed=job.seed * 1000 + round_, mask=mask,
                     keep_epochs=keep_epochs, on_epoch=_log_epoch(run), desc=name, checkpoint=ckpt)
        model.load_state_dict(result.best_state)
        test = evaluate(model, data.test, norm, params.train)
        best = result.best
        metrics = {
            "test_acc": test.acc, "test_loss": test.loss, "sparsity": frac, "best_epoch": result.best_epoch,
            "epochs": len(result.history), "seconds": sum(m.seconds for m in result.history),
            "val_acc": best.val_acc if best else float("nan"), "val_loss": best.val_loss if best else float("nan"),
        }
        run.log_metrics(summary_metrics(metrics))
        rewind = start_state if round_ > 0 else result.kept[job.rewind_epoch]
        if round_ == 0:  # rewind points before the ticket: the round-0 ticket means the dense run is done
            for epoch, state in result.kept.items():
                atomic_write_bytes(dense_checkpoint(job, epoch), st_save({k: v.contiguous() for k, v in state.items()}))
        meta = TicketMeta(
            source=job.source, arch=params.model.name, seed=job.seed, round=round_, sparsity=frac,
            rewind_epoch=job.rewind_epoch, num_classes=data.num_classes, prunable=tuple(mask),
            pruning_rate=params.imp.pruning_rate, code_version=code_version(),
            data_version=data_version(params.paths.data, job.source), metrics=metrics,
            train_fraction=job.train_fraction,
        )
        extra = {"history.json": [m.__dict__ for m in result.history], "sparsity.json": sparsity_report(mask)}
        out = save_ticket(_round_dir(job, round_), meta, apply_mask(rewind, mask), mask,
                          trained=apply_mask(result.best_state, mask), extra_json=extra)
        if job.train_fraction >= 1:
            tracker.register_ticket(run, out, read_ticket_meta(out))  # as saved: with the files' sha256
    for p in (ckpt, ckpt.with_suffix(".json")):
        p.unlink(missing_ok=True)
    return out, result.kept


def _ensure_dense(job: ImpJob, data: PreparedDataset, params: Params, tracker: Tracker, parent: Run) -> None:
    """Round 0: the dense run, keeping its early checkpoints as rewind points."""
    need = sorted(set(range(0, max(params.imp.keep_epochs, job.rewind_epoch) + 1)))
    have_round = (_round_dir(job, 0) / MASK).is_file()
    have_ckpts = all(dense_checkpoint(job, e).is_file() for e in need)
    if have_round and have_ckpts:
        _catch_up_registration(job, _round_dir(job, 0), params, tracker, parent)
        return
    model = build_model(params.model, data.num_classes, job.seed)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    _train_round(job, 0, data, params, tracker, parent, init, full_mask(model), need)


def run_imp(job: ImpJob, params: Params, tracker: Tracker | None = None) -> list[Path]:
    """Run (or finish) an IMP job; returns the ticket directories of rounds 0..job.rounds."""
    tracker = tracker or NullTracker()
    data = load_job_data(job, params)
    job_params = flatten(params.imp, "imp") | flatten(params.train, "train") | flatten(params.model, "model")
    job_params |= {"source": job.source, "seed": job.seed, "rewind_epoch_used": job.rewind_epoch,
                   "train_fraction": job.train_fraction}
    tags = {"source": job.source, "seed": str(job.seed), "arch": params.model.name,
            "data_version": data_version(params.paths.data, job.source)}
    with tracker.job(f"imp/{job.source}", f"imp {job.label} s{job.seed}", params=job_params, tags=tags) as parent:
        parent.log_inputs(dataset_inputs(params.paths.data, data, train_fraction=job.train_fraction))
        _ensure_dense(job, data, params, tracker, parent)
        rewind = load_file(str(dense_checkpoint(job, job.rewind_epoch)))
        dirs = [_round_dir(job, 0)]
        for round_ in tqdm(range(1, job.rounds + 1), desc=f"imp {job.label} s{job.seed}", unit="round",
                           disable=None):
            out = _round_dir(job, round_)
            if (out / TICKET_JSON).is_file():
                _catch_up_registration(job, out, params, tracker, parent)
                dirs.append(out)
                continue
            prev = load_ticket(_round_dir(job, round_ - 1), with_trained=True)
            assert prev.trained is not None
            mask = prune_global(prev.trained, prev.mask, params.imp.pruning_rate)
            out, _ = _train_round(job, round_, data, params, tracker, parent, apply_mask(rewind, mask), mask, [])
            dirs.append(out)
        parent.log_metrics({"rounds_done": float(job.rounds)})
    return dirs

