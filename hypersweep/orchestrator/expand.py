"""A validated study -> its cells, their counts and the plan ``hypersweep plan`` shows.

A study expands to the cells ``problems × algorithms × backends × t × K × seeds`` (in that
order, deterministically), where ``t`` is the number of inner iterations (steps of Φ) and
``K`` the algorithm's second budget (adjoint solver steps, truncation length, Neumann
terms); ``K: t`` means K = t. Algorithms whose spec says ``uses_K=False`` get ``K=None``
and one cell per ``t``; an algorithm whose ``requires`` the problem's ``capabilities``
lack (e.g. stocbio needs ``"minibatch"``) is skipped for that problem, and
:func:`plan` reports it. ``expand`` is a generator: a 100,000-cell plan streams in about a
second and is never held in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from hypersweep import algorithms as algorithm_registry
from hypersweep import problems as problem_registry
from hypersweep.orchestrator.cell import Cell, canonical_json

if TYPE_CHECKING:
    from hypersweep.orchestrator.fields import AlgorithmEntry, ProblemEntry
    from hypersweep.orchestrator.spec import StudySpec


@dataclass(frozen=True)
class Skip:
    """A (problem, algorithm[, backend]) combination the study names but cannot run."""

    problem: str
    algorithm: str
    backend: str | None
    reason: str


@dataclass(frozen=True)
class PairCount:
    problem: str
    algorithm: str
    cells: int


def _k_values(k_spec: tuple | None, t: int, uses_K: bool
              ) -> list[tuple[int | None, str | None]]:
    """(K, K_setting) of one t, in study order: ``"t"`` resolves to (t, "t"), an integer k
    to (k, "k"). ``K: [10, t]`` at t = 10 gives two cells, one per line (same numbers,
    each line whole in Parquet and MLflow)."""
    if not uses_K:
        return [(None, None)]
    return [(t, "t") if k == "t" else (k, str(k)) for k in (k_spec or ())]


def _label(entry, entries) -> str:
    """The entry's name, plus its params when the study lists the name more than once."""
    if sum(other.name == entry.name for other in entries) == 1:
        return entry.name
    return entry.label


def _runnable(study: "StudySpec", problem: "ProblemEntry",
              algorithm: "AlgorithmEntry"):
    """(backends this pair runs on, skips). Only ``requires`` and missing impls skip."""
    problem_label = _label(problem, study.problems)
    algorithm_label = _label(algorithm, study.algorithms)
    algo = algorithm_registry.spec(algorithm.name)
    capabilities = problem_registry.spec(problem.name).capabilities
    missing = algo.requires - frozenset(capabilities)
    if missing:
        return [], [Skip(problem_label, algorithm_label, None,
                         f"{algorithm.name} requires {', '.join(sorted(missing))}, "
                         f"which {problem.name} lacks")]
    backends, skips = [], []
    for backend in study.backend:
        if backend in algo.impls:
            backends.append(backend)
        else:
            skips.append(Skip(problem_label, algorithm_label, backend,
                              f"{algorithm.name} has no {backend} implementation"))
    return backends, skips


def skipped_combinations(study: "StudySpec") -> list[Skip]:
    """Every combination the study names that ``expand`` leaves out, with the reason."""
    skips: list[Skip] = []
    for problem in study.problems:
        for algorithm in study.algorithms:
            skips.extend(_runnable(study, problem, algorithm)[1])
    return skips


def expand(study: "StudySpec") -> Iterator[Cell]:
    """Yield the study's cells in the order problems × algorithms × backends × t × K × seeds
    (t, K and ``pipeline_params`` of each algorithm entry with its overrides).

    Deterministic (same study, same cells and cell_ids). Cost: one small JSON encoding and
    a blake2b hash per cell, no memory beyond the current cell.
    """
    for problem in study.problems:
        problem_json = problem.params_json
        for algorithm in study.algorithms:
            backends, _ = _runnable(study, problem, algorithm)
            uses_K = algorithm_registry.spec(algorithm.name).uses_K
            algorithm_json = algorithm.params_json
            pipeline_json = canonical_json(study.pipeline_params_for(algorithm))
            for backend in backends:
                for t in study.t_for(algorithm):
                    for K, K_setting in _k_values(study.K_for(algorithm), t, uses_K):
                        for seed in study.seeds:
                            yield Cell(study=study.study, pipeline=study.pipeline,
                                       problem=problem.name, algorithm=algorithm.name,
                                       backend=backend, t=t, K=K, K_setting=K_setting,
                                       seed=seed,
                                       dtype=study.dtype, problem_params=problem_json,
                                       algorithm_params=algorithm_json,
                                       pipeline_params=pipeline_json)


def pair_counts(study: "StudySpec") -> list[PairCount]:
    """Cells per (problem, algorithm), counted without expanding; skipped pairs give 0."""
    counts = []
    for problem in study.problems:
        for algorithm in study.algorithms:
            backends, _ = _runnable(study, problem, algorithm)
            uses_K = algorithm_registry.spec(algorithm.name).uses_K
            per_backend = sum(len(_k_values(study.K_for(algorithm), t, uses_K))
                              for t in study.t_for(algorithm))
            counts.append(PairCount(_label(problem, study.problems),
                                    _label(algorithm, study.algorithms),
                                    len(backends) * per_backend * len(study.seeds)))
    return counts


def count_cells(study: "StudySpec") -> int:
    """``len(list(expand(study)))`` without building the cells."""
    return sum(pair.cells for pair in pair_counts(study))


@dataclass(frozen=True)
class Plan:
    """What ``hypersweep plan`` shows."""

    total: int
    pairs: list[PairCount]
    skipped: list[Skip]
    sample_cell_ids: list[str]


def plan(study: "StudySpec", *, sample_size: int = 10) -> Plan:
    """Expand the whole study once (checking that cell_ids are unique) and summarize it.

    The sample is spread evenly over the expansion order. Cost: one pass over the cells.
    """
    total = count_cells(study)
    stride = max(1, total // max(1, sample_size))
    sample, seen, n = [], set(), 0
    for n, cell in enumerate(expand(study), start=1):
        if cell.cell_id in seen:
            raise RuntimeError(f"two cells share the id {cell.cell_id!r}; this is a bug in "
                             "the expansion, please report it")
        seen.add(cell.cell_id)
        if (n - 1) % stride == 0 and len(sample) < sample_size:
            sample.append(cell.cell_id)
    if n != total:
        raise RuntimeError(f"count_cells says {total} cells but expansion gave {n}; this is "
                         "a bug, please report it")
    return Plan(total, pair_counts(study), skipped_combinations(study), sample)
