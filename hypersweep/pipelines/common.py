"""Pieces every pipeline uses: per-process caches of problem instances and oracles.

Both caches are keyed by identities — (problem, params, seed, backend, dtype) for an
instance, (problem, params, seed, λ) for an oracle — never by ``id()``: a bounded cache
frees instances, and CPython hands a freed object's id to the next one, which would then be
scored against the old instance's ∇F.
"""
from __future__ import annotations

import functools
import json
from collections import OrderedDict

import numpy as np

from hypersweep import problems

#: instances kept per process (each holds its data on the backend)
PROBLEM_CACHE_SIZE = 16
#: (∇F(λ), w*(λ)) pairs kept per process
ORACLE_CACHE_SIZE = 64


@functools.lru_cache(maxsize=PROBLEM_CACHE_SIZE)
def _problem(name: str, params_json: str, seed: int, backend: str, dtype: str):
    return problems.make(name, backend=backend, seed=seed, dtype=dtype,
                         **json.loads(params_json))


def problem_for(cell):
    """The cell's problem instance, built inside this process from (problem, params, seed)
    and reused by every later cell with the same key (same data, same compiled shapes)."""
    return _problem(cell.problem, cell.problem_params, cell.seed, cell.backend, cell.dtype)


def fixed_lam(problem, pipeline_params: dict) -> np.ndarray:
    """λ from the study (``lam``: a scalar broadcast to λ's shape, or a full list) or λ₀."""
    if pipeline_params.get("lam") is None:
        return problem.initial_hyperparams()
    lam = np.asarray(pipeline_params["lam"], dtype=np.float64)
    if lam.ndim == 0:
        lam = np.full(problem.lam_shape, float(lam))
    return problem.lam_numpy(lam)


_ORACLE: "OrderedDict[tuple, tuple[np.ndarray, np.ndarray]]" = OrderedDict()


def oracle_key(problem, lam: np.ndarray) -> tuple:
    """The oracle's identity: the float64 oracles depend on the data (problem, params,
    seed) and λ only — not on the backend or dtype the estimator runs in."""
    lam = np.ascontiguousarray(lam, dtype=np.float64)
    return (*problem.identity, lam.shape, lam.tobytes())


def oracle(problem, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(∇F(λ), w*(λ)) in float64, cached per (problem identity, λ), least recently used
    evicted first."""
    key = oracle_key(problem, lam)
    if key in _ORACLE:
        _ORACLE.move_to_end(key)
        return _ORACLE[key]
    value = (problem.exact_hypergradient(lam), problem.exact_inner_solution(lam))
    _ORACLE[key] = value
    while len(_ORACLE) > ORACLE_CACHE_SIZE:
        _ORACLE.popitem(last=False)
    return value


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
