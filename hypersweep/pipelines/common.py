"""Pieces every pipeline uses: the per-process caches of problem instances, oracles and
warm-ups, and small helpers.

The caches are the only state a pipeline keeps between cells; each is bounded and keyed by
identities — (problem, params, seed, backend, dtype, device) for an instance, (problem,
params, seed, λ) for an oracle, (pipeline, what compiles) for a warm-up, (problem,
params, seed) for the sizes an instance's rows record — never by
``id()``: a bounded cache frees instances, and CPython hands a freed object's id to the
next one, which would then be scored against the old instance's ∇F.
"""
from __future__ import annotations

import functools
import json
import math
from collections import OrderedDict
from typing import Any, Callable, Hashable

import numpy as np

from hypersweep import problems
from hypersweep.problems.base import default_device

#: instances kept per process (each holds its data on the backend)
PROBLEM_CACHE_SIZE = 16
#: (∇F(λ), w*(λ)) pairs kept per process
ORACLE_CACHE_SIZE = 64
#: warm-up keys remembered per process (one forgotten costs one more warm-up call)
WARM_UP_CACHE_SIZE = 256
#: instances whose row columns (sizes, η) are remembered per process: more than a batch's
INSTANCE_COLUMNS_CACHE_SIZE = 1024


class LruCache:
    """A bounded map from identity keys to values, least recently used evicted first.

    ``get(key, compute)`` returns the value, computing and storing it on a miss;
    ``first_time(key)`` records a key with no value and says whether it was new (the
    warm-up bookkeeping: compile once per process and key, time the calls after).
    """

    def __init__(self, name: str, maxsize: int):
        self.name, self.maxsize = name, int(maxsize)
        self._items: "OrderedDict[Hashable, Any]" = OrderedDict()

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = self._items[key] = compute()
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)
        return value

    def peek(self, key: Hashable, default: Any = None) -> Any:
        """The value of ``key`` if held (not computed, recency unchanged), else ``default``."""
        return self._items.get(key, default)

    def first_time(self, key: Hashable) -> bool:
        new = key not in self._items
        self.get(key, lambda: None)
        return new

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()

    def __repr__(self) -> str:
        return f"LruCache({self.name!r}, {len(self)}/{self.maxsize})"


#: the oracle pairs of this process, by :func:`oracle_key`
ORACLES = LruCache("oracle", ORACLE_CACHE_SIZE)
#: the warm-ups this process has run, by (pipeline, what the warm-up compiled)
WARM_UPS = LruCache("warm-up", WARM_UP_CACHE_SIZE)
#: what the result rows record of each instance this process built (sizes, η), by
#: (problem, params, seed): :func:`instance_columns`
INSTANCE_COLUMNS = LruCache("instance columns", INSTANCE_COLUMNS_CACHE_SIZE)


@functools.lru_cache(maxsize=PROBLEM_CACHE_SIZE)
def _problem(name: str, params_json: str, seed: int, backend: str, dtype: str,
             device: str | None):
    return problems.make(name, backend=backend, seed=seed, dtype=dtype, device=device,
                         **json.loads(params_json))


def problem_for(cell):
    """The cell's problem instance, built inside this process from (problem, params, seed)
    on the default device (``$HYPERSWEEP_DEVICE``, else the backend's) and reused by every
    later cell with the same key (same data, same compiled shapes). Notes the instance's
    sizes and η for the cell's result row (:func:`instance_columns`)."""
    problem = _problem(cell.problem, cell.problem_params, cell.seed, cell.backend,
                       cell.dtype, default_device())
    INSTANCE_COLUMNS.get(_instance_key(cell), problem.row_columns)
    return problem


def _instance_key(cell) -> tuple:
    # sizes and η depend on the data only: (problem, params, seed), not backend or dtype
    return (cell.problem, cell.problem_params, cell.seed)


def instance_columns(cell) -> dict:
    """The row columns (``Problem.row_columns``: sizes, η) of ``cell``'s instance if this
    process built it through :func:`problem_for`, else ``{}`` (a pipeline that failed
    before building it, or one that builds its problems another way)."""
    return dict(INSTANCE_COLUMNS.peek(_instance_key(cell)) or {})


def study_lam(lam0: np.ndarray, pipeline_params: dict) -> np.ndarray:
    """λ from the study (``lam``: a scalar broadcast to λ₀'s shape, or a full list) or
    λ₀, as float64 numpy (the shape of a list is checked by the caller's problem)."""
    if pipeline_params.get("lam") is None:
        return np.array(lam0, dtype=np.float64, copy=True)
    lam = np.asarray(pipeline_params["lam"], dtype=np.float64)
    if lam.ndim == 0:
        lam = np.full(np.shape(lam0), float(lam))
    return lam


def fixed_lam(problem, pipeline_params: dict) -> np.ndarray:
    """The study's λ (:func:`study_lam`) for ``problem``, shape checked."""
    return problem.lam_numpy(study_lam(problem.initial_hyperparams(), pipeline_params))


def oracle_key(problem, lam: np.ndarray) -> tuple:
    """The oracle's identity: the float64 oracles depend on the data (problem, params,
    seed) and λ only — not on the backend or dtype the estimator runs in."""
    lam = np.ascontiguousarray(lam, dtype=np.float64)
    return (*problem.identity, lam.shape, lam.tobytes())


def oracle(problem, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(∇F(λ), w*(λ)) in float64, cached in :data:`ORACLES` per (problem identity, λ)."""
    return ORACLES.get(oracle_key(problem, lam), lambda: (
        problem.exact_hypergradient(lam), problem.exact_inner_solution(lam)))


def oracle_grad_norm(problem, lam) -> float | None:
    """‖∇F(λ)‖ from the problem's float64 oracle (None when it is not finite); an
    overflow on the way (a wild λ) is recorded as None, not warned about."""
    with np.errstate(over="ignore", invalid="ignore"):
        value = float(np.linalg.norm(problem.exact_hypergradient(lam)))
    return value if math.isfinite(value) else None
