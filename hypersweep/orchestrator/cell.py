"""A cell — (problem, algorithm, backend, K, t, seed) of a study — its result row,
``run_cell`` and ``run_cells``.

``run_cell`` is a plain function, runnable without Ray: it dispatches to the cell's
pipeline (looked up in :data:`hypersweep.pipelines.catalog.PIPELINES`), times it, and turns
exceptions and non-finite numbers into statuses. ``run_cells`` does the same for cells of
one :meth:`Cell.batch_key` through the pipeline's ``run_batch`` (one row per cell, yielded
as each is known). The Ray actor (``actors.py``) is a thin shell around both.
:func:`cell_row` is the one place a result row is started, for the rows these return and
for those the driver writes for a cell that returned none; :func:`result_row` the one
place a pipeline's result (or exception) becomes a row's outcome.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import logging
import math
import os
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

from hypersweep import __version__
from hypersweep.algorithms.catalog import ALGORITHMS
from hypersweep.io.schema import (ALGORITHM_PARAM_FIELDS, PIPELINE_PARAM_FIELDS, empty_row,
                                  empty_trace, typed_params)
from hypersweep.pipelines.catalog import PIPELINES
from hypersweep.registry import load_object

log = logging.getLogger(__name__)


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

    def batch_key(self) -> tuple:
        """Cells with the same key may run as one task (the pipeline's ``run_batch``):
        everything that identifies a cell but ``t``, ``K``, ``K_setting`` and ``seed``."""
        return (self.study, self.pipeline, self.problem, self.problem_params, self.backend,
                self.dtype, self.algorithm, self.algorithm_params, self.pipeline_params)


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


def _defaults(registry, name: str, read) -> dict:
    """``read(spec)`` of ``name`` in ``registry``, or {} for a name it does not hold (a
    plugin's, a test's) or defaults that cannot be read."""
    if name not in registry:
        return {}
    try:
        return dict(read(registry.spec(name)) or {})
    except Exception:  # noqa: BLE001 - a row is never refused for its typed copies
        log.debug("no defaults for %r", name, exc_info=True)
        return {}


@functools.lru_cache(maxsize=1024)
def param_columns(algorithm: str, algorithm_params: str, pipeline: str,
                  pipeline_params: str) -> tuple:
    """The typed param columns (``schema.ALGORITHM_PARAM_FIELDS`` and
    ``PIPELINE_PARAM_FIELDS``) of a cell, as ``(column, value)`` pairs: the cell's value,
    else the catalog's default (the pipeline model's for ``pipeline_params``). Never
    changes the JSON columns or the cell's identity."""
    algorithm_values = {**_defaults(ALGORITHMS, algorithm, lambda spec: spec.params),
                        **json.loads(algorithm_params)}
    pipeline_values = {**_defaults(PIPELINES, pipeline, lambda spec: spec.params_model and
                                   load_object(spec.params_model).defaults()),
                       **json.loads(pipeline_params)}
    return tuple({**typed_params(ALGORITHM_PARAM_FIELDS, algorithm_values),
                  **typed_params(PIPELINE_PARAM_FIELDS, pipeline_values)}.items())


def cell_row(cell: Cell, attempt: int, **columns: Any) -> dict:
    """A result row of ``cell``'s ``attempt``: the schema's columns, the cell's identity,
    the typed copies of its common params (:func:`param_columns`), the package version,
    then ``columns``."""
    row = empty_row()
    row.update(study=cell.study, cell_id=cell.cell_id, pipeline=cell.pipeline,
               problem=cell.problem, algorithm=cell.algorithm, backend=cell.backend,
               dtype=cell.dtype, K=cell.K, K_setting=cell.K_setting, t=cell.t,
               seed=cell.seed, attempt=attempt, hypersweep_version=__version__,
               problem_params=cell.problem_params, algorithm_params=cell.algorithm_params,
               pipeline_params=cell.pipeline_params)
    row.update(param_columns(cell.algorithm, cell.algorithm_params, cell.pipeline,
                             cell.pipeline_params))
    row.update(columns)
    return row


def _instance_columns(cell: Cell) -> dict:
    """The sizes and η of ``cell``'s problem instance as this process built it (empty when
    it did not: a pipeline that failed first, or one of a plugin's own)."""
    from hypersweep.pipelines.common import instance_columns

    try:
        return instance_columns(cell)
    except Exception:  # noqa: BLE001 - a row is never refused for its typed copies
        log.debug("no instance columns for %s", cell.cell_id, exc_info=True)
        return {}


def failure_row(cell: Cell, attempt: int, status: str, message: str,
                started_at: _dt.datetime | None = None, wall_time_s: float | None = None
                ) -> dict:
    """The row the driver writes for a cell attempt that returned none (timeout, crash)."""
    return cell_row(cell, attempt, status=status, error_message=message[:2000],
                    started_at=started_at or _now(), finished_at=_now(),
                    wall_time_s=wall_time_s)


#: the metrics whose non-finite value makes a cell ``diverged``
WATCHED_METRICS = ("hypergrad_rel_error", "hypergrad_abs_error", "hypergrad_norm",
                   "val_loss", "inner_suboptimality")


def _fill(row: dict, cell: Cell, result: PipelineResult, extra: dict) -> list[dict]:
    """Put ``result`` in ``row`` (schema columns, the rest in ``extra``, device, status);
    return its trace rows."""
    columns, more = {}, dict(extra)
    for key, value in result.metrics.items():
        if key in row and key not in ("study", "cell_id"):
            columns[key] = value
        else:
            more[key] = value
    row.update(columns)
    row["extra"] = canonical_json(more) if more else None
    row["device"] = result.device
    traces = []
    for step_row in result.traces:
        trace = empty_trace()
        trace.update(study=cell.study, cell_id=cell.cell_id)
        trace.update({k: v for k, v in step_row.items() if k in trace})
        traces.append(trace)
    bad = [k for k in WATCHED_METRICS if row[k] is not None and not _finite(float(row[k]))]
    row["status"] = "diverged" if bad else "ok"
    if bad:
        row["error_message"] = f"non-finite {', '.join(bad)}"
    return traces


def result_row(cell: Cell, attempt: int, outcome: "PipelineResult | BaseException", *,
               started_at: _dt.datetime, wall_time_s: float,
               extra: dict | None = None) -> tuple[dict, list[dict]]:
    """(row, trace rows) of ``cell``'s ``attempt`` from what its pipeline gave: a
    :class:`PipelineResult` (status ``ok``, or ``diverged`` on a non-finite watched metric)
    or the exception it raised (``error``, with the traceback in ``extra``). A result that
    cannot be read is an ``error`` too. ``wall_time_s`` is used when the metrics carry
    none; ``extra`` entries are added to the row's ``extra`` unless the metrics set them.
    The one place a pipeline's outcome becomes a row (:func:`run_cell`, :func:`run_cells`).
    """
    row = cell_row(cell, attempt, hostname=socket.gethostname(), started_at=started_at)
    traces: list[dict] = []
    error = outcome if isinstance(outcome, BaseException) else None
    if error is None:
        try:
            traces = _fill(row, cell, outcome, extra or {})
        except Exception as exc:  # noqa: BLE001 - an unreadable result is the cell's error
            error = exc
    if error is not None:  # a failing cell is recorded, never fatal for the sweep
        traces = []
        row["status"] = "error"
        row["error_message"] = f"{type(error).__name__}: {error}".strip()[:2000]
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__,
                                                  limit=8))
        row["extra"] = canonical_json({**(extra or {}), "traceback": text[-4000:]})
    for key, value in _instance_columns(cell).items():
        if row.get(key, value) is None:  # a pipeline's own value wins
            row[key] = value
    if row["wall_time_s"] is None:
        row["wall_time_s"] = wall_time_s
    row["finished_at"] = _now()
    if row["device"] is None:
        row["device"] = os.environ.get("HYPERSWEEP_DEVICE", "cpu")
    return row, traces


def run_cell(cell: Cell, attempt: int = 1) -> tuple[dict, list[dict]]:
    """Run one cell; return (result row, trace rows). Never raises for cell failures."""
    started_at = _now()
    t0 = time.perf_counter()
    try:
        outcome: PipelineResult | BaseException = load_object(
            PIPELINES.spec(cell.pipeline).run)(cell)
    except Exception as exc:  # noqa: BLE001 - recorded as the cell's error row
        outcome = exc
    return result_row(cell, attempt, outcome, started_at=started_at,
                      wall_time_s=time.perf_counter() - t0)


def run_cells(cells: Sequence[Cell], attempts: Sequence[int] | None = None
              ) -> Iterator[tuple[dict, list[dict]]]:
    """Run cells of one :meth:`Cell.batch_key`; yield (row, trace rows) per cell as each
    is known, every cell exactly once. Never raises for cell failures.

    ``attempts``: each cell's attempt number (default 1). Several cells of a pipeline with
    ``run_batch`` go through it as one call: each yielded result becomes its cell's row
    (:func:`result_row`), with ``extra.batch_size`` = the number of cells and, when the
    pipeline gives no ``wall_time_s``, the batch's elapsed time so far / that number. A
    result for a cell not asked for, or for one already yielded, is ignored; an exception
    yielded instead of a result is that cell's ``error`` row. If
    ``run_batch`` raises, or ends without yielding some cells, those run one by one
    through :func:`run_cell` (their ``extra.batch_error`` says why, when it raised).
    One cell, or a pipeline without ``run_batch``: :func:`run_cell` per cell.
    """
    cells = list(cells)
    attempts = [1] * len(cells) if attempts is None else [int(a) for a in attempts]
    if len(attempts) != len(cells):
        raise ValueError(f"run_cells: {len(cells)} cells but {len(attempts)} attempts")
    if len({cell.batch_key() for cell in cells}) > 1:
        raise ValueError("run_cells: the cells must share one batch_key (study, pipeline, "
                         "problem, backend, dtype, algorithm and their params)")
    attempt_of = {cell.cell_id: attempt for cell, attempt in zip(cells, attempts)}
    pending = {cell.cell_id: cell for cell in cells}
    spec = PIPELINES.spec(cells[0].pipeline) if cells else None
    batch_error = None
    if len(pending) > 1 and spec.run_batch:
        size = len(pending)
        started_at = _now()
        t0 = time.perf_counter()
        try:
            for cell, outcome in load_object(spec.run_batch)(list(pending.values())):
                mine = pending.pop(getattr(cell, "cell_id", None), None)
                if mine is None:  # a duplicate, or not one of ours
                    continue
                yield result_row(mine, attempt_of[mine.cell_id], outcome,
                                 started_at=started_at,
                                 wall_time_s=(time.perf_counter() - t0) / size,
                                 extra={"batch_size": size})
        except Exception as exc:  # noqa: BLE001 - the cells left run one by one below
            batch_error = f"{type(exc).__name__}: {exc}".strip()[:500]
            log.warning("run_batch of pipeline %r raised (%s); running its %d remaining "
                        "cell(s) one by one", cells[0].pipeline, batch_error, len(pending))
    for cell in list(pending.values()):
        row, traces = run_cell(cell, attempt_of[cell.cell_id])
        if batch_error is not None:
            merged = json.loads(row["extra"]) if row["extra"] else {}
            merged.setdefault("batch_error", batch_error)
            row["extra"] = canonical_json(merged)
        yield row, traces
