"""The hypergradient-algorithm registry: ``get(name, backend=...)`` and ``names()``.

Every estimator is called as ``fn(problem, lam, *, t, K, seed=0, **params)`` and returns a
:class:`~hypersweep.algorithms.common.Hypergrad`. The estimators flagged
``warm_start_adjoint`` in the catalog (:func:`adjoint_warm_starts`: aid_cg, aid_fp) also
take ``v0=``, an adjoint warm start.
Importing this package never imports torch or jax; ``get`` imports the backend
implementation lazily.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from hypersweep.algorithms.catalog import ALGORITHMS
from hypersweep.algorithms.common import Hypergrad, check_budget
from hypersweep.registry import BACKENDS, check_choice, merge_params, resolve_impl


def names(kind: str | None = None) -> list[str]:
    """The registered algorithms (of ``kind``, one of ``ALGORITHM_KINDS``), catalog order."""
    return [s.name for s in ALGORITHMS if kind is None or s.kind == kind]


def adjoint_warm_starts() -> list[str]:
    """The estimators that accept an adjoint warm start ``v0`` (``warm_start_adjoint``)."""
    return [s.name for s in ALGORITHMS if s.warm_start_adjoint]


def spec(name: str):
    return ALGORITHMS.spec(name)


def check_params(name: str, params: dict) -> dict:
    """Merge ``params`` over the algorithm's defaults; unknown keys raise ``ValueError``."""
    return merge_params(f"algorithm {name!r}", ALGORITHMS.spec(name).params, params)


def applicable(name: str, problem_capabilities) -> bool:
    return ALGORITHMS.spec(name).requires <= frozenset(problem_capabilities)


@functools.lru_cache(maxsize=None)
def get(name: str, backend: str) -> Callable[..., Hypergrad]:
    """The estimator ``name`` for ``backend``, wrapped with argument checks.

    The wrapper checks t, K, λ's shape, the problem's backend and capabilities, merges
    ``**params`` over the spec's ``params`` defaults (:func:`check_params`, which rejects
    unknown keys), and forwards the call-time keyword ``v0`` (the adjoint warm start: an
    array of w's shape, numpy or the backend's, or None) apart from ``params``: it is
    per-call state, not a study parameter, so it is never checked against the spec's
    ``params``. ``v0`` is accepted only by :func:`adjoint_warm_starts`; a wrong shape or
    another algorithm raises ``ValueError``.
    """
    algo = ALGORITHMS.spec(name)
    check_choice("backend", backend, BACKENDS)
    impl = resolve_impl(algo, backend)
    if algo.kind != "estimator":
        return impl

    @functools.wraps(impl)
    def estimator(problem, lam, *, t: int, K: int | None = None, seed: int = 0,
                  v0: Any = None, **params: Any) -> Hypergrad:
        if problem.backend != backend:
            raise ValueError(f"problem is on backend {problem.backend!r}; "
                             f"algorithm {name!r} was requested for {backend!r}")
        missing = algo.requires - frozenset(problem.capabilities)
        if missing:
            raise ValueError(f"algorithm {name!r} needs problem capabilities "
                             f"{sorted(missing)}, which {problem.name!r} lacks")
        t, K = check_budget(t, K, uses_K=algo.uses_K)
        call_time = {} if v0 is None else {"v0": _check_v0(name, problem, v0)}
        return impl(problem, problem.as_lam(lam), t=t, K=K, seed=seed,
                    **check_params(name, params), **call_time)

    return estimator


def _check_v0(name: str, problem, v0):
    """``v0`` as a backend array in the problem's dtype; ``ValueError`` when not allowed."""
    if not ALGORITHMS.spec(name).warm_start_adjoint:
        raise ValueError(f"algorithm {name!r} takes no adjoint warm start v0. Valid choices: "
                         f"{', '.join(adjoint_warm_starts())}")
    shape = tuple(np.shape(v0))
    if shape != tuple(problem.w_shape):
        raise ValueError(f"v0 for problem {problem.name!r} must have w's shape "
                         f"{tuple(problem.w_shape)}; got shape {shape}")
    return problem.ops.asarray(v0, problem.dtype)


__all__ = ["get", "names", "adjoint_warm_starts", "spec", "check_params", "applicable",
           "Hypergrad", "ALGORITHMS"]
