"""Bilevel problems: ``make(name, backend=..., seed=..., dtype=..., **params)``.

Importing this package never imports torch or jax; the backend is loaded by ``make``.
"""
from __future__ import annotations

import importlib
from typing import Any

from hypersweep.problems.base import DTYPES, Problem, ProblemData
from hypersweep.problems.catalog import PROBLEMS
from hypersweep.registry import BACKENDS, check_choice, merge_params

# Parameters every problem accepts, on top of its own (see the catalog).
COMMON_PARAMS = {"data": None, "inner_lr": None, "w_init": None}


def names() -> list[str]:
    return PROBLEMS.names()


def spec(name: str):
    return PROBLEMS.spec(name)


def valid_params(name: str) -> dict[str, Any]:
    """The keyword parameters ``make`` accepts for ``name``, with their defaults."""
    return {**PROBLEMS.spec(name).params, **COMMON_PARAMS}


def param_choices(name: str) -> dict[str, tuple]:
    """The params of ``name`` that take one of a fixed set of values (its module's
    ``CHOICES``, e.g. ``dataset``), with those values. Imports the module (numpy only)."""
    return dict(getattr(importlib.import_module(PROBLEMS.spec(name).impl), "CHOICES", {}))


def check_params(name: str, params: dict) -> dict:
    """Merge ``params`` over the defaults; unknown keys, and values outside a param's
    :func:`param_choices`, raise a ``ValueError``."""
    merged = merge_params(f"problem {name!r}", valid_params(name), params)
    for key, valid in param_choices(name).items():
        if key in merged:
            check_choice(f"problem {name!r} {key}", merged[key], valid)
    return merged


def build(name: str, *, seed: int = 0, **params: Any) -> tuple[Any, Any, ProblemData]:
    """(spec, module, data) of problem ``name``: its numpy float64 instance, no backend.

    What :func:`make` binds to a backend, and all that the float64 oracles and
    :func:`~.base.contraction_factor` need (a report computes q without importing torch or
    JAX)."""
    problem_spec = PROBLEMS.spec(name)
    merged = check_params(name, params)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    module = importlib.import_module(problem_spec.impl)
    own = {k: v for k, v in merged.items() if k not in ("inner_lr", "w_init")}
    built: ProblemData = module.build(seed=seed, **own)
    if merged["inner_lr"] is not None:
        lr = float(merged["inner_lr"])
        if not lr > 0:
            raise ValueError(f"inner_lr must be > 0; got {merged['inner_lr']!r}")
        built.inner_lr = lr
    if merged["w_init"] is not None:
        built.info["w_init"] = merged["w_init"]
    return problem_spec, module, built


def make(name: str, *, backend: str, seed: int = 0, dtype: str = "float32",
         device: str | None = None, **params: Any) -> Problem:
    """Build problem ``name`` for ``backend`` ("jax" or "torch") in ``dtype``.

    Data are generated in numpy from ``seed`` (or read from ``data="path.npz|.parquet"``),
    so both backends see the same arrays. ``device`` (e.g. "cpu", "cuda:0"; default
    ``$HYPERSWEEP_DEVICE``, else the backend's choice): see :class:`~.base.Problem`.
    """
    PROBLEMS.spec(name)
    check_choice("backend", backend, BACKENDS)
    check_choice("dtype", dtype, DTYPES)
    problem_spec, module, built = build(name, seed=seed, **params)
    return Problem(problem_spec, module, built, backend=backend, dtype=dtype, seed=seed,
                   params=params, device=device)


__all__ = ["make", "build", "names", "spec", "valid_params", "check_params", "Problem",
           "ProblemData", "PROBLEMS"]
