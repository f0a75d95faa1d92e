"""The explicit Parquet schemas of result rows and per-step traces.

One row per cell; ``None`` where a value does not apply. Every pipeline fills the same
columns, so a study's files always concatenate (pandas, polars, duckdb read them).
"""
from __future__ import annotations

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


def empty_row() -> dict:
    return {name: None for name in RESULT_COLUMNS}


def empty_trace() -> dict:
    return {name: None for name in TRACE_COLUMNS}
