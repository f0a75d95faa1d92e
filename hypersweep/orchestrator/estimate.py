"""How long a study will take: a per-cell estimate from measured rows, for ``hypersweep plan``.

Each cell is priced from the rows of cells already run, best match first:

1. **results** — ``ok`` rows in the study's own output (``<output>/results/*.parquet``:
   earlier runs of this study, or of the one it grew from);
2. **baseline** — the regression baseline ``benchmarks/baseline.parquet`` (every estimator
   on a small instance of every problem, pipeline ``hypergradient_error``, t = 20, K = 10;
   :mod:`hypersweep.tools.regression`);
3. **model** — the rough per-step model :data:`MODEL`, when no row of the same
   (pipeline, problem, algorithm, backend) exists.

A reference is a group of rows with the same (pipeline, problem, algorithm, backend). Among
them the closest configuration wins: the same (dtype, problem params, algorithm params,
pipeline params, t, K) — ``match = "exact"``, the cell's own cost — else the same instance
(problem params), then the study's own rows, then the same dtype and algorithm params,
then the nearest budget, scaled (``"scaled"``); seeds never change a price. An
``hpo`` cell whose (problem, algorithm, backend) has only ``hypergradient_error`` rows is
priced per estimator call (``"per_call"``): the call's measured time × outer steps, plus one
evaluation per ``eval_every`` steps, whose float64 oracle costs what the ``exact`` row of
the same instance measured.

Budget scaling counts *work units* (oracle calls, roughly): an estimator or online step is
2t + K (t forward steps, up to t reverse ones, K adjoint or truncation steps — the
``hypergradient_error`` pipeline's own ``cost``); a solver step 1 + its ``n_*_steps``
params; a black-box trial, or a ``fixed`` baseline step, t. ``hpo`` repeats it ``outer_steps`` times, ``blackbox``
``num_samples`` times. The measured ``wall_time_s`` scales with the units; the rest of a
cell (building the instance, the oracle, the evaluations: the row's time on its actor —
``extra.actor_busy_s``, a batch's split among its rows, else finished − started — minus
wall and compile) with the number of evaluations. Not scaled: the instance size (a reference on
other problem params keeps its own size: ``same_instance`` says so) and the cost of the
``exact`` oracle in t.

What one cell costs (:class:`CellEstimate`): ``seconds`` once its functions are compiled,
``wall_s`` the part its row's ``wall_time_s`` will report, and ``compile_s`` the JAX
compilation that the first cell of its kind pays on each actor. A study's time on n actors
(:meth:`StudyEstimate.seconds_on`) is ``actor_start_s`` + max(work / n, the longest cell),
where work counts every cell once and each compiled kind once per actor that meets it (at
most n). Batched cells (``batching``) share inner runs and cost less than priced here.

Reads Parquet with pyarrow; imports neither torch, jax nor Ray, and writes nothing (an
unreadable results part is skipped, not quarantined).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from hypersweep import algorithms as algorithm_registry
from hypersweep.io.parquet import latest_rows
from hypersweep.orchestrator.cell import Cell
from hypersweep.pipelines.catalog import PIPELINES

log = logging.getLogger(__name__)

#: The regression baseline shipped with the repository (see docs/regression.md).
BASELINE_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "baseline.parquet"
SOURCES = ("results", "baseline", "model")
MATCHES = ("exact", "scaled", "per_call", "model")
_COLUMNS = ("cell_id", "status", "hostname", "pipeline", "problem", "algorithm", "backend",
            "dtype", "t", "K", "problem_params", "algorithm_params", "pipeline_params",
            "wall_time_s", "compile_time_s", "started_at", "finished_at", "extra")


@dataclass(frozen=True)
class Model:
    """The fallback per-step model. Measured on the regression instances (tens to hundreds
    of inner variables) on 2 CPUs — medians of ``benchmarks/baseline.parquet`` and of small
    ``hpo`` cells on ridge; a large instance or a GPU changes every one of them."""

    #: seconds per work unit (≈ one oracle call), per backend: median wall_time_s / (2t + K)
    seconds_per_unit: Mapping[str, float] = field(
        default_factory=lambda: {"jax": 3e-5, "torch": 7e-5})
    #: a cell's seconds outside its timed part: the instance, the oracle, the row
    cell_overhead_s: float = 0.03
    #: one hpo / blackbox evaluation: val/test metrics at the iterate ...
    metrics_s: float = 3e-4
    #: ... plus, with ``oracle_metrics``, the float64 oracle's ∇F and w* (when no ``exact``
    #: row of the instance measured it)
    oracle_s: float = 7e-4
    #: JAX compilation of one kind of cell on one actor (median compile_time_s > 0)
    compile_s: Mapping[str, float] = field(default_factory=lambda: {"jax": 0.4, "torch": 0.0})
    #: an actor's start: the Ray worker, then importing torch and jax (≈ 2-3 s measured)
    actor_start_s: float = 5.0

    def as_dict(self) -> dict:
        return {key: dict(value) if isinstance(value, Mapping) else value
                for key, value in asdict(self).items()}


MODEL = Model()


# ---------------------------------------------------------------------------------------
# Work units and evaluations of a configuration.


def _kind(algorithm: str) -> str:
    return algorithm_registry.spec(algorithm).kind if algorithm in \
        algorithm_registry.ALGORITHMS else "estimator"


def _pipeline_params(pipeline: str, params: Mapping[str, Any]) -> dict:
    """``params`` over the pipeline's defaults (unknown keys kept: old rows may have them)."""
    defaults: dict = {}
    if pipeline in PIPELINES and PIPELINES.spec(pipeline).params_model:
        from hypersweep.registry import load_object

        defaults = load_object(PIPELINES.spec(pipeline).params_model).defaults()
    return {**defaults, **params}


def _algorithm_params(algorithm: str, params: Mapping[str, Any]) -> dict:
    if algorithm in algorithm_registry.ALGORITHMS:
        return {**algorithm_registry.spec(algorithm).params, **params}
    return dict(params)


def _positive_int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
        else default


@dataclass(frozen=True)
class Config:
    """What a cell's cost depends on: the cell minus its seed (and study)."""

    pipeline: str
    problem: str
    algorithm: str
    backend: str
    dtype: str
    t: int
    K: int | None
    problem_params: str
    algorithm_params: str
    pipeline_params: str

    @classmethod
    def of(cls, cell: Cell) -> "Config":
        return cls(cell.pipeline, cell.problem, cell.algorithm, cell.backend, cell.dtype,
                   cell.t, cell.K, cell.problem_params, cell.algorithm_params,
                   cell.pipeline_params)

    @property
    def group(self) -> tuple[str, str, str, str]:
        return (self.pipeline, self.problem, self.algorithm, self.backend)

    @functools.cached_property
    def params(self) -> dict:
        """The pipeline params over the pipeline's defaults."""
        return _pipeline_params(self.pipeline, json.loads(self.pipeline_params or "{}"))

    def step_units(self) -> float:
        """Work units of one estimator call, online step, solver step or trial."""
        kind = _kind(self.algorithm)
        if kind == "solver":
            params = _algorithm_params(self.algorithm,
                                       json.loads(self.algorithm_params or "{}"))
            return 1.0 + sum(value for key, value in params.items()
                             if key.startswith("n_") and key.endswith("_steps")
                             and isinstance(value, int) and not isinstance(value, bool))
        if kind in ("searcher", "baseline"):  # forward inner steps only
            return float(self.t)
        return 2.0 * self.t + float(self.K or 0)

    def repeats(self) -> int:
        """Steps (hpo: outer steps) or trials (blackbox) one cell runs."""
        params = self.params
        if self.pipeline == "hpo":
            return _positive_int(params.get("outer_steps"), 100)
        if self.pipeline == "blackbox":
            return _positive_int(params.get("num_samples"), 20)
        return 1

    def units(self) -> float:
        return self.step_units() * self.repeats()

    def evaluations(self) -> int:
        """How many times the cell scores an iterate (hpo: every ``eval_every`` steps and
        the last, and λ₀ for a solver; blackbox: every trial; otherwise once)."""
        params = self.params
        if self.pipeline == "hpo":
            every = _positive_int(params.get("eval_every"), 1)
            return math.ceil(self.repeats() / every) + (_kind(self.algorithm) == "solver")
        return self.repeats()

    def oracle_metrics(self) -> bool:
        return bool(self.params.get("oracle_metrics", True))

    def time_budget_s(self) -> float | None:
        value = self.params.get("time_budget_s")
        return float(value) if isinstance(value, (int, float)) and value > 0 else None


# ---------------------------------------------------------------------------------------
# Reference rows.


@dataclass(frozen=True)
class Measured:
    """The rows of one configuration in one source (several seeds, usually)."""

    source: str
    config: Config
    cell_ids: tuple[str, ...]
    wall_s: float       # median wall_time_s
    other_s: float      # the low median of (time on its actor − wall − compile)
    compile_s: float    # the largest compile_time_s (the first cell of a process pays it)


def _extra(row: Mapping[str, Any]) -> dict:
    try:
        extra = json.loads(row.get("extra") or "{}")
    except (TypeError, ValueError):
        return {}
    return extra if isinstance(extra, dict) else {}


def _seconds(value: Any) -> float:
    return float(value) if _finite(value) else 0.0


def cell_elapsed(rows: list[Mapping[str, Any]]) -> list[float | None]:
    """Each row's seconds on its actor (None when unknown).

    A row from an actor carries ``extra.actor_busy_s``, the actor's time since its previous
    row; a row run in-process (``hypersweep regress``) has finished − started. A batch
    (``extra.batch_size`` > 1; its rows share ``started_at``) yields its rows as it goes,
    so its first row holds most of the batch's time: its time outside the rows' own wall
    and compile shares is split evenly among its rows."""
    elapsed: list[float | None] = []
    batches: dict[tuple, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        extra = _extra(row)
        busy = extra.get("actor_busy_s")
        if _finite(busy):
            elapsed.append(float(busy))
        elif row.get("started_at") is not None and row.get("finished_at") is not None:
            elapsed.append((row["finished_at"] - row["started_at"]).total_seconds())
        else:
            elapsed.append(None)
        size = extra.get("batch_size")
        if isinstance(size, int) and size > 1 and elapsed[-1] is not None:
            batches[(row.get("started_at"), row.get("hostname"), size)].append(i)
    for members in batches.values():
        own = [_seconds(rows[i].get("wall_time_s")) + _seconds(rows[i].get("compile_time_s"))
               for i in members]
        rest = max(sum(elapsed[i] for i in members) - sum(own), 0.0) / len(members)
        for i, seconds in zip(members, own):
            elapsed[i] = seconds + rest
    return elapsed


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def measured_groups(rows: Iterable[Mapping[str, Any]], source: str) -> list[Measured]:
    """One :class:`Measured` per configuration among the ``ok`` ``rows`` with a wall time.

    ``other_s`` is the *low* median: with two seeds, the one that did not also pay the
    process's first imports (a cold process spends seconds importing torch or jax)."""
    rows = [row for row in rows
            if row.get("status") == "ok" and _finite(row.get("wall_time_s"))]
    by_config: dict[Config, list[tuple[Mapping[str, Any], float | None]]] = defaultdict(list)
    for row, elapsed in zip(rows, cell_elapsed(rows)):
        config = Config(row["pipeline"], row["problem"], row["algorithm"], row["backend"],
                        row.get("dtype") or "float64", int(row["t"]),
                        None if row.get("K") is None else int(row["K"]),
                        row.get("problem_params") or "{}",
                        row.get("algorithm_params") or "{}",
                        row.get("pipeline_params") or "{}")
        by_config[config].append((row, elapsed))
    out = []
    for config, group in by_config.items():
        walls = [float(row["wall_time_s"]) for row, _ in group]
        others = [max(elapsed - _seconds(row["wall_time_s"])
                      - _seconds(row.get("compile_time_s")), 0.0)
                  for row, elapsed in group if elapsed is not None]
        out.append(Measured(
            source=source, config=config,
            cell_ids=tuple(sorted(str(row.get("cell_id")) for row, _ in group)),
            wall_s=statistics.median(walls),
            other_s=(statistics.median_low(others) if others
                     else MODEL.cell_overhead_s),
            compile_s=max((_seconds(row.get("compile_time_s")) for row, _ in group),
                          default=0.0)))
    return out


def read_rows(path: str | Path) -> list[dict]:
    """The rows (the columns an estimate reads) of a Parquet file or of every part in a
    directory; unreadable parts are skipped with a warning, nothing is moved or written."""
    import pyarrow.parquet as pq

    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
    rows: list[dict] = []
    for file in files:
        try:
            schema = pq.read_schema(file)
            columns = [c for c in _COLUMNS if c in schema.names]
            table = pq.read_table(file, columns=columns)
        except Exception as exc:  # noqa: BLE001 - a part being written, or corrupt
            log.warning("cost estimate: skipping unreadable %s (%s)", file,
                        " ".join(str(exc).split())[:200])
            continue
        rows.extend(table.to_pylist())
    return rows


# ---------------------------------------------------------------------------------------
# Pricing cells.


@dataclass(frozen=True)
class CellEstimate:
    """A cell's expected cost on one actor, and where it came from."""

    seconds: float           # wall-clock of the cell once compiled: wall_s + the rest
    wall_s: float            # what its row's wall_time_s will say (the timed part)
    compile_s: float         # paid by the first cell of its kind on each actor (JAX)
    source: str              # "results", "baseline" or "model"
    match: str               # "exact", "scaled", "per_call" or "model"
    scale: float = 1.0       # work units of the cell / the reference's (model: the cell's)
    same_instance: bool = True   # the reference ran the same problem params
    reference: str | None = None  # one cell_id of the reference rows

    def as_dict(self) -> dict:
        return {key: (float(f"{value:.6g}") if isinstance(value, float) else value)
                for key, value in asdict(self).items()}


class Pricer:
    """Prices configurations from measured groups (see the module docstring); each
    configuration is priced once."""

    def __init__(self, measured: Iterable[Measured], model: Model = MODEL):
        self.model = model
        self.by_group: dict[tuple, list[Measured]] = defaultdict(list)
        for m in measured:
            self.by_group[m.config.group].append(m)
        self._cache: dict[Config, CellEstimate] = {}

    def price(self, cell: Cell) -> CellEstimate:
        config = Config.of(cell)
        if config not in self._cache:
            self._cache[config] = self._price(config)
        return self._cache[config]

    def _price(self, config: Config) -> CellEstimate:
        candidates = self.by_group.get(config.group, [])
        if candidates:
            return self._from_reference(config, min(candidates,
                                                    key=lambda m: self._rank(config, m)))
        if config.pipeline == "hpo" and _kind(config.algorithm) in ("estimator", "online"):
            calls = self.by_group.get(("hypergradient_error", *config.group[1:]), [])
            if calls:
                return self._per_call(config, min(
                    calls, key=lambda m: self._rank(config, m, per_call=True)))
        return self._model(config)

    @staticmethod
    def _rank(config: Config, m: Measured, *, per_call: bool = False) -> tuple:
        """Closest first: the same configuration, the same instance, the study's own rows,
        the same dtype and algorithm params, then the nearest budget (in work units; per
        step for a per-call reference)."""
        ref = m.config
        exact = ref == config
        if per_call:
            ratio = config.step_units() / max(ref.step_units(), 1e-12)
        else:
            ratio = config.units() / max(ref.units(), 1e-12)
        return (not exact, ref.problem_params != config.problem_params,
                m.source != "results", ref.dtype != config.dtype,
                ref.algorithm_params != config.algorithm_params, abs(math.log(ratio)),
                m.source, ref.t, ref.K or 0)

    @staticmethod
    def _capped(config: Config, wall: float) -> tuple[float, float]:
        """(wall, the fraction of the cell's steps it runs): ``time_budget_s`` stops a
        cell whose timed part would run longer (its evaluations stop with it)."""
        budget = config.time_budget_s()
        if budget is None or wall <= budget:
            return wall, 1.0
        return budget, budget / wall

    def _from_reference(self, config: Config, m: Measured) -> CellEstimate:
        exact = m.config == config
        scale = 1.0 if exact else config.units() / max(m.config.units(), 1e-12)
        wall, done = self._capped(config, m.wall_s * scale)
        evaluations = done * config.evaluations() / max(m.config.evaluations(), 1)
        other = m.other_s * (1.0 if exact else evaluations)
        return CellEstimate(seconds=wall + other, wall_s=wall, compile_s=m.compile_s,
                            source=m.source, match="exact" if exact else "scaled",
                            scale=scale,
                            same_instance=m.config.problem_params == config.problem_params,
                            reference=m.cell_ids[0] if m.cell_ids else None)

    def _oracle_s(self, config: Config) -> float:
        """One evaluation of an hpo cell: metrics, and the oracle's cost when it is on (the
        ``exact`` row of the same instance, else the model's)."""
        if not config.oracle_metrics():
            return self.model.metrics_s
        exact = [m for m in self.by_group.get(
            ("hypergradient_error", config.problem, "exact", config.backend), [])
            if m.config.problem_params == config.problem_params]
        oracle = min(m.wall_s for m in exact) if exact else self.model.oracle_s
        return self.model.metrics_s + oracle

    def _per_call(self, config: Config, m: Measured) -> CellEstimate:
        scale = config.step_units() / max(m.config.step_units(), 1e-12)
        wall, done = self._capped(config, m.wall_s * scale * config.repeats())
        other = m.other_s + done * config.evaluations() * self._oracle_s(config)
        return CellEstimate(seconds=wall + other, wall_s=wall, compile_s=m.compile_s,
                            source=m.source, match="per_call",
                            scale=scale * config.repeats(),
                            same_instance=m.config.problem_params == config.problem_params,
                            reference=m.cell_ids[0] if m.cell_ids else None)

    def _model(self, config: Config) -> CellEstimate:
        model = self.model
        per_unit = model.seconds_per_unit.get(config.backend,
                                              max(model.seconds_per_unit.values()))
        wall, done = self._capped(config, config.units() * per_unit)
        evaluations = done * config.evaluations() if config.pipeline in ("hpo", "blackbox") \
            else 0
        eval_s = model.metrics_s + (model.oracle_s if config.oracle_metrics() else 0.0)
        return CellEstimate(seconds=wall + model.cell_overhead_s + evaluations * eval_s,
                            wall_s=wall, compile_s=model.compile_s.get(config.backend, 0.0),
                            source="model", match="model", scale=config.units(),
                            same_instance=False)


# ---------------------------------------------------------------------------------------
# A study's estimate.


def _compile_kind(cell: Cell) -> tuple:
    """Cells that share compiled functions on an actor (t and K are traced in JAX)."""
    return (cell.pipeline, cell.algorithm, cell.algorithm_params, cell.backend, cell.dtype,
            cell.problem, cell.problem_params)


@dataclass
class StudyEstimate:
    """Totals over a study's cells, accumulated one cell at a time (:meth:`add`)."""

    model: Model = MODEL
    n_cells: int = 0
    cell_seconds: float = 0.0          # Σ seconds, compile excluded
    longest_cell_s: float = 0.0        # the largest seconds + compile_s of one cell
    pending_cells: int = 0
    pending_seconds: float = 0.0
    sources: Counter = field(default_factory=Counter)
    matches: Counter = field(default_factory=Counter)
    #: compile kind -> [compile seconds, cells of that kind]
    compiles: dict = field(default_factory=dict)

    def add(self, cell: Cell, estimate: CellEstimate, *, done: bool = False) -> None:
        self.n_cells += 1
        self.cell_seconds += estimate.seconds
        self.longest_cell_s = max(self.longest_cell_s, estimate.seconds + estimate.compile_s)
        self.sources[estimate.source] += 1
        self.matches[estimate.match] += 1
        entry = self.compiles.setdefault(_compile_kind(cell), [0.0, 0])
        entry[0] = max(entry[0], estimate.compile_s)
        entry[1] += 1
        if not done:
            self.pending_cells += 1
            self.pending_seconds += estimate.seconds

    def compile_seconds(self, actors: int = 1) -> float:
        """Compilation paid on ``actors`` actors: each kind once per actor that meets it."""
        return sum(seconds * min(actors, count) for seconds, count in self.compiles.values())

    def seconds_on(self, actors: int) -> float:
        """Expected wall clock of the whole study on ``actors`` actors (module docstring)."""
        actors = max(1, min(int(actors), max(self.n_cells, 1)))
        work = self.cell_seconds + self.compile_seconds(actors)
        return self.model.actor_start_s + max(work / actors, self.longest_cell_s)

    @property
    def source(self) -> str:
        """The one source of every cell's estimate, or "mixed"."""
        return next(iter(self.sources)) if len(self.sources) == 1 else "mixed"

    def actor_counts(self, *extra: int | None) -> list[int]:
        """1, 2, 4, … (at most 1024) and ``extra``, each capped by the number of cells."""
        cap = max(self.n_cells, 1)
        counts = {min(n, cap) for n in extra if n}
        n = 1
        while n <= min(cap, 1024):
            counts.add(n)
            n *= 2
        counts.add(min(cap, 1024))
        return sorted(counts)

    def as_dict(self, *, actors: int, actors_from: str, more_actors: Iterable[int] = (),
                references: Mapping[str, Any] | None = None) -> dict:
        """The JSON form: seconds per cell (mean, once compiled), serial totals, the study
        on ``actors`` actors (``actors_from`` says why that many) and on 1, 2, 4, …
        actors, where the estimates came from, and the model's constants."""
        mean = self.cell_seconds / self.n_cells if self.n_cells else 0.0
        return {
            "source": self.source,
            "sources": {s: self.sources[s] for s in SOURCES if self.sources[s]},
            "matches": {m: self.matches[m] for m in MATCHES if self.matches[m]},
            "seconds_per_cell": round(mean, 6),
            "longest_cell_s": round(self.longest_cell_s, 6),
            "cell_seconds": round(self.cell_seconds, 3),
            "compile_seconds": round(self.compile_seconds(1), 3),
            "total_seconds": round(self.cell_seconds + self.compile_seconds(1), 3),
            "pending_cells": self.pending_cells,
            "pending_seconds": round(self.pending_seconds, 3),
            "actors": actors,
            "actors_from": actors_from,
            "seconds_at_actors": round(self.seconds_on(actors), 3),
            "by_actors": [{"actors": n, "seconds": round(self.seconds_on(n), 3)}
                          for n in self.actor_counts(actors, *more_actors)],
            "references": dict(references or {}),
            "model": self.model.as_dict(),
        }


def load_pricer(output: str | Path | None, *, baseline: str | Path | None = BASELINE_PATH,
                model: Model = MODEL) -> tuple[Pricer, dict, set[str]]:
    """(pricer, where its rows came from, cell_ids with an ``ok`` row in ``output``).

    ``output``: the study's output (its ``results/`` parts are read; missing: none);
    ``baseline``: a baseline Parquet file (None or missing: none)."""
    measured: list[Measured] = []
    references: dict[str, Any] = {"results": None, "baseline": None}
    done: set[str] = set()
    if output is not None and (Path(output) / "results").is_dir():
        rows = latest_rows(read_rows(Path(output) / "results"))
        done = {str(r["cell_id"]) for r in rows if r.get("status") == "ok"}
        groups = measured_groups(rows, "results")
        measured += groups
        references["results"] = {"path": str(Path(output) / "results"),
                                  "rows": len(rows), "configs": len(groups)}
    if baseline is not None and Path(baseline).is_file():
        rows = read_rows(baseline)
        groups = measured_groups(rows, "baseline")
        measured += groups
        references["baseline"] = {"path": str(baseline), "rows": len(rows),
                                  "configs": len(groups)}
    return Pricer(measured, model), references, done


def local_actor_count(study, n_cells: int, cpus: int | None = None) -> int:
    """How many of the study's actors this machine's CPUs hold (GPUs not counted: a GPU
    study on a CPU-only machine runs its actors on CPUs, as the driver does)."""
    import os

    from hypersweep.orchestrator.resources import (pool_size, study_request,
                                                   without_missing_gpus)

    request, _ = without_missing_gpus(study_request(study), 0.0)
    try:
        return pool_size([{"CPU": float(cpus or os.cpu_count() or 1)}], request,
                         n_cells=n_cells)
    except ValueError:
        return 1


@dataclass
class PricedStudy:
    """A study's cells priced: the totals, the actor count its time is quoted for (and
    why), cells per pipeline / problem / algorithm / backend, where the rows came from,
    and (``with_cells``) every cell's fields, ``done`` flag and estimate."""

    totals: StudyEstimate
    actors: int
    actors_from: str
    local_actors: int
    counts: dict[str, Counter]
    references: dict
    cells: list[dict] | None = None


def price_study(study, *, baseline: str | Path | None = BASELINE_PATH,
                with_cells: bool = False) -> PricedStudy:
    """Price every cell of ``study`` (one pass over its expansion; a configuration once)
    from its own output's rows and ``baseline`` (:func:`load_pricer`). The time is quoted
    on ``num_actors`` actors, else on as many as this machine's CPUs hold."""
    import os

    from hypersweep.orchestrator.expand import expand

    pricer, references, done = load_pricer(study.output, baseline=baseline)
    totals = StudyEstimate(model=pricer.model)
    counts: dict[str, Counter] = {key: Counter()
                                  for key in ("pipeline", "problem", "algorithm", "backend")}
    cells: list[dict] | None = [] if with_cells else None
    for cell in expand(study):
        price = pricer.price(cell)
        is_done = cell.cell_id in done
        totals.add(cell, price, done=is_done)
        for key, counter in counts.items():
            counter[getattr(cell, key)] += 1
        if cells is not None:
            cells.append({**cell.to_dict(), "done": is_done, "estimate": price.as_dict()})
    local = local_actor_count(study, totals.n_cells)
    if study.num_actors:
        actors, actors_from = min(study.num_actors, max(totals.n_cells, 1)), "num_actors"
    else:
        actors, actors_from = local, f"this machine's {os.cpu_count() or 1} CPUs"
    return PricedStudy(totals, actors, actors_from, local, counts, references, cells)


def plan_document(study, summary, priced: PricedStudy) -> dict:
    """What ``hypersweep plan --json`` prints: the study, its cell count, counts per
    pipeline / problem / algorithm / backend and per (problem, algorithm), the skipped
    combinations, the resources, the estimate and the cells (``cells_included`` false:
    left out). ``summary`` is the :func:`~hypersweep.orchestrator.expand.plan`."""
    totals = priced.totals
    if totals.n_cells != summary.total:
        raise RuntimeError(f"the plan counts {summary.total} cells but the estimate priced "
                           f"{totals.n_cells}; this is a bug, please report it")
    resources = study.resources
    return {
        "study": study.study,
        "pipeline": study.pipeline,
        "backend": list(study.backend),
        "dtype": study.dtype,
        "output": study.output,
        "n_cells": summary.total,
        "counts": {key: dict(sorted(counter.items()))
                   for key, counter in priced.counts.items()},
        "pairs": [{"problem": p.problem, "algorithm": p.algorithm, "cells": p.cells}
                  for p in summary.pairs],
        "skipped": [{"problem": s.problem, "algorithm": s.algorithm, "backend": s.backend,
                     "reason": s.reason} for s in summary.skipped],
        "resources": {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus,
                      "memory_mb": resources.memory_mb, "num_actors": study.num_actors,
                      "max_retries": study.max_retries,
                      "cell_timeout_s": study.cell_timeout_s},
        "estimate": totals.as_dict(actors=priced.actors, actors_from=priced.actors_from,
                                   more_actors=[priced.local_actors],
                                   references=priced.references),
        "cells_included": priced.cells is not None,
        "cells": priced.cells if priced.cells is not None else [],
    }


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``."""
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


__all__ = ["BASELINE_PATH", "MODEL", "Model", "Config", "Measured", "CellEstimate",
           "Pricer", "StudyEstimate", "PricedStudy", "price_study", "plan_document",
           "load_pricer", "measured_groups", "cell_elapsed", "read_rows",
           "local_actor_count", "format_seconds"]
