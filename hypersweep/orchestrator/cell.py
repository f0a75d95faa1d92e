"""A cell — (problem, algorithm, backend, K, t, seed) of a study — its result row, and
``run_cell``.

``run_cell`` is a plain function, runnable without Ray: it dispatches to the cell's
pipeline (looked up in :data:`hypersweep.pipelines.catalog.PIPELINES`), times it, and turns
exceptions and non-finite numbers into statuses. The Ray actor (``actors.py``) is a thin
shell around it. :func:`cell_row` is the one place a result row is built, for the rows
``run_cell`` returns and for those the driver writes for a cell that returned none.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

from hypersweep import __version__
from hypersweep.io.schema import empty_row, empty_trace
from hypersweep.pipelines.catalog import PIPELINES
from hypersweep.registry import load_object


def canonical_json(value: Any) -> str:
    """``value`` as compact JSON with sorted keys: equal values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def stable_hash(value: Any, digest_size: int) -> str:
    """Hex blake2b of :func:`canonical_json` of ``value``: the same in every process and
    run (never Python's salted ``hash``). Cell ids and MLflow group ids are made of it."""
    return hashlib.blake2b(canonical_json(value).encode(), digest_size=digest_size).hexdigest()


@dataclass(frozen=True)
class Cell:
    """One unit of work. ``K`` is None for algorithms that do not use K.

    ``K_setting`` is the study's K entry the cell belongs to: ``"t"`` for a ``K: [.., t]``
    line (K = t), else K as a string (None when K is None). A study with ``K: [10, t]``
    has two cells at t = 10, one per line, so each line is whole in Parquet and MLflow.
    """

    study: str
    pipeline: str
    problem: str
    algorithm: str
    backend: str
    t: int
    K: int | None
    seed: int
    dtype: str = "float64"
    problem_params: str = "{}"     # canonical JSON (hashable, stable)
    algorithm_params: str = "{}"
    pipeline_params: str = "{}"
    K_setting: str | None = None
    cell_id: str = field(default="", compare=False)

    def __post_init__(self):
        if self.K is None and self.K_setting is not None:
            raise ValueError(f"K_setting {self.K_setting!r} given for a cell without K")
        if self.K is not None and self.K_setting is None:
            object.__setattr__(self, "K_setting", str(self.K))
        if self.K_setting not in (None, "t", str(self.K)):
            raise ValueError(f"K_setting must be 't' or {str(self.K)!r} for K={self.K}; "
                             f"got {self.K_setting!r}")
        if self.K_setting == "t" and self.K != self.t:
            raise ValueError(f"K_setting 't' needs K = t; got K={self.K}, t={self.t}")
        if not self.cell_id:
            object.__setattr__(self, "cell_id", make_cell_id(self))

    @property
    def problem_kwargs(self) -> dict:
        return json.loads(self.problem_params)

    @property
    def algorithm_kwargs(self) -> dict:
        return json.loads(self.algorithm_params)

    @property
    def pipeline_kwargs(self) -> dict:
        return json.loads(self.pipeline_params)

    def to_dict(self) -> dict:
        return asdict(self)

    def shape_key(self) -> tuple:
        """Cells with the same key reuse compiled functions inside an actor."""
        return (self.problem, self.problem_params, self.backend, self.dtype)


def make_cell_id(cell: "Cell") -> str:
    """Readable and deterministic: ``problem-algorithm-backend-t-K-seed-<hash of params>``.

    A K = t cell reads ``.Kt.`` and hashes its setting too, so it differs from the fixed-K
    cell with the same K; the ids of fixed-K cells are those from before K_setting existed.
    """
    fields = (cell.study, cell.pipeline, cell.problem, cell.algorithm, cell.backend, cell.t,
              cell.K, cell.seed, cell.dtype, cell.problem_params, cell.algorithm_params,
              cell.pipeline_params)
    if cell.K_setting == "t":
        fields = fields + ("K=t",)
    digest = stable_hash(fields, digest_size=4)
    k = "-" if cell.K is None else ("t" if cell.K_setting == "t" else str(cell.K))
    return (f"{cell.problem}.{cell.algorithm}.{cell.backend}.t{cell.t}.K{k}.s{cell.seed}"
            f".{digest}")


@dataclass
class PipelineResult:
    """What a pipeline's ``run(cell)`` returns: row metrics and optional per-step traces.

    ``metrics`` keys are result-schema columns (hypergrad_rel_error, val_loss, ...);
    unknown keys go to the ``extra`` JSON column. ``device`` says where it ran.
    """

    metrics: dict
    traces: list = field(default_factory=list)
    device: str = "cpu"


def _finite(value) -> bool:
    return not (isinstance(value, float) and (math.isnan(value) or math.isinf(value)))


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def cell_row(cell: Cell, attempt: int, **columns: Any) -> dict:
    """A result row of ``cell``'s ``attempt``: the schema's columns, the cell's identity,
    the package version, then ``columns``."""
    row = empty_row()
    row.update(study=cell.study, cell_id=cell.cell_id, pipeline=cell.pipeline,
               problem=cell.problem, algorithm=cell.algorithm, backend=cell.backend,
               dtype=cell.dtype, K=cell.K, K_setting=cell.K_setting, t=cell.t,
               seed=cell.seed, attempt=attempt, hypersweep_version=__version__,
               problem_params=cell.problem_params, algorithm_params=cell.algorithm_params,
               pipeline_params=cell.pipeline_params)
    row.update(columns)
    return row


def failure_row(cell: Cell, attempt: int, status: str, message: str,
                started_at: _dt.datetime | None = None, wall_time_s: float | None = None
                ) -> dict:
    """The row the driver writes for a cell attempt that returned none (timeout, crash)."""
    return cell_row(cell, attempt, status=status, error_message=message[:2000],
                    started_at=started_at or _now(), finished_at=_now(),
                    wall_time_s=wall_time_s)


def run_cell(cell: Cell, attempt: int = 1) -> tuple[dict, list[dict]]:
    """Run one cell; return (result row, trace rows). Never raises for cell failures."""
    row = cell_row(cell, attempt, hostname=socket.gethostname(), started_at=_now())
    t0 = time.perf_counter()
    traces: list[dict] = []
    try:
        run = load_object(PIPELINES.spec(cell.pipeline).run)
        result: PipelineResult = run(cell)
        extra = {}
        for key, value in result.metrics.items():
            if key in row and key not in ("study", "cell_id"):
                row[key] = value
            else:
                extra[key] = value
        row["extra"] = canonical_json(extra) if extra else None
        row["device"] = result.device
        traces = []
        for step_row in result.traces:
            tr = empty_trace()
            tr.update(study=cell.study, cell_id=cell.cell_id)
            tr.update({k: v for k, v in step_row.items() if k in tr})
            traces.append(tr)
        watched = ("hypergrad_rel_error", "hypergrad_abs_error", "hypergrad_norm",
                   "val_loss", "inner_suboptimality")
        bad = [k for k in watched if row[k] is not None and not _finite(float(row[k]))]
        if bad:
            row["status"] = "diverged"
            row["error_message"] = f"non-finite {', '.join(bad)}"
        else:
            row["status"] = "ok"
    except Exception as exc:  # a failing cell is recorded, never fatal for the sweep
        row["status"] = "error"
        msg = f"{type(exc).__name__}: {exc}".strip()
        row["error_message"] = msg[:2000]
        row["extra"] = canonical_json({"traceback": traceback.format_exc(limit=8)[-4000:]})
    row["wall_time_s"] = row["wall_time_s"] if row["wall_time_s"] is not None else (
        time.perf_counter() - t0)
    row["finished_at"] = _now()
    if row["device"] is None:
        row["device"] = os.environ.get("HYPERSWEEP_DEVICE", "cpu")
    return row, traces
