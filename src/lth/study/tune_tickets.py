"""The tickets `lth tune` trains from: the source's shared dense run, one ticket per rewind epoch (cached).

models/tune/<study>/rewind<e>/ is a models root of its own (tickets/<source>/seed<s>/round<kk>), so
everything that reads a study's tickets reads these unchanged. A study's cache is valid only for the
settings it was computed under (settings.json beside it).

Parallel workers (`lth tune --engine ray --workers N`) may run on hosts that cannot see this project, so
they never compute tickets: before they start, the driver computes the ticket of every rewind epoch in
tune.rewind_epochs (ticket_files; cached here as for a serial study) and sends them as bytes with the
target's splits; each worker writes them into a scratch project of its own. So every trial of a rewind
epoch fine-tunes the very same ticket, whichever host runs it, and no shared filesystem is needed.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from lth.config import Params, flatten
from lth.errors import UserError
from lth.fsutil import atomic_write_json
from lth.study.files import Files, read_files
from lth.study.imp import dense_checkpoint, dense_done, make_job, run_imp
from lth.provenance import data_version
from lth.tickets import TICKET_JSON, load_ticket, read_ticket_meta, save_ticket, ticket_dir
from lth.tracking import Tracker

NOT_SETTINGS = ("train.device", "train.threads", "train.eval_batch_size")  # change speed, not results


def cache_dir(params: Params) -> Path:
    """models/tune/<study>/: the study's tickets, one models root per rewind epoch."""
    return Path(params.paths.models) / "tune" / params.tune.study_name


def study_settings(source: str, target: str, params: Params) -> dict[str, Any]:
    """What a trial's result depends on besides its sampled values (JSON-ready)."""
    cfg = params.tune
    found = {"source": source, "target": target, "tune.round": cfg.round, "tune.seed": cfg.seed,
             "tune.max_epochs": cfg.max_epochs, "imp.pruning_rate": params.imp.pruning_rate,
             "data.source": data_version(params.paths.data, source),
             "data.target": data_version(params.paths.data, target)}
    found |= flatten(params.model, "model") | flatten(params.train, "train")
    return json.loads(json.dumps({k: v for k, v in found.items() if k not in NOT_SETTINGS}))


def check_settings(stored: dict[str, Any], current: dict[str, Any], what: str, fix: str) -> None:
    """UserError naming the keys where `current` differs from `stored` (what was started, how to fix)."""
    changed = sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))
    if changed:
        raise UserError(f"{what} was started with other settings ({', '.join(changed[:6])}): {fix}")


def claim_cache(params: Params, settings: dict[str, Any]) -> None:
    """Record the settings of the study's ticket cache; refuse a cache computed under other settings."""
    path = cache_dir(params) / "settings.json"
    if path.is_file():  # e.g. left by a deleted study of the same name
        check_settings(json.loads(path.read_text()), settings, f"the ticket cache {cache_dir(params)}",
                       "delete it or give tune.study_name a new name")
    atomic_write_json(path, settings)


def ensure_dense(source: str, params: Params, tracker: Tracker) -> None:
    """The source's dense run (round 0 + checkpoints of every rewind epoch), trained if missing."""
    job = make_job(source, params.tune.seed, params, rounds=0)
    if not dense_done(job, params):  # keeps every rewind point of tune.rewind_epochs (check_tune_inputs)
        run_imp(job, params, tracker)


def ensure_ticket(source: str, rewind_epoch: int, params: Params, tracker: Tracker) -> Path:
    """The models root holding the round-`tune.round` ticket rewound to `rewind_epoch` (computed if missing)."""
    seed, round_ = params.tune.seed, params.tune.round
    study_ticket = ticket_dir(params.paths.models, source, seed, round_)
    if (study_ticket / TICKET_JSON).is_file() and read_ticket_meta(study_ticket).rewind_epoch == rewind_epoch:
        return Path(params.paths.models)  # `lth imp` already found this very ticket
    root = cache_dir(params) / f"rewind{rewind_epoch}"
    target = ticket_dir(root, source, seed, round_)
    if (target / TICKET_JSON).is_file():
        return root  # cached: computed by an earlier trial with this rewind epoch
    job = make_job(source, seed, params, rewind_epoch=rewind_epoch, rounds=round_, out_dir=target.parent,
                   purpose=f"tune-rewind{rewind_epoch}")
    if round_ == 0:  # the dense network itself, rewound to this trial's epoch
        dense = load_ticket(ticket_dir(params.paths.models, source, seed, 0))
        save_ticket(target, replace(dense.meta, rewind_epoch=rewind_epoch),
                    load_file(str(dense_checkpoint(job, rewind_epoch))), dense.mask)
    else:
        run_imp(job, params, tracker)  # logged apart under its purpose, never registered
    return root


def ticket_files(source: str, params: Params, tracker: Tracker) -> Files:
    """The ticket of every rewind epoch in tune.rewind_epochs (computed here if missing), as files for workers."""
    lo, hi = params.tune.rewind_epochs
    files: Files = {}
    for epoch in range(lo, hi + 1):
        root = ensure_ticket(source, epoch, params, tracker)
        files |= read_files(ticket_dir(root, source, params.tune.seed, params.tune.round), params)
    return files
