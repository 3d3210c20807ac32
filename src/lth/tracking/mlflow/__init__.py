"""The MLflow adapter behind `lth.tracking`: the one place that talks to MLflow.

trackers.py: parent and nested runs, their lifetime, the stale-run sweep. store.py: the client, retries
and the writer thread. runs.py: one run with buffered metrics. registry.py: ticket versions, tags and
aliases. query.py: listing and fetching registered tickets (`lth tickets`).
"""

from __future__ import annotations

from lth.tracking.mlflow.registry import TICKET_ARTIFACTS, WEIGHTS_TAG, registered_model_name, ticket_alias, version_tags
from lth.tracking.mlflow.runs import MAX_PARAM_LEN, MAX_TAG_LEN, METRICS_PER_BATCH, MlflowRun
from lth.tracking.mlflow.store import Store, check_reachable, project_dir, redact, tracking_uri
from lth.tracking.mlflow.trackers import get_tracker
from lth.tracking.mlflow.trackers import JOB_KEY_TAG, JOB_RUN_TAG, PARENT_TAG, PROJECT_RUN_TAG, MlflowTracker, job_key

__all__ = [
    "JOB_KEY_TAG", "JOB_RUN_TAG", "PROJECT_RUN_TAG", "MAX_PARAM_LEN", "MAX_TAG_LEN", "METRICS_PER_BATCH", "PARENT_TAG", "TICKET_ARTIFACTS",
    "WEIGHTS_TAG", "MlflowRun", "MlflowTracker", "Store", "check_reachable", "get_tracker", "job_key", "project_dir", "redact",
    "registered_model_name", "ticket_alias", "tracking_uri", "version_tags",
]
