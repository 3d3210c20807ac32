"""One MLflow run with buffered metrics, and MLflow's size limits."""

from __future__ import annotations

import json
import time
from typing import Any, Mapping, Sequence

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

from lth.tickets import WEIGHTS, TicketMeta
from lth.tracking.inputs import DataInput
from lth.tracking.mlflow.registry import TicketRegistry, ticket_alias
from lth.tracking.mlflow.store import Store, _chunks

MAX_PARAM_LEN, MAX_TAG_LEN = 6000, 8000  # MLflow's value limits
METRICS_PER_BATCH, PARAMS_TAGS_PER_BATCH = 1000, 100  # MLflow's log_batch limits
CONTEXT_TAG = "mlflow.data.context"  # the input tag MLflow's UI shows beside a dataset (train, validation...)
TICKET_TAG = "lth.ticket"  # on a fine-tune: models:/ticket-<source>-<arch>/<version> it started from


class MlflowRun:
    """One MLflow run addressed by id; metrics are buffered and sent with log_batch."""

    def __init__(self, store: Store, info: Any, *, tags: Mapping[str, str],
                 flush_every: int = 500, flush_seconds: float = 10.0, fresh: bool = False) -> None:
        self.store = store
        self.run_id: str | None = info.run_id
        self.experiment_id: str = info.experiment_id
        self.artifact_uri: str = info.artifact_uri
        self.fresh = fresh  # created by this process: nothing logged yet, so no need to read it back
        self.tags = dict(tags)  # the job's own tags, inherited by its nested runs
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._metrics: list[Metric] = []
        self._params: list[Param] = []  # a fresh run's params ride along with its next metrics batch
        self._last_flush = time.monotonic()
        self._last_step = 0

    def log_params(self, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> None:
        """Log params once (values stringified, cut to MLflow's limit) and `tags`, in as few calls as possible.

        A fresh run's params are sent with its next metrics batch (at most `flush_seconds` later), which
        saves one store round trip per run; a reused run skips the keys it already has.
        """
        have = {} if self.fresh else self.store.call(self.store.client.get_run, self.run_id).data.params
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items() if k not in have]
        if self.fresh and not tags:
            self._params.extend(items)
            return
        tag_items = [RunTag(k, str(v)[:MAX_TAG_LEN]) for k, v in (tags or {}).items()]
        for i in range(0, max(len(items), len(tag_items)), PARAMS_TAGS_PER_BATCH):
            self.store.call(self.store.client.log_batch, self.run_id, params=items[i:i + PARAMS_TAGS_PER_BATCH],
                            tags=tag_items[i:i + PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Buffer metrics; they are sent every `flush_every` values or `flush_seconds`, and at run end."""
        # Without a step, a value is a summary: log it at the last step so it becomes the run's latest value.
        step = self._last_step if step is None else step
        self._last_step = max(self._last_step, step)
        ts = int(time.time() * 1000)
        self._metrics.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        if len(self._metrics) >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Queue buffered metrics (and a fresh run's params) for the writer thread, in MLflow's batch sizes."""
        metrics, self._metrics = self._metrics, []
        params, self._params = self._params, []
        for i in range(max(-(-len(metrics) // METRICS_PER_BATCH), -(-len(params) // PARAMS_TAGS_PER_BATCH))):
            self.store.call_later(self.store.client.log_batch, self.run_id,
                            metrics=metrics[i * METRICS_PER_BATCH:(i + 1) * METRICS_PER_BATCH],
                            params=params[i * PARAMS_TAGS_PER_BATCH:(i + 1) * PARAMS_TAGS_PER_BATCH])
        self._last_flush = time.monotonic()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Queue tags (values cut to MLflow's limit) for the writer thread."""
        items = [RunTag(k, str(v)[:MAX_TAG_LEN]) for k, v in tags.items()]
        for chunk in _chunks(items, PARAMS_TAGS_PER_BATCH):
            self.store.call_later(self.store.client.log_batch, self.run_id, tags=chunk)

    def log_inputs(self, datasets: Sequence[DataInput], ticket: TicketMeta | None = None) -> None:
        """Queue the run's dataset inputs and, for a fine-tune, the registered ticket version it started from.

        Queued behind this process's own ticket registrations, so a ticket registered earlier in the job is found.
        """
        entities = [dataset_input(d) for d in datasets]
        self.store.submit(self._log_inputs, entities, ticket)

    def _log_inputs(self, entities: list[DatasetInput], ticket: TicketMeta | None) -> None:
        if ticket is not None:
            version = TicketRegistry(self.store).version_of(ticket)
            # None: not registered here (registration off, another store); the run's tags still name the ticket
            if version is not None:
                uri = f"models:/{version.name}/{version.version}"
                entities.append(DatasetInput(
                    Dataset(name=version.name, digest=ticket.sha256.get(WEIGHTS, "")[:16], source_type="models",
                            source=json.dumps({"uri": uri}),
                            profile=json.dumps({"version": int(version.version), "sparsity": round(ticket.sparsity, 4),
                                                "alias": ticket_alias(ticket.round, ticket.seed)})),
                    [InputTag(CONTEXT_TAG, "ticket")]))
                self.store.call(self.store.client.set_tag, self.run_id, TICKET_TAG, uri)
        if entities:
            self.store.call(self.store.client.log_inputs, self.run_id, datasets=entities)


def dataset_input(d: DataInput) -> DatasetInput:
    """MLflow's form of one input: the split as a dataset (source: its DVC path and remote), with its context."""
    source = {"uri": d.source} | ({"dvc_remote": d.remote} if d.remote else {})
    profile = {"num_rows": d.rows} | dict(d.profile)
    return DatasetInput(Dataset(name=d.name, digest=d.digest, source_type="local", source=json.dumps(source),
                                profile=json.dumps(profile)), [InputTag(CONTEXT_TAG, d.context)])
