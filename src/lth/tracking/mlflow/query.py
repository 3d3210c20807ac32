"""Registry queries behind `lth tickets`: list the registered tickets, fetch the one nearest a sparsity."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion

from lth.config import Params
from lth.errors import UserError
from lth.fsutil import atomic_dir
from lth.tickets import TICKET_JSON, load_ticket
from lth.tracking.mlflow.registry import TICKET_ARTIFACTS
from lth.tracking.mlflow.store import Store, redact

DEFAULT_TOLERANCE = 0.02  # how far (in fraction pruned) the nearest ticket may be from the request
COLUMNS = ("model", "version", "source", "arch", "seed", "round", "sparsity", "alias", "run_id")


def _row(mv: ModelVersion) -> dict[str, Any]:
    tags = mv.tags or {}
    return {
        "model": mv.name, "version": int(mv.version), "source": tags.get("source", ""),
        "arch": tags.get("arch", ""), "seed": int(tags.get("seed", -1)), "round": int(tags.get("round", -1)),
        "sparsity": float(tags.get("sparsity", "nan")), "alias": "",
        "rewind_epoch": int(tags.get("rewind_epoch", -1)), "run_id": mv.run_id or "", "artifact": mv.source,
    }


def _search(store: Store, source: str | None) -> list[dict[str, Any]]:
    # Registry filters compare tag values as strings, with = and LIKE only.
    where = "name LIKE 'ticket-%'"
    if source is not None:
        if "'" in source:
            raise UserError(f"invalid source name {source!r}")
        where += f" and tags.source = '{source}'"
    rows: list[dict[str, Any]] = []
    token = None
    while True:
        page = store.call(store.client.search_model_versions, where, max_results=1000, page_token=token)
        rows.extend(_row(mv) for mv in page)
        token = page.token
        if not token:
            break
    # Versions found by search carry no aliases; the registered model lists them.
    for name in {r["model"] for r in rows}:
        aliases = store.call(store.client.get_registered_model, name).aliases or {}
        for r in rows:
            if r["model"] == name:
                r["alias"] = ",".join(sorted(a for a, v in aliases.items() if int(v) == r["version"]))
    return sorted(rows, key=lambda r: (r["source"], r["arch"], r["seed"], r["round"], r["version"]))


def list_tickets(params: Params, source: str | None = None) -> list[dict[str, Any]]:
    """Every registered ticket version (optionally of one source), as dicts with COLUMNS and `artifact`."""
    return _search(Store(params.tracking), source)


def _latest_per_ticket(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (arch, seed, round, rewind epoch): the newest version (a recomputed round supersedes)."""
    best: dict[tuple[str, int, int, int], dict[str, Any]] = {}
    for r in rows:
        key = (r["arch"], r["seed"], r["round"], r["rewind_epoch"])
        if key not in best or r["version"] > best[key]["version"]:
            best[key] = r
    return list(best.values())


def _choose(store: Store, source: str, sparsity: float, seed: int | None, arch: str | None,
            tolerance: float, rewind_epoch: int) -> dict[str, Any]:
    rows = _search(store, source)
    if not rows:
        known = sorted({r["source"] for r in _search(store, None)})
        where = f"registry at {redact(store.uri)}"
        raise UserError(f"no tickets registered for source {source!r} in the {where}; known sources: "
                        + (", ".join(known) if known else "none (run `lth imp SOURCE` first)"))
    archs = sorted({r["arch"] for r in rows})
    if arch is not None and arch not in archs:
        raise UserError(f"no {source} tickets for arch {arch!r}; available archs: {', '.join(archs)}")
    if arch is None and len(archs) > 1:
        raise UserError(f"{source} has tickets for several archs ({', '.join(archs)}): pass --arch")
    rows = [r for r in rows if r["arch"] == (arch or archs[0])]
    if seed is not None:
        seeds = sorted({r["seed"] for r in rows})
        rows = [r for r in rows if r["seed"] == seed]
        if not rows:
            raise UserError(f"no {source} tickets for seed {seed}; available seeds: {', '.join(map(str, seeds))}")
    # Tickets of other rewind epochs (e.g. from `lth tune`) are used only when the study's own are absent.
    own = [r for r in rows if r["rewind_epoch"] == rewind_epoch]
    rows = _latest_per_ticket(own or rows)
    chosen = min(rows, key=lambda r: (abs(r["sparsity"] - sparsity), r["seed"], -r["version"]))
    if abs(chosen["sparsity"] - sparsity) > tolerance:
        have = ", ".join(f"{s:.4f}" for s in sorted({r["sparsity"] for r in rows}))
        raise UserError(f"no {source} ticket within {tolerance} of sparsity {sparsity:.4f}; available "
                        f"sparsities: {have}")
    return chosen


def fetch_ticket(params: Params, source: str, sparsity: float, seed: int | None = None, arch: str | None = None,
                 *, out_dir: str | Path, tolerance: float = DEFAULT_TOLERANCE) -> tuple[Path, dict[str, Any]]:
    """Download the registered ticket nearest `sparsity` into `out_dir` (verified, atomic); returns (dir, row)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / TICKET_JSON).is_file())):
        raise UserError(f"{out} exists and is not a ticket directory; choose another output directory")
    store = Store(params.tracking)
    chosen = _choose(store, source, sparsity, seed, arch, tolerance, params.imp.rewind_epoch)
    with atomic_dir(out) as tmp:
        got = Path(store.call(store.client.download_artifacts, chosen["run_id"], TICKET_ARTIFACTS, str(tmp)))
        for item in list(got.iterdir()):
            os.replace(item, tmp / item.name)
        shutil.rmtree(got)
        ticket = load_ticket(tmp)  # checksums and shapes verified before anything appears at `out`
        pruned = sum(int((~m).sum()) for m in ticket.mask.values())
        total = sum(m.numel() for m in ticket.mask.values())
        if (ticket.meta.source, ticket.meta.seed, ticket.meta.round) != (source, chosen["seed"], chosen["round"]) \
                or abs(pruned / max(total, 1) - chosen["sparsity"]) > 1e-4:
            raise UserError(f"{chosen['model']} version {chosen['version']}: the artifact does not match its "
                            "registry tags (source/seed/round/sparsity); re-register it")
    return out, chosen
