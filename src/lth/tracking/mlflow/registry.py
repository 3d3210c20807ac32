"""The ticket registry: each ticket a version of ticket-<source>-<arch> with tags and the alias r<kk>-s<seed>."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from lth.tickets import TICKET_JSON, WEIGHTS, TicketMeta
from lth.tracking.mlflow.store import Store

TICKET_ARTIFACTS = "ticket"  # run artifact folder holding the ticket directory
WEIGHTS_TAG = "weights_sha256"  # version tag: which weights the version holds
MLMODEL = "MLmodel"  # beside the ticket files: where MLflow's UI reads a version's signature (no flavour, no pickle)
MODEL_DESCRIPTION = """Lottery tickets found by iterative magnitude pruning (IMP) with late resetting on {source} ({arch}).

A ticket is a sparse subnetwork: a binary mask over the prunable weights (every conv and linear weight but the \
classification head) and the weights rewound to an early epoch of the dense run. Each version is one ticket: \
round k of a seed keeps 0.8^k of the prunable weights; its alias is r<kk>-s<seed>. The artifact is a ticket \
directory (weights.safetensors, mask.safetensors, trained.safetensors, ticket.json; no pickle). Fetch one with \
`lth tickets fetch --source {source} --sparsity S -o DIR`.
"""


class TicketRegistry:
    """Registers tickets (upload, version, alias) and tells whether the registry already holds one."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._models: set[str] = set()  # registered models known to exist (saves a failing create per ticket)

    def holds(self, meta: TicketMeta) -> bool:
        """Whether the alias of `meta`'s round and seed names a version with the same weights."""
        return self.version_of(meta) is not None

    def version_of(self, meta: TicketMeta) -> ModelVersion | None:
        """The version the alias of `meta`'s round and seed names, if it holds the same weights; else None."""
        name = registered_model_name(meta.source, meta.arch)
        weights = meta.sha256.get(WEIGHTS, "")
        try:
            current = self.store.call(self.store.client.get_model_version_by_alias, name,
                                      ticket_alias(meta.round, meta.seed))
        except MlflowException as exc:  # no such model, or no such alias
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            return None
        registered = current.tags.get(WEIGHTS_TAG)
        if registered is None:  # registered before versions carried the tag: read its ticket.json once
            registered = self._registered_weights(current)
            if registered == weights:
                self.store.call(self.store.client.set_model_version_tag, name, current.version, WEIGHTS_TAG,
                                weights)
        return current if registered == weights else None

    def _registered_weights(self, version: Any) -> str | None:
        """The weights sha256 in a registered version's uploaded ticket.json (for versions without the tag)."""
        if not version.run_id:
            return None
        with tempfile.TemporaryDirectory(prefix="lth-ticket-") as tmp:
            try:
                got = self.store.call(self.store.client.download_artifacts, version.run_id,
                                      f"{TICKET_ARTIFACTS}/{TICKET_JSON}", tmp)
                return json.loads(Path(got).read_text()).get("sha256", {}).get(WEIGHTS)
            except (MlflowException, OSError, ValueError):
                return None

    def register(self, run_id: str, artifact_uri: str, ticket_dir: Path, meta: TicketMeta) -> None:
        """Upload `ticket_dir` under the run's `ticket/` and make it a version of ticket-<source>-<arch>."""
        client = self.store.client
        self.store.call(client.log_artifacts, run_id, str(ticket_dir), TICKET_ARTIFACTS)
        with tempfile.TemporaryDirectory(prefix="lth-mlmodel-") as tmp:
            mlmodel = Path(tmp) / MLMODEL
            mlmodel.write_text(yaml.safe_dump({"signature": ticket_signature(meta).to_dict()}, sort_keys=False))
            self.store.call(client.log_artifact, run_id, str(mlmodel), TICKET_ARTIFACTS)
        name = registered_model_name(meta.source, meta.arch)
        if name not in self._models:
            description = MODEL_DESCRIPTION.format(source=meta.source, arch=meta.arch)
            try:
                self.store.call(client.create_registered_model, name, description=description)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # an earlier ticket (or another job) created it
                    raise
                # once per model and process: models registered before descriptions explained tickets get one
                self.store.call(client.update_registered_model, name, description=description)
            self._models.add(name)

        def made() -> ModelVersion | None:  # a try whose answer was lost: the version it made (one per run)
            versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'", max_results=1)
            return versions[0] if versions else None

        version = self.store.create(client.create_model_version, made, name,
                                    source=f"{artifact_uri.rstrip('/')}/{TICKET_ARTIFACTS}",
                                    run_id=run_id, tags=version_tags(meta), description=version_description(meta))
        # MlflowClient.set_registered_model_alias first loads the whole registered model (every version) to
        # check it is not a prompt, which ticket-* models never are: the registry client skips that read, the
        # costliest part of registering a ticket. The public call stays the fallback.
        registry = getattr(client, "_get_registry_client", None)
        set_alias = registry().set_registered_model_alias if registry else client.set_registered_model_alias
        self.store.call(set_alias, name, ticket_alias(meta.round, meta.seed), version.version)


def registered_model_name(source: str, arch: str) -> str:
    """ticket-<source>-<arch>."""
    return f"ticket-{source}-{arch}"


def ticket_alias(round_: int, seed: int) -> str:
    """r<kk>-s<seed>."""
    return f"r{round_:02d}-s{seed}"


def version_tags(meta: TicketMeta) -> dict[str, str]:
    """Registry tags of a ticket version (strings: registry filters compare strings with = and LIKE)."""
    return {"source": meta.source, "arch": meta.arch, "seed": str(meta.seed), "round": str(meta.round),
            "sparsity": f"{meta.sparsity:.4f}", "rewind_epoch": str(meta.rewind_epoch),
            "data_version": meta.data_version, "code_version": meta.code_version,
            WEIGHTS_TAG: meta.sha256.get(WEIGHTS, "")}


def ticket_signature(meta: TicketMeta) -> ModelSignature:
    """Input: normalised float32 images [batch, 3, H, W] (any size: the networks pool globally); output: logits."""
    # Prepared data is always 3-channel; H and W are free because every network ends in global average pooling.
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype("float32"), (-1, 3, -1, -1), "images")]),
                          outputs=Schema([TensorSpec(np.dtype("float32"), (-1, meta.num_classes),
                                                     f"logits over the {meta.num_classes} classes of {meta.source}")]))


def version_description(meta: TicketMeta) -> str:
    """What this ticket is and how to load it (the version's description in MLflow's UI)."""
    acc = meta.metrics.get("test_acc")
    trained = f" Trained, it reached test accuracy {acc:.4f} on {meta.source}." if isinstance(acc, float) else ""
    out = f"tickets/{meta.source}-s{meta.seed}-r{meta.round:02d}"
    return f"""Ticket of {meta.arch} found on **{meta.source}**, seed {meta.seed}, IMP round {meta.round}: \
{meta.sparsity:.2%} of the prunable weights pruned, the rest rewound to epoch {meta.rewind_epoch} of the dense \
run (late resetting).{trained} Alias `{ticket_alias(meta.round, meta.seed)}`.

Load it with the CLI (verified against its sha256s):

    lth tickets fetch --source {meta.source} --seed {meta.seed} --sparsity {meta.sparsity:.4f} -o {out}

and in Python:

    from lth.tickets import load_ticket
    ticket = load_ticket("{out}", with_trained=True)  # .meta, .weights (rewound), .mask, .trained
"""
