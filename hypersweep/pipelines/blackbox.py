"""Black-box baseline pipeline: one Ray Tune search per cell, trials evaluated in-process.

A cell (problem, searcher, backend, t, seed) runs up to ``num_samples`` trials; each trial
solves the inner problem at its λ with t steps of Φ from ``w_init`` (t inner-gradient
evaluations; ASHA may stop it earlier) and scores ``L_out(w_t, λ)`` in float64. Why the
searchers are driven inside the cell rather than through ``Tuner.fit()``: see
:mod:`hypersweep.algorithms.searchers` and :mod:`hypersweep.algorithms.trials`.

``pipeline_params``:

``num_samples`` (default 20)
    trials per cell (for ``grid``: a cap; the grid has ``grid_points``ᵈ points).
``time_budget_s`` (default none)
    no trial starts after this many seconds of search.
``oracle_metrics`` (default true)
    ‖∇F‖ from the float64 oracle at the best λ so far (trace rows) and at the best trial's
    λ (result row); false: none (exact solves are the dearest part of a cell on a large
    instance).
``space``
    the box in λ's parametrization: ``{low: -6, high: 3}`` (numbers, or one per
    coordinate) or ``{problem_name: {low, high}}``; default: the problem's catalog
    ``search_box`` (see :func:`hypersweep.algorithms.searchers.search_space`).
    ``tied: true`` in a box searches one number for every coordinate of λ (one shared
    penalty or weight: the black-box baseline when λ has one coordinate per feature or
    per example).

Output, in the shared schemas: one result row — ``val_loss`` = the best validation loss
found, ``test_loss``/``test_accuracy`` at that trial's iterate, ``wall_time_s`` = the
search (after a warm-up call), ``compile_time_s`` = the compile it paid,
``n_inner_grad_evals`` = ``n_oracle_calls`` = all inner steps run, and the best λ in
``extra`` — and one trace row per trial in completion order (``step`` = trial index,
cumulative ``wall_time_s`` and cost columns, the trial's ``val_loss`` as measured,
``best_val_loss`` so far, ``lam_mean/min/max``), so budgets compare with gradient-based HPO
in trials, oracle calls and seconds.

Stationarity, as the ``hpo`` pipeline measures it: each trace row's ``outer_grad_norm`` is
‖∇F(λ)‖ from the problem's float64 oracle (``exact_hypergradient``) at the λ of the best
trial so far (None before the first finite trial, or where the oracle is not finite); the
result row's ``outer_grad_norm`` is that at the best trial's λ, and ``outer_grad_norm_rel``
divides it by ‖∇F(λ₀)‖ with λ₀ = ``problem.initial_hyperparams()``, the hpo pipeline's
default start. These oracle calls are evaluation: they run after the search, outside
``wall_time_s``, and are not counted in the cost columns.
"""
from __future__ import annotations

import functools
import math
import time

import numpy as np

from hypersweep import algorithms
from hypersweep.algorithms import searchers, trials
from hypersweep.algorithms.common import cost_columns
from hypersweep.orchestrator.cell import PipelineResult, canonical_json
from hypersweep.pipelines.common import WARM_UPS, oracle_grad_norm, problem_for
from hypersweep.pipelines.params import BlackboxParams
from hypersweep.seeding import derive_seed

#: the schema of ``pipeline_params``, shared with ``hypersweep plan``
#: (:class:`hypersweep.pipelines.params.BlackboxParams`)
DEFAULTS = BlackboxParams.defaults()
#: λ with at most this many coordinates is written out in full in ``extra``
MAX_LAM_IN_EXTRA = 64


def check_params(params: dict) -> dict:
    """Merge the cell's ``pipeline_params`` over :data:`DEFAULTS`, checked by the schema the
    study validator uses at plan time; bad keys/values raise ``ValueError`` (ParamsError)."""
    return BlackboxParams.parse(params, prefix="pipeline_params").as_dict()


def _lam_summary(lam: np.ndarray) -> dict:
    return {"lam_mean": float(np.mean(lam)), "lam_min": float(np.min(lam)),
            "lam_max": float(np.max(lam))}


def _best_grad_norms(problem, records) -> list[float | None]:
    """‖∇F‖ at the λ of the best finite trial so far, per record (one oracle call each
    time the best trial changes; ties keep the earlier trial, as :func:`min` does)."""
    out, best, norm = [], None, None
    for rec in records:
        if not rec.nonfinite and (best is None or rec.val_loss < best.val_loss):
            best = rec
            norm = oracle_grad_norm(problem, rec.lam)
        out.append(norm)
    return out


def run(cell) -> PipelineResult:
    if cell.K is not None:
        raise ValueError(f"K must be null for black-box searcher {cell.algorithm!r} (t is "
                         f"the inner steps per trial); got K={cell.K!r}")
    params = check_params(cell.pipeline_kwargs)
    algo = algorithms.spec(cell.algorithm)
    if algo.kind != "searcher":
        raise ValueError(f"pipeline 'blackbox' runs black-box searchers; {cell.algorithm!r} "
                         f"is of kind {algo.kind!r}. Valid choices: "
                         f"{', '.join(algorithms.names('searcher'))}")
    problem = problem_for(cell)
    space = searchers.search_space(problem, params["space"])
    seed = derive_seed("blackbox", cell.algorithm, cell.seed, bits=31)  # Tune takes 32 bits
    make_search = algorithms.get(cell.algorithm, cell.backend)
    search = make_search(space, num_samples=params["num_samples"], seed=seed, max_t=cell.t,
                         **algorithms.check_params(cell.algorithm, cell.algorithm_kwargs))
    trainable = functools.partial(trials.inner_trainable, problem, t=cell.t,
                                  cap_inner_lr=params["cap_inner_lr"])

    # Warm-up (JAX compiles here, once per process and shapes; t is traced), so that
    # wall_time_s is the search alone; compile_time_s is the compile the cell paid (JAX's
    # compile events during warm-up and search; 0 when it reused compiled functions).
    compile_clock = problem.ops.compile_seconds
    c0 = compile_clock()
    if WARM_UPS.first_time(("blackbox", cell.shape_key(), problem.ops.device_name())):
        list(trainable(space.center(), report_every=None))

    t0 = time.perf_counter()
    records, stop_reason = trials.run_search(
        search, trainable, num_samples=params["num_samples"],
        time_budget_s=params["time_budget_s"])
    wall = time.perf_counter() - t0

    # evaluation, after the clock stopped: ‖∇F‖ at the best λ so far and at λ₀
    best = trials.best_so_far([r.val_loss for r in records])
    if params["oracle_metrics"]:
        grad_norms = _best_grad_norms(problem, records)
        grad0_norm = oracle_grad_norm(problem, problem.initial_hyperparams())
    else:  # no float64 oracle (each call is exact solves; see ``oracle_metrics``)
        grad_norms, grad0_norm = [None] * len(records), None
    traces = []
    for rec, best_val, grad_norm in zip(records, best, grad_norms):
        # the trial's test metrics at its iterate (out of the clock; the report's test
        # curves read the best trial's so far)
        tested = (problem.metrics(rec.w, rec.lam) if rec.w is not None and not rec.nonfinite
                  else {})
        traces.append(dict(
            step=rec.index, wall_time_s=rec.elapsed_s, val_loss=rec.val_loss,
            best_val_loss=best_val, outer_grad_norm=grad_norm,
            test_loss=tested.get("test_loss"), test_accuracy=tested.get("test_accuracy"),
            **cost_columns(rec.total_evals, 0, 0, 0),
            **_lam_summary(rec.lam),
            extra=canonical_json({"trial_id": rec.trial_id, "inner_steps": rec.steps,
                                  "objective": rec.objective, "nonfinite": rec.nonfinite,
                                  "stopped_early": rec.stopped_early})))

    finite = [r for r in records if not r.nonfinite]
    total_evals = records[-1].total_evals if records else 0
    compile_time = compile_clock() - c0
    metrics = dict(
        wall_time_s=wall, compile_time_s=compile_time, compiled=compile_time > 0,
        **cost_columns(total_evals, 0, 0, 0), solver_iters=None, n_trials=len(records),
        n_nonfinite=len(records) - len(finite), stop_reason=stop_reason,
        searcher_seed=seed, space_low=list(space.low) if space.dim <= MAX_LAM_IN_EXTRA
        else None, space_high=list(space.high) if space.dim <= MAX_LAM_IN_EXTRA else None)
    if finite:
        top = min(finite, key=lambda r: r.val_loss)
        metrics.update(problem.metrics(top.w, top.lam))  # val_loss, test_loss, test_accuracy
        metrics.update(best_trial=top.index, best_inner_steps=top.steps,
                       **{f"best_{k}": v for k, v in _lam_summary(top.lam).items()})
        if top.lam.size <= MAX_LAM_IN_EXTRA:
            metrics["best_lam"] = top.lam.reshape(-1).tolist()
        metrics["outer_grad_norm"] = grad_norms[top.index]
        if grad0_norm and metrics["outer_grad_norm"] is not None:
            metrics["outer_grad_norm_rel"] = metrics["outer_grad_norm"] / grad0_norm
        if not math.isclose(metrics["val_loss"], top.val_loss, rel_tol=1e-12, abs_tol=0.0):
            raise RuntimeError(f"val loss of the best trial re-evaluated as "
                               f"{metrics['val_loss']!r}, recorded {top.val_loss!r}")
    else:
        metrics["val_loss"] = float("nan")  # every trial diverged: the row is "diverged"
    return PipelineResult(metrics=metrics, traces=traces, device=problem.ops.device_name())
