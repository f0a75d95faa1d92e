"""Template pipeline: one hypergradient estimate at λ₀ + ``shift``, scored against the oracle.

Copy this file to ``hypersweep/pipelines/<name>.py`` (or to your own package), rename, and
register one ``PipelineSpec`` for it (``docs/extending.md``). A pipeline is a function
``run(cell) -> PipelineResult`` and, optionally, the pydantic model of its
``pipeline_params``: ``hypersweep plan`` checks a study with the same model the cell uses.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from hypersweep import algorithms
from hypersweep.orchestrator.cell import PipelineResult
from hypersweep.pipelines.common import oracle, problem_for
from hypersweep.validation import Params, field, number


class TemplateParams(Params):
    """``shift``: the estimate is taken at λ = λ₀ + shift (every coordinate)."""

    owner: ClassVar[str] = "pipeline 'template_pipeline'"
    shift: field(number()) = 0.0


def run(cell) -> PipelineResult:
    """The estimate of ``cell.algorithm`` with the cell's t, K and seed: its norm, its error
    against ∇F(λ) and the estimator's cost columns (metrics outside the result schema go
    to the row's ``extra``)."""
    params = TemplateParams.parse(cell.pipeline_kwargs, prefix="pipeline_params")
    problem = problem_for(cell)
    lam = problem.initial_hyperparams() + params.shift
    estimator = algorithms.get(cell.algorithm, cell.backend)
    result = estimator(problem, problem.as_lam(lam), t=cell.t, K=cell.K, seed=cell.seed,
                       **cell.algorithm_kwargs)
    g = problem.ops.to_numpy(result.hypergrad)
    g_star, _ = oracle(problem, lam)
    error = float(np.linalg.norm(g - g_star))
    return PipelineResult(metrics=dict(hypergrad_abs_error=error,
                                       hypergrad_norm=float(np.linalg.norm(g)),
                                       **result.costs()),
                          device=problem.ops.device_name())
