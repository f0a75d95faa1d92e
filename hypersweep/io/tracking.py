"""MLflow, a view of the Parquet results: the one tracking-URI rule, how rows group into
runs, what a run is named, says and plots, and the synchronous logger (its writer thread and
the sync tool are in :mod:`hypersweep.io.tracking_sync`).

MLflow granularity (why not one run per cell): the MLflow UI compares *runs* and draws a
*metric against its step*. The question the ``hypergradient_error`` pipeline asks is "how
does the hypergradient error fall as the inner budget t grows", so one child run per
(problem, algorithm, backend, K, seed, dtype, params) group with ``t`` as the metric step
gives exactly that curve per run, and a 1,000-cell study with 10 values of t needs ~100
runs instead of 1,000 — which also divides MLflow's cost (~30–65 ms per run create/log on
sqlite/HTTP) by len(t). The pipelines whose cells carry a curve of their own
(:data:`OUTER_STEP_PIPELINES`: ``hpo``, ``blackbox``) get one child run per cell instead,
whose step is the *outer* step of the cell's trace rows (λ updates, solver iterations or
trials); their result row is logged beside the curves as ``result.<column>`` at the last
step, so that, e.g., ``result.val_loss`` (F(λ_final)) is never mixed into the ``val_loss``
curve (L_out(w_t, λ_k)).

Parameters of the group become run params; the numeric result columns become metrics,
with a ``log10_<name>`` companion for each error metric (:data:`ERROR_METRICS`; the UI's
log axis labels everything below 1e-6 "0"). Runs carry the real times of their cells
(start: the earliest cell start; end: the latest cell finish), a name that says what they
hold (:func:`run_name`) and a markdown description (``mlflow.note.content``); experiments
are tagged for MLflow's model-training view (:data:`EXPERIMENT_KIND`).

Each logged cell leaves a tag ``hypersweep.t.<t> = <status>@<finished_at>`` on its run,
which is what makes logging idempotent: a cell is (re)logged only when its latest Parquet
row is not the one the tag records. The parent run (tag ``hypersweep.study``) holds the
study's params, ``study.yaml`` and ``summary.json``.

Artifacts of a sqlite store live in ``mlartifacts/`` beside ``mlflow.db``, so they move
with the results folder. MLflow 3.17 stores them as absolute ``file://`` URIs (a relative
``artifact_location`` is made absolute against the cwd when the experiment is created; the
``mlflow-artifacts:`` scheme needs an HTTP tracking server and is refused by a sqlite
client), so :func:`relocate_artifacts` re-points a moved or copied store at its own
``mlartifacts/`` whenever hypersweep opens it (``run``, ``sync-mlflow``, ``report``).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import re
import sqlite3
import time
import urllib.parse
from contextlib import closing
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

import pyarrow as pa

from hypersweep.io import schema
from hypersweep.io.parquet import STUDY_FILE, latest_rows
from hypersweep.io.schema import TRACE_SCHEMA
from hypersweep.orchestrator.cell import stable_hash

log = logging.getLogger(__name__)


#: numeric result columns logged as metrics (at step t, or as ``result.<name>``)
METRIC_COLUMNS = ("hypergrad_rel_error", "hypergrad_abs_error", "hypergrad_norm",
                  "outer_grad_norm", "outer_grad_norm_rel",
                  "inner_suboptimality", "val_loss", "test_loss", "test_accuracy",
                  "wall_time_s", "compile_time_s", "peak_memory_mb", "n_inner_grad_evals",
                  "n_hvp_evals", "n_cross_evals", "n_outer_grad_evals", "n_oracle_calls",
                  "n_samples_touched", "solver_iters")
#: numeric trace columns logged as metrics at their outer step (all but the step itself)
TRACE_METRIC_COLUMNS = tuple(
    field.name for field in TRACE_SCHEMA
    if field.name not in ("step", "study", "cell_id")
    and (pa.types.is_floating(field.type) or pa.types.is_integer(field.type)))
#: error metrics (result or trace columns) that get a ``log10_<name>`` companion
ERROR_METRICS = ("hypergrad_rel_error", "hypergrad_abs_error", "inner_suboptimality",
                 "outer_grad_norm", "outer_grad_norm_rel", "inner_distance")
LOG10_PREFIX = "log10_"
#: the prefix of a result row's metrics in a run whose step is the outer step
RESULT_PREFIX = "result."
#: the prefix of the numeric entries of a trace row's ``extra`` JSON (e.g. F(λ_k))
TRACE_EXTRA_PREFIX = "extra."
#: pipelines whose cells each carry a curve over outer steps (their trace rows): one child
#: run per cell, step = the trace's ``step``; every other pipeline: step = t
OUTER_STEP_PIPELINES = frozenset({"hpo", "blackbox"})
#: typed parameter columns of a result row (the instance's sizes, batch, step sizes:
#: ``schema.PARAM_COLUMNS``), logged as params under their own names when set
TYPED_PARAM_COLUMNS = tuple(getattr(schema, "PARAM_COLUMNS", (
    "n_train", "n_val", "n_test", "n_features", "n_classes", "n_tasks", "dim_w", "dim_lam",
    "inner_lr", "batch_size", "step_size", "outer_ratio", "n_inner_steps", "outer_lr",
    "outer_steps", "optimizer", "num_samples", "time_budget_s")))
#: the cell fields (all but t) that define one child run
GROUP_FIELDS = ("study", "pipeline", "problem", "algorithm", "backend", "K", "seed",
                "dtype", "problem_params", "algorithm_params", "pipeline_params")
TAG_STUDY = "hypersweep.study"
TAG_ROLE = "hypersweep.role"
TAG_GROUP = "hypersweep.group_id"
TAG_CELL_PREFIX = "hypersweep.t."
#: MLflow's run description (markdown), shown on the run page
TAG_NOTE = "mlflow.note.content"
#: the experiment tag that records an experiment's kind, and the value of the model-training
#: kind (``genai_development``: the GenAI view of traces and evaluations). MLflow 3.17's UI
#: lets its ``?workflowType=machine_learning`` URL parameter (remembered in the browser)
#: win over the tag; other UIs and the kind selector read the tag.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: the folder beside a sqlite ``mlflow.db`` that holds its artifacts
ARTIFACTS_DIR = "mlartifacts"
_SQLITE = "sqlite:///"
_MAX_PARAM_CHARS = 500
_MAX_RUN_NAME = 250  # runs.name is VARCHAR(250) in MLflow's sql schema
_SHORT_NAME_PARAMS = 12  # algorithm params longer than this stay out of a run's name
_METRIC_NAME = re.compile(r"[A-Za-z0-9_.\- /]{1,200}")
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
    if uri.startswith(_SQLITE):
        path = Path(uri[len(_SQLITE):]).expanduser()
        path = path if path.is_absolute() else Path.cwd() / path
        path.parent.mkdir(parents=True, exist_ok=True)
        return _SQLITE + str(path)
    return uri


# -- a sqlite store's journal ----------------------------------------------------------------
#: ``0`` keeps a sqlite store in SQLite's default rollback-journal mode (a store on a network
#: file system, where WAL's shared-memory index does not work); anything else: WAL
SQLITE_WAL_ENV = "HYPERSWEEP_MLFLOW_SQLITE_WAL"
_WAL_FILES: set[str] = set()  # the sqlite stores this process opens in WAL mode


def enable_sqlite_wal(tracking_uri: str) -> bool:
    """Open this process's connections to a sqlite store in WAL mode with
    ``synchronous=NORMAL`` (unless ``$HYPERSWEEP_MLFLOW_SQLITE_WAL=0``); returns whether it
    applies.

    Each MLflow call is a transaction; in SQLite's default mode a commit syncs the journal
    and the database file, in WAL mode with NORMAL it appends to the write-ahead log (still
    crash-safe: a power cut can lose the last commits, never corrupt the file, and a lost
    row is re-logged from Parquet by ``hypersweep sync``). Logging 60 child runs took 40 %
    less time (docs/benchmarks.md §9b). WAL also lets ``mlflow ui`` read while a run
    writes. The journal mode is stored in the database file; other processes opening it
    (the UI) need no setting. Done by a SQLAlchemy ``connect`` listener, for the
    connections to this store's file only (``PRAGMA database_list``)."""
    if not tracking_uri.startswith(_SQLITE) or os.environ.get(SQLITE_WAL_ENV, "1") == "0":
        return False
    if not _WAL_FILES:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.listen(Engine, "connect", _sqlite_wal_pragmas)
    _WAL_FILES.add(os.path.realpath(tracking_uri[len(_SQLITE):]))
    return True


def _sqlite_wal_pragmas(dbapi_connection, connection_record) -> None:
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    cursor = dbapi_connection.cursor()
    try:
        files = {os.path.realpath(row[2]) for row in cursor.execute("PRAGMA database_list")
                 if row[2]}
        if files & _WAL_FILES:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.OperationalError as exc:  # e.g. locked by a reader: stay as it is
        log.debug("sqlite WAL mode not set: %s", exc)
    finally:
        cursor.close()


# -- where artifacts live -----------------------------------------------------------------
def store_folder(tracking_uri: str) -> Path | None:
    """The folder of a sqlite store's database file; None for other stores."""
    if tracking_uri.startswith(_SQLITE):
        return Path(tracking_uri[len(_SQLITE):]).parent
    return None


def default_artifact_root(tracking_uri: str) -> str | None:
    """For a sqlite store, artifacts in ``mlartifacts/`` beside the database (not in the
    cwd's ./mlruns), so that they move with it; None (the server decides) otherwise."""
    folder = store_folder(tracking_uri)
    return None if folder is None else folder.joinpath(ARTIFACTS_DIR).as_uri()


def output_param(output: str | Path, tracking_uri: str) -> str:
    """The ``output`` param of a parent run: the study's output relative to the folder of a
    sqlite store (the two move together), else absolute."""
    folder = store_folder(tracking_uri)
    output = Path(output).expanduser().absolute()
    if folder is None:
        return str(output)
    return Path(os.path.relpath(output, folder.absolute())).as_posix()


def relocate_artifacts(tracking_uri: str) -> int:
    """Re-point a moved or copied sqlite store at the ``mlartifacts/`` beside it.

    MLflow records each experiment's artifact location and each run's artifact URI as
    absolute ``file://`` URIs, so after ``mv results results2`` the store would serve (or
    miss) artifacts at the old place. Every experiment whose location is an
    ``mlartifacts`` folder other than this store's (the layout of
    :func:`default_artifact_root`) has it, and its runs' URIs, rewritten to this store's
    folder — by SQL, as MLflow has no API to change a recorded location. Other experiments
    (an HTTP server's ``mlflow-artifacts:``, a user's own root) are left alone. Returns how
    many experiments were re-pointed; 0 for other stores, or when nothing moved.
    """
    folder = store_folder(tracking_uri)
    if folder is None or not folder.joinpath(ARTIFACTS_DIR).is_dir():
        return 0
    database = Path(tracking_uri[len(_SQLITE):])
    if not database.is_file():
        return 0
    new = folder.absolute().joinpath(ARTIFACTS_DIR).as_uri()
    moved_runs: list[str] = []
    moved = 0
    with closing(sqlite3.connect(database, timeout=30)) as conn, conn:
        try:
            rows = conn.execute(
                "SELECT experiment_id, artifact_location FROM experiments").fetchall()
        except sqlite3.DatabaseError:  # not (yet) an MLflow store
            return 0
        for experiment_id, location in rows:
            old = (location or "").rstrip("/")
            parsed = urllib.parse.urlparse(old)
            name = PurePosixPath(urllib.parse.unquote(parsed.path)).name
            if parsed.scheme != "file" or old == new or name != ARTIFACTS_DIR:
                continue
            conn.execute("UPDATE experiments SET artifact_location = ? "
                         "WHERE experiment_id = ?", (new, experiment_id))
            prefix = old + "/"
            moved_runs += [run for (run,) in conn.execute(
                "SELECT run_uuid FROM runs WHERE experiment_id = ? AND "
                "substr(artifact_uri, 1, ?) = ?", (experiment_id, len(prefix), prefix))]
            conn.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                         "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                         (new + "/", len(prefix) + 1, experiment_id, len(prefix), prefix))
            moved += 1
            log.info("MLflow experiment %s: artifacts re-pointed from %s to %s",
                     experiment_id, old, new)
    if moved_runs:
        _forget_artifact_repos(moved_runs)
    return moved


def _forget_artifact_repos(run_ids: Iterable[str]) -> None:
    """Drop MLflow's in-process cache of artifact repositories (keyed by run id) for
    ``run_ids``: a process that used a run before it moved would write to the old place."""
    try:
        from mlflow.tracking._tracking_service import utils
        for run_id in run_ids:
            utils._artifact_repos_cache.pop(run_id, None)
    except (ImportError, AttributeError):  # a private cache; newer MLflow may drop it
        pass


# -- how rows group into runs -------------------------------------------------------------
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


def outer_step_curves(row: dict) -> bool:
    """Whether ``row``'s run plots the cell's trace over outer steps (one run per cell)."""
    return row.get("pipeline") in OUTER_STEP_PIPELINES


def group_id(row: dict, uses_t: bool = False) -> str:
    """The id of the child run a row belongs to: a stable hash of its GROUP_FIELDS (and of
    t, for a pipeline whose run is one cell)."""
    fields = [k_setting(row, uses_t) if name == "K" else row.get(name)
              for name in GROUP_FIELDS]
    if outer_step_curves(row):
        fields.append(row.get("t"))
    return stable_hash(fields, digest_size=8)


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
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return int(value.timestamp() * 1000)
    return int(time.time() * 1000)


def cell_end_ms(row: dict) -> int:
    """When the cell finished (ms since the epoch; now when the row does not say)."""
    return _millis(row.get("finished_at"))


def cell_start_ms(row: dict) -> int:
    """When the cell started: ``started_at``, else ``finished_at`` − ``wall_time_s``."""
    if isinstance(row.get("started_at"), _dt.datetime):
        return _millis(row["started_at"])
    wall = _number(row.get("wall_time_s"))
    return cell_end_ms(row) - (int(wall * 1000) if wall is not None and wall > 0 else 0)


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (bools, strings, NaN, ±inf are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# -- params, names, descriptions ----------------------------------------------------------
def flatten_params(prefix: str, value: Any, out: dict) -> None:
    """Nested mappings as ``prefix.key.subkey`` entries of ``out``."""
    if isinstance(value, dict):
        for key, item in value.items():
            flatten_params(f"{prefix}.{key}", item, out)
    else:
        out[prefix] = value


def _loads(text: Any) -> dict:
    try:
        loaded = json.loads(text or "{}")
    except (TypeError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def group_params(row: dict, uses_t: bool = False) -> dict[str, str]:
    """The child run's params: the cell's identity (minus t, unless the run is one cell),
    the K setting, the JSON params flattened (``problem.n_features``, ``algorithm.tol``,
    ``pipeline.outer_lr``) and the row's typed size and step-size columns
    (:data:`TYPED_PARAM_COLUMNS`: the sizes a problem actually ran with, also when its
    ``problem_params`` left them to the defaults)."""
    params = {name: row.get(name) for name in ("pipeline", "problem", "algorithm", "backend",
                                                "seed", "dtype")}
    params["K"] = k_setting(row, uses_t)
    if outer_step_curves(row):
        params["t"] = row.get("t")
    for column, prefix in (("problem_params", "problem"), ("algorithm_params", "algorithm"),
                           ("pipeline_params", "pipeline")):
        flat: dict = {}
        flatten_params(prefix, _loads(row.get(column)), flat)
        params.update(flat)
    for column in TYPED_PARAM_COLUMNS:
        if row.get(column) is not None:
            params[column] = row[column]
    return {key: ("None" if value is None else str(value))[:_MAX_PARAM_CHARS]
            for key, value in params.items()}


def _short(params_json: Any, limit: int) -> str:
    """``(key=value,...)`` of a JSON params column when it is short, else ""."""
    loaded = _loads(params_json)
    if not loaded:
        return ""
    flat: dict = {}
    for key, value in loaded.items():
        flatten_params(key, value, flat)
    text = ",".join(f"{key}={value}" for key, value in flat.items())
    return f"({text})" if len(text) <= limit else ""


def run_name(row: dict, uses_t: bool = False) -> str:
    """A child run's name, short enough for the MLflow runs table's Run Name column
    (190 px in 3.17) yet naming what the run holds among its siblings: ``ridge aid_cg K=t
    jax s0`` — problem, algorithm (its params when at most
    :data:`_SHORT_NAME_PARAMS` characters), the K setting (absent when the algorithm has
    no K), t for a run that is one cell, backend (and dtype unless float64), seed. The
    problem's params, long params and everything else are the run's params and its
    description (``mlflow.note.content``)."""
    algorithm = f"{row.get('algorithm')}{_short(row.get('algorithm_params'), _SHORT_NAME_PARAMS)}"
    parts = [str(row.get("problem")), algorithm]
    if row.get("K") is not None:
        parts.append(f"K={k_setting(row, uses_t)}")
    if outer_step_curves(row):
        parts.append(f"t={row.get('t')}")
    dtype = row.get("dtype")
    parts.append(str(row.get("backend")) + ("" if dtype in (None, "float64") else f"/{dtype}"))
    parts.append(f"s{row.get('seed')}")
    return " ".join(parts)[:_MAX_RUN_NAME]


#: one line per metric, for the run descriptions
METRIC_HELP = {
    "hypergrad_rel_error": "‖ĝ − ∇F(λ)‖ / ‖∇F(λ)‖, the estimate against the float64 oracle",
    "hypergrad_abs_error": "‖ĝ − ∇F(λ)‖",
    "hypergrad_norm": "‖ĝ‖, the norm of the estimated hypergradient",
    "inner_suboptimality": "‖w_t − w*(λ)‖, how far the inner iterate is from the solution",
    "inner_distance": "‖w_k − w*(λ_k)‖ at outer step k (float64 oracle)",
    "outer_grad_norm": "‖∇F(λ)‖, stationarity of the value function (float64 oracle)",
    "outer_grad_norm_rel": "‖∇F(λ_final)‖ / ‖∇F(λ₀)‖",
    "val_loss": "validation loss L_out",
    "best_val_loss": "the lowest validation loss so far",
    "test_loss": "test loss", "test_accuracy": "test accuracy",
    "lam_mean": "mean of λ", "lam_min": "smallest entry of λ",
    "lam_max": "largest entry of λ",
    "wall_time_s": "wall time in seconds (after warm-up; cumulative along a curve)",
    "compile_time_s": "compile time the cell paid, in seconds",
    "peak_memory_mb": "peak extra heap during the call, MB",
    "n_inner_grad_evals": "∇_w L_in evaluations", "n_hvp_evals": "Hessian-vector products",
    "n_cross_evals": "cross products ∇²_λw L_in · v",
    "n_outer_grad_evals": "evaluations of (∇_w L_out, ∇_λ L_out)",
    "n_oracle_calls": "the sum of the four oracle counts (docs/costs.md)",
    "n_samples_touched": "data rows read (minibatch methods)",
    "solver_iters": "iterations of the linear-system solver",
}
_STEP_HELP = {
    "hpo": "the outer step k: one λ update each (for a bilevel solver: the iterations "
           "done, from 0 at λ₀)",
    "blackbox": "the trial index, in completion order",
}


def _metric_lines(keys: Iterable[str]) -> list[str]:
    """One markdown bullet per metric of ``keys`` that :data:`METRIC_HELP` explains
    (``result.x`` as x; log10 companions and ``extra.*`` are described once, apart)."""
    names = {key[len(RESULT_PREFIX):] if key.startswith(RESULT_PREFIX) else key
             for key in keys}
    return [f"- `{name}`: {METRIC_HELP[name]}" for name in sorted(names)
            if name in METRIC_HELP]


def run_description(row: dict, metric_keys: Iterable[str], uses_t: bool = False) -> str:
    """The child run's description (markdown): what it holds, the step, the metrics."""
    pipeline, study = row.get("pipeline"), row.get("study")
    lines = [f"**{run_name(row, uses_t)}**", ""]
    if outer_step_curves(row):
        k = "" if row.get("K") is None else f", K = {row.get('K')}"
        lines += [
            f"One `{pipeline}` cell of study `{study}` (cell `{row.get('cell_id')}`): "
            f"t = {row.get('t')} inner steps per outer step{k}.", "",
            f"**Step**: {_STEP_HELP.get(pipeline, 'the outer step')}. Each point is a "
            "trace row of the cell (`traces/` Parquet), timed at the cell's start plus the "
            "trace's wall time.", "",
            f"**`{RESULT_PREFIX}*`**: the cell's row in `results/`, at the last step (hpo: "
            "`result.val_loss` is F(λ_final), the exact value function at the final λ; "
            "blackbox: the best trial's validation loss). "
            f"**`{TRACE_EXTRA_PREFIX}*`**: the numbers of the trace's `extra` "
            "(`extra.value` = F(λ_k) where the problem has a closed form)."]
    else:
        k_is_t = ". K=t: each cell's K equals its t" if k_setting(row, uses_t) == "t" else ""
        lines += [
            f"The `{pipeline}` cells of study `{study}` for one (problem, algorithm, "
            "backend, dtype, K setting, seed, params): one point per cell.", "",
            f"**Step**: t, the cell's inner steps (its inner budget){k_is_t}."]
    lines += [
        "", "**Metrics**:", *_metric_lines(metric_keys),
        f"- `{LOG10_PREFIX}<error>`: log10 of an error metric (values > 0 only), so that a "
        "linear axis reads small errors.", "",
        "**Params**: `problem.*`, `algorithm.*`, `pipeline.*` as the study set them; "
        "unprefixed sizes (`n_train`, `n_features`, …) as the cell ran. Run tags "
        f"`{TAG_CELL_PREFIX}<t>` = `status@finished_at` of each logged cell.", "",
        "The record is the study's Parquet; this run is a view of it."]
    return "\n".join(lines)


def parent_description(study: str, params: Mapping[str, Any]) -> str:
    """The parent run's description (markdown)."""
    pipeline = params.get("pipeline")
    if pipeline in OUTER_STEP_PIPELINES:
        nested = ("one nested run per cell; its step is "
                  f"{_STEP_HELP.get(str(pipeline), 'the outer step')}")
    else:
        nested = ("one nested run per (problem, algorithm, backend, dtype, K setting, "
                  "seed, params); its step is t, the inner budget")
    lines = [f"**Study `{study}`** — pipeline `{pipeline}`.", "",
             f"- Nested runs: {nested}. Their descriptions list their metrics.",
             f"- Results: Parquet in `{params.get('output')}` (relative to the folder of "
             "this MLflow store when it is a sqlite file): `results/` one row per cell, "
             "`traces/` per-step rows. MLflow is a view of them: "
             "`hypersweep sync-mlflow OUTPUT` backfills what it lacks.",
             "- Artifacts: `study.yaml` (the study as run), `summary.json` (the last run's "
             "summary), `report/` (`hypersweep report`); with a sqlite store they lie in "
             "`mlartifacts/` beside it; after the folder moved, `hypersweep sync-mlflow "
             "OUTPUT` (or `run`, `report`) points the store at them again.",
             "- Params: the study's keys (`problems`, `algorithms`, `t`, `K`, `seeds`, …)."]
    return "\n".join(lines)


# -- metrics ------------------------------------------------------------------------------
def _with_log10(name: str, value: float) -> list[tuple[str, float]]:
    out = [(name, value)]
    if name in ERROR_METRICS and value > 0:
        out.append((LOG10_PREFIX + name, math.log10(value)))
    return out


def row_values(row: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(name, value) of a result row's finite metrics, with their log10 companions."""
    out = []
    for column in METRIC_COLUMNS:
        value = _number(row.get(column))
        if value is not None:
            out += _with_log10(column, value)
    return out


def trace_values(trace: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(name, value) of a trace row's finite metrics (log10 companions included) and of
    the numbers in its ``extra`` JSON (``extra.<key>``)."""
    out = []
    for column in TRACE_METRIC_COLUMNS:
        value = _number(trace.get(column))
        if value is not None:
            out += _with_log10(column, value)
    for key, item in _loads(trace.get("extra")).items():
        value = _number(item)
        # a name MLflow would reject would cost the whole batch: such entries stay out
        if value is not None and _METRIC_NAME.fullmatch(str(key)):
            out.append((TRACE_EXTRA_PREFIX + str(key), value))
    return out


def cell_metrics(row: dict, traces: Iterable[Mapping[str, Any]] = ()
                 ) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp ms, step) of one cell's metrics.

    Step-t runs: the row's metrics at step t, stamped when the cell finished. Outer-step
    runs (:func:`outer_step_curves`): each trace row's metrics at its ``step``, stamped at
    the cell's start plus the trace's cumulative ``wall_time_s``; then the row's metrics as
    ``result.<name>`` at the last step."""
    end = cell_end_ms(row)
    if not outer_step_curves(row):
        step = int(row.get("t") or 0)
        return [(key, value, end, step) for key, value in row_values(row)]
    start = cell_start_ms(row)
    out: list[tuple[str, float, int, int]] = []
    last = None
    for trace in sorted(traces, key=lambda tr: tr.get("step") or 0):
        step = int(trace.get("step") or 0)
        wall = _number(trace.get("wall_time_s"))
        stamp = start + int(wall * 1000) if wall is not None else end
        out += [(key, value, stamp, step) for key, value in trace_values(trace)]
        last = step if last is None else max(last, step)
    if last is None:  # no trace (a failed cell): the steps it says it ran, else 0
        done = _number(_loads(row.get("extra")).get("outer_steps_done"))
        last = int(done) if done is not None else 0
    out += [(RESULT_PREFIX + key, value, end, last) for key, value in row_values(row)]
    return out


class MlflowLogger:
    """Synchronous MLflow logging of result rows (used by the writer thread and by sync).

    ``connect()`` imports mlflow (~3–5 s the first time), re-points a moved sqlite store
    (:func:`relocate_artifacts`), finds or creates the experiment (tagged for the
    model-training view) and the study's parent run and loads the existing child runs with
    their cell tags (one paginated search). ``log_rows(rows, traces)`` then costs one
    ``log_batch`` per touched group (+ a ``create_run`` and ``set_terminated`` for a new
    group); runs whose cells end later than their recorded end time get it moved by
    :meth:`flush_end_times` (called by :meth:`finish`).
    """

    def __init__(self, tracking_uri: str, experiment: str, study_name: str, *,
                 study_params: dict | None = None, study_yaml: str | None = None,
                 artifact_root: str | None = None, resume_parent: bool = True,
                 k_uses_t: bool = False, parent_start_ms: int | None = None):
        self.resume_parent = resume_parent  # mark an existing parent RUNNING again
        self.k_uses_t = k_uses_t  # the study's K list has "t": K = t cells form one run
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment
        self.study_name = study_name
        self.study_params = study_params or {}
        self.study_yaml = study_yaml
        self.artifact_root = artifact_root
        self.parent_start_ms = parent_start_ms  # None: now (a driver starting)
        self.client = None
        self.sqlite_wal = False  # the store's connections in WAL mode (enable_sqlite_wal)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.parent_created = False
        self._groups: dict[str, str] = {}          # group_id -> run_id
        self._logged: dict[str, dict[str, str]] = {}  # run_id -> {tag key: fingerprint}
        self._end_ms: dict[str, int] = {}  # run_id -> its recorded end time
        self._pending_end: dict[str, int] = {}  # run_id -> a later end to record
        self.cells_logged = 0
        self.cells_already_logged = 0
        self.runs_created = 0
        self.relocated = 0  # experiments re-pointed at this store's mlartifacts/
        self.seconds = 0.0  # logging rows, after connect
        self.connect_seconds = 0.0  # import mlflow, experiment, parent, existing children

    # -- setup ---------------------------------------------------------------------------
    def connect(self) -> None:
        start = time.perf_counter()
        set_mlflow_env_defaults()
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag

        self._Param, self._RunTag, self._Metric = Param, RunTag, Metric
        self.sqlite_wal = enable_sqlite_wal(self.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(
                self.experiment_name, artifact_location=self.artifact_root,
                tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
        else:
            self.experiment_id = experiment.experiment_id
            if experiment.tags.get(TAG_EXPERIMENT_KIND) != EXPERIMENT_KIND:
                self.client.set_experiment_tag(self.experiment_id, TAG_EXPERIMENT_KIND,
                                               EXPERIMENT_KIND)
        # after the store exists (MlflowClient creates a new sqlite file's tables)
        self.relocated = relocate_artifacts(self.tracking_uri)
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
            if TAG_NOTE not in found[0].data.tags:  # a parent logged before descriptions
                self.client.set_tag(self.parent_run_id, TAG_NOTE,
                                    parent_description(self.study_name, self.study_params))
            if self.resume_parent:
                self.client.update_run(self.parent_run_id, status="RUNNING")
            return
        run = self.client.create_run(
            self.experiment_id, run_name=self.study_name, start_time=self.parent_start_ms,
            tags={TAG_STUDY: self.study_name, TAG_ROLE: "parent",
                  TAG_NOTE: parent_description(self.study_name, self.study_params)})
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
            self._end_ms[run.info.run_id] = run.info.end_time or 0
            self._logged[run.info.run_id] = {
                key: value for key, value in run.data.tags.items()
                if key.startswith(TAG_CELL_PREFIX)}

    # -- logging -------------------------------------------------------------------------
    def _child_run(self, gid: str, rows: list[dict], metric_keys: Iterable[str]
                   ) -> tuple[str, list, bool]:
        """(run_id, params to log with the first batch, created); creates the run if new,
        starting when the earliest of ``rows`` started."""
        run_id = self._groups.get(gid)
        if run_id is not None:
            return run_id, [], False
        row = rows[0]
        run = self.client.create_run(
            self.experiment_id, run_name=run_name(row, self.k_uses_t),
            start_time=min(cell_start_ms(r) for r in rows),
            tags={"mlflow.parentRunId": self.parent_run_id, TAG_STUDY: self.study_name,
                  TAG_ROLE: "group", TAG_GROUP: gid,
                  TAG_NOTE: run_description(row, metric_keys, self.k_uses_t)})
        run_id = run.info.run_id
        self._groups[gid] = run_id
        self._logged[run_id] = {}
        self.runs_created += 1
        params = [self._Param(key, value)
                  for key, value in group_params(row, self.k_uses_t).items()]
        return run_id, params, True

    def log_rows(self, rows: Iterable[dict],
                 traces: Mapping[str, list[Mapping[str, Any]]] | None = None) -> int:
        """Log the rows not yet logged (per the run tags); returns how many were logged.

        ``traces``: cell_id -> that cell's trace rows, the curve of an outer-step run
        (a cell of such a pipeline logged without them gets its ``result.*`` only)."""
        start = time.perf_counter()
        traces = traces or {}
        by_group: dict[str, list[dict]] = {}
        for row in latest_rows(rows):
            by_group.setdefault(group_id(row, self.k_uses_t), []).append(row)
        logged = 0
        for gid, group_rows in by_group.items():
            end = max(cell_end_ms(row) for row in group_rows)
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
                if run_id is not None and end > self._end_ms.get(run_id, 0):
                    self._pending_end[run_id] = end  # e.g. a driver killed before finish
                continue
            metrics, tags = [], []
            for row in todo:
                metrics += [self._Metric(key, value, stamp, step) for key, value, stamp, step
                            in cell_metrics(row, traces.get(row.get("cell_id"), ()))]
                tags.append(self._RunTag(f"{TAG_CELL_PREFIX}{row.get('t')}",
                                         cell_fingerprint(row)))
            run_id, params, created = self._child_run(gid, todo, (m.key for m in metrics))
            self._log_batch(run_id, metrics, params, tags)
            if created:
                # Children are complete views as soon as they exist; later cells of the
                # group append steps (MLflow accepts logging to a finished run), and a
                # killed driver never leaves children RUNNING. Their end is the latest
                # cell's finish, moved later by flush_end_times as cells arrive.
                self.client.set_terminated(run_id, "FINISHED", end_time=end)
                self._end_ms[run_id] = end
            elif end > self._end_ms.get(run_id, 0):
                self._pending_end[run_id] = end
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

    def flush_end_times(self) -> int:
        """Record the later end times of runs whose cells arrived after they were created
        (one ``set_terminated`` each, deferred so that a run's later cells cost no extra
        request per batch); returns how many runs were updated."""
        pending, self._pending_end = self._pending_end, {}
        for run_id, end in pending.items():
            self.client.set_terminated(run_id, "FINISHED", end_time=end)
            self._end_ms[run_id] = end
        return len(pending)

    def finish(self, status: str = "FINISHED", summary: dict | None = None,
               end_time: int | None = None) -> None:
        """End the parent run with ``status`` at ``end_time`` (ms; None: now), after the
        children's deferred end times and ``summary.json``."""
        if self.client is None or self.parent_run_id is None:
            return
        self.flush_end_times()
        if summary is not None:
            self.client.log_text(self.parent_run_id,
                                 json.dumps(summary, indent=2, default=str), "summary.json")
        self.client.set_terminated(self.parent_run_id, status, end_time=end_time)
