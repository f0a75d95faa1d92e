"""The hypergradient-algorithm registry: ``get(name, backend=...)`` and ``names()``.

Every estimator is called as ``fn(problem, lam, *, t, K, seed=0, **params)`` and returns a
:class:`~hypersweep.algorithms.common.Hypergrad`; so is a ``baseline`` (``fixed``), whose
``hypergrad`` is zero by design. The estimators flagged
``warm_start_adjoint`` in the catalog (:func:`adjoint_warm_starts`: aid_cg, aid_fp) also
take ``v0=``, an adjoint warm start. ``get_grid(name, backend)`` returns an estimator's t-grid
form (one inner run per lane, evaluated at every (t, K) of its grid; None when it has none).
Importing this package never imports torch or jax; ``get`` imports the backend
implementation lazily.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from hypersweep.algorithms.catalog import ALGORITHMS
from hypersweep.algorithms.common import Hypergrad, check_budget
from hypersweep.registry import (BACKENDS, check_choice, load_object, merge_params,
                                 resolve_impl)


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
    """The estimator (or baseline) ``name`` for ``backend``, wrapped with argument checks;
    other kinds' implementations as they are.

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
    if algo.kind not in ("estimator", "baseline"):
        return impl

    @functools.wraps(impl)
    def estimator(problem, lam, *, t: int, K: int | None = None, seed: int = 0,
                  v0: Any = None, **params: Any) -> Hypergrad:
        _check_problem(algo, backend, problem, "problem")
        t, K = check_budget(t, K, uses_K=algo.uses_K)
        call_time = {} if v0 is None else {"v0": _check_v0(name, problem, v0)}
        return impl(problem, problem.as_lam(lam), t=t, K=K, seed=seed,
                    **check_params(name, params), **call_time)

    return estimator


@functools.lru_cache(maxsize=None)
def get_grid(name: str, backend: str) -> Callable[..., list] | None:
    """The t-grid form of estimator ``name`` for ``backend``, wrapped with argument checks;
    None when the algorithm has none for that backend (``AlgorithmSpec.grid_impls``).

    Called as ``fn(problems, lams, *, points, seed=0, **params)``: lane i is
    (problems[i], lams[i], points[i]), points[i] a list of (t, K) pairs in increasing t
    (K may be None when the algorithm ignores it). Returns one list of ``Hypergrad`` per
    lane, in its points' order, each equal (to rounding; costs, ``solver_iters`` and
    ``extras`` identical) to ``get(name, backend)(problems[i], lams[i], t=t, K=K,
    seed=seed, **params)``, from one inner run per lane (lanes sharing a problem object
    and λ share one). The wrapper checks what ``get`` checks, per lane (backend,
    capabilities, t and K, λ's shape, ``params`` against the spec's defaults); the lanes
    must share functions, shapes, dtype and device (``ValueError`` naming the mismatch).
    There is no ``v0``: a grid evaluates cold solves.
    """
    algo = ALGORITHMS.spec(name)
    check_choice("backend", backend, BACKENDS)
    path = algo.grid_impls.get(backend)
    if path is None:
        return None
    impl = load_object(path)

    @functools.wraps(impl)
    def grid(problems, lams, *, points, seed: int = 0, **params: Any) -> list:
        problems, lams, points = list(problems), list(lams), [list(p) for p in points]
        if not len(problems) == len(lams) == len(points):
            raise ValueError(f"a grid call needs one lam and one points list per problem; "
                             f"got {len(problems)} problems, {len(lams)} lams, "
                             f"{len(points)} points")
        for i, problem in enumerate(problems):
            _check_problem(algo, backend, problem, f"problems[{i}]")
        checked = [[check_budget(t, K, uses_K=algo.uses_K) for t, K in lane]
                   for lane in points]
        return impl(problems, [p.as_lam(lam) for p, lam in zip(problems, lams)],
                    points=checked, seed=seed, **check_params(name, params))

    return grid


def _check_problem(algo, backend: str, problem, label: str) -> None:
    """``ValueError`` unless ``problem`` (called ``label`` in the message) is on ``backend``
    and has the capabilities algorithm ``algo`` requires."""
    if problem.backend != backend:
        raise ValueError(f"{label} is on backend {problem.backend!r}; "
                         f"algorithm {algo.name!r} was requested for {backend!r}")
    missing = algo.requires - frozenset(problem.capabilities)
    if missing:
        raise ValueError(f"algorithm {algo.name!r} needs problem capabilities "
                         f"{sorted(missing)}, which {problem.name!r} lacks")


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


__all__ = ["get", "get_grid", "names", "adjoint_warm_starts", "spec", "check_params",
           "applicable", "Hypergrad", "ALGORITHMS"]
