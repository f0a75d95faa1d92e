"""The explicit Parquet schemas of result rows and per-step traces.

One row per cell; ``None`` where a value does not apply. Every pipeline fills the same
columns, so a study's files always concatenate (pandas, polars, duckdb read them).

Besides the canonical JSON of ``problem_params`` / ``algorithm_params`` /
``pipeline_params`` (what identifies a cell), a row carries typed copies of the common
ones, null where they do not apply, so that a plain reader filters and plots them without
parsing JSON (``where n_train = 1000 and batch_size = 64``):

* :data:`PROBLEM_FIELDS` — the instance *as built* in the actor (sizes resolved from the
  defaults, the study's values or the data file; η = the instance's inner step);
* :data:`ALGORITHM_PARAM_FIELDS` / :data:`PIPELINE_PARAM_FIELDS` — the study's value, else
  the catalog's (or the pipeline model's) default; null where the algorithm or pipeline
  has no such parameter or its default is null (``step_size`` null: η).

Columns are only ever added: parts written before a column existed read it as null
(:func:`hypersweep.io.parquet.read_results`), and the next run rewrites them in this
schema (:func:`hypersweep.io.parquet.compact`) so that polars and duckdb globs agree too.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import pyarrow as pa

#: the cost columns every result and trace row carries (``cost_columns`` fills them), one
#: convention for every algorithm (docs/costs.md)
COST_FIELDS = (
    ("n_inner_grad_evals", pa.int64()),   # ∇_w L_in
    ("n_hvp_evals", pa.int64()),          # ∇²_ww L_in · v
    ("n_cross_evals", pa.int64()),        # ∇²_λw L_in · v
    ("n_outer_grad_evals", pa.int64()),   # (∇_w L_out, ∇_λ L_out)
    ("n_oracle_calls", pa.int64()),       # the sum of the four
    ("n_samples_touched", pa.int64()),    # data rows read (minibatch methods), else null
)
COST_COLUMNS = tuple(name for name, _ in COST_FIELDS)

#: the problem instance as built: sizes and the inner step η (``Problem.row_columns``).
#: Multi-task problems count rows per task; ``n_test`` is 0 without a test split;
#: ``n_features`` excludes a bias column; ``dim_w`` / ``dim_lam`` = the sizes of w and λ.
PROBLEM_FIELDS = (
    ("n_train", pa.int64()),
    ("n_val", pa.int64()),
    ("n_test", pa.int64()),
    ("n_features", pa.int64()),
    ("n_classes", pa.int64()),
    ("n_tasks", pa.int64()),
    ("dim_w", pa.int64()),
    ("dim_lam", pa.int64()),
    ("inner_lr", pa.float64()),           # η: the study's inner_lr, else the problem's 1/L
)
#: algorithm params common across the catalog (the study's value, else the default)
ALGORITHM_PARAM_FIELDS = (
    ("batch_size", pa.int64()),           # rows per minibatch (stochastic methods)
    ("step_size", pa.float64()),          # solvers' inner step α (null: the problem's η)
    ("outer_ratio", pa.float64()),        # solvers: outer step = step_size / outer_ratio
    ("n_inner_steps", pa.int64()),        # two-loop solvers: inner steps per λ update
)
#: pipeline params common across studies (the study's value, else the pipeline's default)
PIPELINE_PARAM_FIELDS = (
    ("outer_lr", pa.float64()),           # hpo
    ("outer_steps", pa.int64()),          # hpo
    ("optimizer", pa.string()),           # hpo: the outer optimizer
    ("num_samples", pa.int64()),          # blackbox: trials per search
    ("time_budget_s", pa.float64()),      # hpo, blackbox
)
PARAM_FIELDS = (*PROBLEM_FIELDS, *ALGORITHM_PARAM_FIELDS, *PIPELINE_PARAM_FIELDS)
PARAM_COLUMNS = tuple(name for name, _ in PARAM_FIELDS)

STATUSES = ("ok", "error", "diverged", "timeout", "crashed")
#: statuses that ``--retry-failed`` re-runs; "ok" cells are always skipped on resume
FAILED_STATUSES = ("error", "diverged", "timeout", "crashed")

RESULT_SCHEMA = pa.schema([
    ("study", pa.string()),
    ("cell_id", pa.string()),
    ("pipeline", pa.string()),
    ("problem", pa.string()),
    ("algorithm", pa.string()),
    ("backend", pa.string()),
    ("dtype", pa.string()),
    ("K", pa.int64()),
    ("K_setting", pa.string()),         # "t" (K = t), the K as a string, or null (K unused)
    ("t", pa.int64()),
    ("seed", pa.int64()),
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("attempt", pa.int64()),
    ("hypergrad_rel_error", pa.float64()),
    ("hypergrad_abs_error", pa.float64()),
    ("hypergrad_norm", pa.float64()),
    ("outer_grad_norm", pa.float64()),      # hpo: ‖∇F(λ_final)‖, float64 oracle
    ("outer_grad_norm_rel", pa.float64()),  # hpo: ÷ ‖∇F(λ₀)‖
    ("inner_suboptimality", pa.float64()),
    ("val_loss", pa.float64()),
    ("test_loss", pa.float64()),
    ("test_accuracy", pa.float64()),
    ("wall_time_s", pa.float64()),
    ("compile_time_s", pa.float64()),
    ("peak_memory_mb", pa.float64()),
    *COST_FIELDS,
    ("solver_iters", pa.int64()),
    ("started_at", pa.timestamp("us", tz="UTC")),
    ("finished_at", pa.timestamp("us", tz="UTC")),
    ("hostname", pa.string()),
    ("device", pa.string()),
    ("hypersweep_version", pa.string()),
    ("problem_params", pa.string()),    # canonical JSON
    ("algorithm_params", pa.string()),  # canonical JSON
    ("pipeline_params", pa.string()),   # canonical JSON
    *PARAM_FIELDS,                      # typed copies of the common params (module doc)
    ("extra", pa.string()),             # JSON: pipeline-specific scalars (e.g. final λ summary)
])

TRACE_SCHEMA = pa.schema([
    ("study", pa.string()),
    ("cell_id", pa.string()),
    ("step", pa.int64()),
    ("wall_time_s", pa.float64()),
    ("val_loss", pa.float64()),
    ("test_loss", pa.float64()),
    ("test_accuracy", pa.float64()),
    ("best_val_loss", pa.float64()),
    ("lam_mean", pa.float64()),
    ("lam_min", pa.float64()),
    ("lam_max", pa.float64()),
    ("hypergrad_norm", pa.float64()),
    ("outer_grad_norm", pa.float64()),      # ‖∇F(λ_k)‖, float64 oracle
    ("inner_distance", pa.float64()),       # ‖w_k − w*(λ_k)‖
    *COST_FIELDS,
    ("extra", pa.string()),
])

RESULT_COLUMNS = RESULT_SCHEMA.names
TRACE_COLUMNS = TRACE_SCHEMA.names


def _typed(value: Any, kind: pa.DataType) -> Any:
    """``value`` as the column type ``kind``, or None when it is not one (a bool is not a
    number; an integral float is an integer)."""
    if value is None or isinstance(value, bool):
        return None
    if pa.types.is_string(kind):
        return value if isinstance(value, str) else None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if pa.types.is_integer(kind):
        return int(value) if float(value).is_integer() else None
    return float(value)


def typed_params(fields: tuple, values: Mapping[str, Any]) -> dict:
    """``{column: value}`` for each of ``fields`` (name, type) that ``values`` has, typed;
    a value that is not of the column's type (a list, a string for a number) is null."""
    return {name: _typed(values.get(name), kind) for name, kind in fields}


def empty_row() -> dict:
    return {name: None for name in RESULT_COLUMNS}


def empty_trace() -> dict:
    return {name: None for name in TRACE_COLUMNS}
