"""Pieces every pipeline uses: per-process caches of problem instances and oracles."""
from __future__ import annotations

import functools
import json

import numpy as np

from hypersweep import problems


@functools.lru_cache(maxsize=16)
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


_ORACLE: dict = {}


def oracle(problem, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(∇F(λ), w*(λ)) in float64, cached per (problem instance, λ)."""
    key = (id(problem), lam.tobytes())
    if key not in _ORACLE:
        if len(_ORACLE) > 64:
            _ORACLE.clear()
        _ORACLE[key] = (problem.exact_hypergradient(lam), problem.exact_inner_solution(lam))
    return _ORACLE[key]


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
