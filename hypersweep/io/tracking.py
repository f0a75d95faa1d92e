"""MLflow, a view of the Parquet results: the one tracking-URI rule, how rows group into
runs, and the synchronous logger (its writer thread and the sync tool are in
:mod:`hypersweep.io.tracking_sync`).

MLflow granularity (why not one run per cell): the MLflow UI compares *runs* and draws a
*metric against its step*. The question this project asks is "how does the hypergradient
error fall as the inner budget t grows", so one child run per (problem, algorithm, backend,
K, seed, dtype, params) group with ``t`` as the metric step gives exactly that curve per
run, and a 1,000-cell study with 10 values of t needs ~100 runs instead of 1,000 — which
also divides MLflow's cost (~30–65 ms per run create/log on sqlite/HTTP) by len(t).
Parameters of the group become run params; the numeric result columns become metrics at
step t; each logged cell leaves a tag ``hypersweep.t.<t> = <status>@<finished_at>`` on its
run, which is what makes logging idempotent: a cell is (re)logged only when its latest
Parquet row is not the one the tag records. The parent run (tag ``hypersweep.study``)
holds the study's params, ``study.yaml`` and ``summary.json``.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

from hypersweep.io.parquet import STUDY_FILE
from hypersweep.orchestrator.cell import stable_hash

log = logging.getLogger(__name__)


#: numeric result columns logged as metrics at step t
METRIC_COLUMNS = ("hypergrad_rel_error", "hypergrad_abs_error", "hypergrad_norm",
                  "inner_suboptimality", "val_loss", "test_loss", "test_accuracy",
                  "wall_time_s", "compile_time_s", "peak_memory_mb", "n_inner_grad_evals",
                  "n_hvp_evals", "n_cross_evals", "n_outer_grad_evals", "n_oracle_calls",
                  "n_samples_touched", "solver_iters")
#: the cell fields (all but t) that define one child run
GROUP_FIELDS = ("study", "pipeline", "problem", "algorithm", "backend", "K", "seed",
                "dtype", "problem_params", "algorithm_params", "pipeline_params")
TAG_STUDY = "hypersweep.study"
TAG_ROLE = "hypersweep.role"
TAG_GROUP = "hypersweep.group_id"
TAG_CELL_PREFIX = "hypersweep.t."
_MAX_PARAM_CHARS = 500
# MLflow's log_batch limits: 1000 metrics, 100 params, 100 tags per request.
_MAX_BATCH_METRICS, _MAX_BATCH_PARAMS, _MAX_BATCH_TAGS = 1000, 100, 100

#: set in the driver unless the user set them: a dead HTTP server then fails a request in
#: ~2.4 s (connection refused) or ~30 s (blackhole) instead of ~4 min / ~16 min.
MLFLOW_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def set_mlflow_env_defaults() -> None:
    for key, value in MLFLOW_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


#: where MLflow runs go when neither the command line, the study nor
#: ``$MLFLOW_TRACKING_URI`` says: a sqlite file beside the results (relative to the cwd)
DEFAULT_TRACKING_URI = "sqlite:///results/mlflow.db"


def choose_tracking_uri(explicit: str | None = None, study_value: str | None = None) -> str:
    """The one rule for the tracking URI: a command-line ``explicit`` value, else the study's
    own ``mlflow.tracking_uri`` (the default value counts as unset), else
    ``$MLFLOW_TRACKING_URI``, else :data:`DEFAULT_TRACKING_URI`; made absolute by
    :func:`resolve_tracking_uri`."""
    if study_value == DEFAULT_TRACKING_URI:
        study_value = None
    uri = (explicit or study_value or os.environ.get("MLFLOW_TRACKING_URI")
           or DEFAULT_TRACKING_URI)
    return resolve_tracking_uri(uri)


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///path`` absolute (from the cwd) and create its folder;
    other URIs are returned unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = Path(uri[len(prefix):]).expanduser()
        path = path if path.is_absolute() else Path.cwd() / path
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


def k_uses_t(k_values: Any) -> bool:
    """Whether a study's ``K`` list contains the setting "t" (K = t)."""
    values = k_values if isinstance(k_values, (list, tuple)) else [k_values]
    return any(str(v) == "t" for v in values)


def k_setting(row: dict, uses_t: bool = False) -> Any:
    """The K *setting* a cell belongs to: "t" when the study has ``K: [.., t]`` and K = t,
    else K. Grouping by it keeps a K = t line in one child run, so its error-vs-t curve
    draws in MLflow (the cell K = t = 10 of ``K: [10, t]`` lands in the "t" run)."""
    K = row.get("K")
    setting = row.get("K_setting")
    if setting is not None and K is not None:  # rows since K_setting was recorded
        return "t" if setting == "t" else K
    return "t" if uses_t and K is not None and K == row.get("t") else K


def group_id(row: dict, uses_t: bool = False) -> str:
    """The id of the child run a row belongs to: a stable hash of its GROUP_FIELDS."""
    return stable_hash([k_setting(row, uses_t) if name == "K" else row.get(name)
                        for name in GROUP_FIELDS], digest_size=8)


def _iso(value: Any) -> str:
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.astimezone(_dt.timezone.utc).isoformat(timespec="microseconds")
    return str(value)


def cell_fingerprint(row: dict) -> str:
    """What the run tag records for a logged cell: its status and when it finished."""
    return f"{row.get('status')}@{_iso(row.get('finished_at'))}"


def _millis(value: Any) -> int:
    if isinstance(value, _dt.datetime):
        return int(value.timestamp() * 1000)
    return int(time.time() * 1000)


def flatten_params(prefix: str, value: Any, out: dict) -> None:
    """Nested mappings as ``prefix.key.subkey`` entries of ``out``."""
    if isinstance(value, dict):
        for key, item in value.items():
            flatten_params(f"{prefix}.{key}", item, out)
    else:
        out[prefix] = value


def group_params(row: dict, uses_t: bool = False) -> dict[str, str]:
    """The child run's params: the cell's identity minus t, params flattened."""
    params = {name: row.get(name) for name in ("pipeline", "problem", "algorithm", "backend",
                                                "seed", "dtype")}
    params["K"] = k_setting(row, uses_t)
    for column, prefix in (("problem_params", "problem"), ("algorithm_params", "algorithm"),
                           ("pipeline_params", "pipeline")):
        try:
            loaded = json.loads(row.get(column) or "{}")
        except (TypeError, ValueError):
            loaded = {}
        flat: dict = {}
        flatten_params(prefix, loaded, flat)
        params.update(flat)
    return {key: ("None" if value is None else str(value))[:_MAX_PARAM_CHARS]
            for key, value in params.items()}


class MlflowLogger:
    """Synchronous MLflow logging of result rows (used by the writer thread and by sync).

    ``connect()`` imports mlflow (~3–5 s the first time), finds or creates the experiment
    and the study's parent run and loads the existing child runs with their cell tags
    (one paginated search). ``log_rows(rows)`` then costs one ``log_batch`` per touched
    group (+ a ``create_run`` and ``set_terminated`` for a new group).
    """

    def __init__(self, tracking_uri: str, experiment: str, study_name: str, *,
                 study_params: dict | None = None, study_yaml: str | None = None,
                 artifact_root: str | None = None, resume_parent: bool = True,
                 k_uses_t: bool = False):
        self.resume_parent = resume_parent  # mark an existing parent RUNNING again
        self.k_uses_t = k_uses_t  # the study's K list has "t": K = t cells form one run
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment
        self.study_name = study_name
        self.study_params = study_params or {}
        self.study_yaml = study_yaml
        self.artifact_root = artifact_root
        self.client = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.parent_created = False
        self._groups: dict[str, str] = {}          # group_id -> run_id
        self._logged: dict[str, dict[str, str]] = {}  # run_id -> {tag key: fingerprint}
        self.cells_logged = 0
        self.cells_already_logged = 0
        self.runs_created = 0
        self.seconds = 0.0  # logging rows, after connect
        self.connect_seconds = 0.0  # import mlflow, experiment, parent, existing children

    # -- setup ---------------------------------------------------------------------------
    def connect(self) -> None:
        start = time.perf_counter()
        set_mlflow_env_defaults()
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        self._Param, self._RunTag = Param, RunTag
        from mlflow.entities import Metric
        self._Metric = Metric
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(
                self.experiment_name, artifact_location=self.artifact_root)
        else:
            self.experiment_id = experiment.experiment_id
        self._find_or_create_parent()
        self._load_children()
        self.connect_seconds = time.perf_counter() - start

    def _search(self, filter_string: str) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                           max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _find_or_create_parent(self) -> None:
        found = self._search(f"tags.`{TAG_STUDY}` = '{self.study_name}' and "
                             f"tags.`{TAG_ROLE}` = 'parent'")
        if found:
            found.sort(key=lambda run: run.info.start_time or 0)
            self.parent_run_id = found[0].info.run_id
            if self.resume_parent:
                self.client.update_run(self.parent_run_id, status="RUNNING")
            return
        run = self.client.create_run(self.experiment_id, run_name=self.study_name,
                                     tags={TAG_STUDY: self.study_name, TAG_ROLE: "parent"})
        self.parent_run_id = run.info.run_id
        self.parent_created = True
        params = [self._Param(key, str(value)[:_MAX_PARAM_CHARS])
                  for key, value in self.study_params.items()]
        for i in range(0, len(params), _MAX_BATCH_PARAMS):
            self.client.log_batch(self.parent_run_id, params=params[i:i + _MAX_BATCH_PARAMS])
        if self.study_yaml:
            self.client.log_text(self.parent_run_id, self.study_yaml, STUDY_FILE)

    def _load_children(self) -> None:
        for run in self._search(f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'"):
            gid = run.data.tags.get(TAG_GROUP)
            if gid is None:
                continue
            self._groups.setdefault(gid, run.info.run_id)
            self._logged[run.info.run_id] = {
                key: value for key, value in run.data.tags.items()
                if key.startswith(TAG_CELL_PREFIX)}

    # -- logging -------------------------------------------------------------------------
    def _child_run(self, gid: str, row: dict) -> tuple[str, list]:
        """(run_id, params to log with the first batch); creates the run if new."""
        run_id = self._groups.get(gid)
        if run_id is not None:
            return run_id, []
        k = "-" if row.get("K") is None else k_setting(row, self.k_uses_t)
        name = f"{row.get('problem')}.{row.get('algorithm')}.{row.get('backend')}.K{k}" \
               f".s{row.get('seed')}"
        run = self.client.create_run(
            self.experiment_id, run_name=name,
            tags={"mlflow.parentRunId": self.parent_run_id, TAG_STUDY: self.study_name,
                  TAG_ROLE: "group", TAG_GROUP: gid})
        run_id = run.info.run_id
        self._groups[gid] = run_id
        self._logged[run_id] = {}
        self.runs_created += 1
        params = [self._Param(key, value)
                  for key, value in group_params(row, self.k_uses_t).items()]
        return run_id, params

    def log_rows(self, rows: Iterable[dict]) -> int:
        """Log the rows not yet logged (per the run tags); returns how many were logged."""
        start = time.perf_counter()
        by_group: dict[str, list[dict]] = {}
        for row in rows:
            by_group.setdefault(group_id(row, self.k_uses_t), []).append(row)
        logged = 0
        for gid, group_rows in by_group.items():
            run_id = self._groups.get(gid)
            tags_done = self._logged.get(run_id, {}) if run_id else {}
            todo = []
            for row in group_rows:
                key = f"{TAG_CELL_PREFIX}{row.get('t')}"
                if tags_done.get(key) == cell_fingerprint(row):
                    self.cells_already_logged += 1
                else:
                    todo.append(row)
            if not todo:
                continue
            created = run_id is None
            run_id, params = self._child_run(gid, todo[0])
            metrics, tags = [], []
            for row in todo:
                stamp, step = _millis(row.get("finished_at")), int(row.get("t") or 0)
                for column in METRIC_COLUMNS:
                    value = row.get(column)
                    if value is None:
                        continue
                    value = float(value)
                    if math.isfinite(value):
                        metrics.append(self._Metric(column, value, stamp, step))
                tags.append(self._RunTag(f"{TAG_CELL_PREFIX}{row.get('t')}",
                                         cell_fingerprint(row)))
            self._log_batch(run_id, metrics, params, tags)
            if created:
                # Children are complete views as soon as they exist; later cells of the
                # group append steps (MLflow accepts logging to a finished run), and a
                # killed driver never leaves children RUNNING.
                self.client.set_terminated(run_id, "FINISHED")
            for tag in tags:
                self._logged[run_id][tag.key] = tag.value
            logged += len(todo)
        self.cells_logged += logged
        self.seconds += time.perf_counter() - start
        return logged

    def _log_batch(self, run_id: str, metrics: list, params: list, tags: list) -> None:
        # Tags go last: a partially logged group is re-logged by the next sync.
        while metrics or params or tags:
            chunk_p, params = params[:_MAX_BATCH_PARAMS], params[_MAX_BATCH_PARAMS:]
            room = _MAX_BATCH_METRICS - len(chunk_p)
            chunk_m, metrics = metrics[:room], metrics[room:]
            chunk_t: list = []
            if not metrics and not params:
                room = min(_MAX_BATCH_TAGS, _MAX_BATCH_METRICS - len(chunk_p) - len(chunk_m))
                chunk_t, tags = tags[:room], tags[room:]
            self.client.log_batch(run_id, metrics=chunk_m, params=chunk_p, tags=chunk_t)

    def finish(self, status: str = "FINISHED", summary: dict | None = None) -> None:
        if self.client is None or self.parent_run_id is None:
            return
        if summary is not None:
            self.client.log_text(self.parent_run_id,
                                 json.dumps(summary, indent=2, default=str), "summary.json")
        self.client.set_terminated(self.parent_run_id, status)
