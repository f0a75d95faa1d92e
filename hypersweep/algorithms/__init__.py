"""The hypergradient-algorithm registry: ``get(name, backend=...)`` and ``names()``.

Every estimator is called as ``fn(problem, lam, *, t, K, seed=0, **params)`` and returns a
:class:`~hypersweep.algorithms.common.Hypergrad`. Importing this package never imports
torch or jax; ``get`` imports the backend implementation lazily.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from hypersweep.algorithms.catalog import ALGORITHMS
from hypersweep.algorithms.common import Hypergrad, check_budget
from hypersweep.registry import BACKENDS, check_choice, resolve_impl


def names(kind: str | None = None) -> list[str]:
    return [s.name for s in ALGORITHMS if kind is None or s.kind == kind]


def spec(name: str):
    return ALGORITHMS.spec(name)


def check_params(name: str, params: dict) -> dict:
    """Merge ``params`` over the algorithm's defaults; unknown keys raise ``ValueError``."""
    allowed = dict(ALGORITHMS.spec(name).params)
    for key in params:
        if key not in allowed:
            raise ValueError(
                f"Unknown parameter {key!r} for algorithm {name!r}. Valid choices: "
                f"{', '.join(sorted(allowed)) or '(none)'}"
            )
    return {**allowed, **params}


def applicable(name: str, problem_capabilities) -> bool:
    return ALGORITHMS.spec(name).requires <= frozenset(problem_capabilities)


@functools.lru_cache(maxsize=None)
def get(name: str, backend: str) -> Callable[..., Hypergrad]:
    """The estimator ``name`` for ``backend``, wrapped with argument checks."""
    algo = ALGORITHMS.spec(name)
    check_choice("backend", backend, BACKENDS)
    impl = resolve_impl(algo, backend)
    if algo.kind != "hypergradient":
        return impl

    @functools.wraps(impl)
    def estimator(problem, lam, *, t: int, K: int | None = None, seed: int = 0,
                  **params: Any) -> Hypergrad:
        if problem.backend != backend:
            raise ValueError(f"problem is on backend {problem.backend!r}; "
                             f"algorithm {name!r} was requested for {backend!r}")
        missing = algo.requires - frozenset(problem.capabilities)
        if missing:
            raise ValueError(f"algorithm {name!r} needs problem capabilities "
                             f"{sorted(missing)}, which {problem.name!r} lacks")
        t, K = check_budget(t, K, uses_K=algo.uses_K)
        return impl(problem, problem.as_lam(lam), t=t, K=K, seed=seed,
                    **check_params(name, params))

    return estimator


__all__ = ["get", "names", "spec", "check_params", "applicable", "Hypergrad", "ALGORITHMS"]
