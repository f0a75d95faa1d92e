"""The black-box trial loop: one generic trainable and a searcher driven over it.

:func:`inner_trainable` runs t steps of Φ from ``w_init`` at a trial's λ (t inner-gradient
evaluations, no hypergradient) and yields the float64 validation loss every few steps;
:func:`run_search` asks a :class:`~hypersweep.algorithms.searchers.TuneSearch` for trials,
runs them (interleaved when the search has several ``workers``), feeds the reports to its
scheduler and returns one :class:`TrialRecord` per finished trial.

Non-finite objectives (a diverging inner loop at an extreme λ) never reach a searcher:
they are reported as :data:`OBJECTIVE_CAP` (finite values above it are clipped to it
too) and flagged in the trial record; the trial is stopped at once.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from hypersweep.algorithms.searchers import METRIC, RESOURCE, Suggestion, TuneSearch

#: what a searcher is told for a non-finite (or larger) validation loss
OBJECTIVE_CAP = 1e30


@dataclasses.dataclass
class Report:
    """One report of a trial: after ``steps`` inner steps (``evals`` new ∇_w L_in since
    the previous report), validation loss ``val_loss`` (float64) at the iterate ``w``;
    ``final``: the trial's budget t is used up."""

    steps: int
    evals: int
    val_loss: float
    w: Any
    final: bool


def inner_trainable(problem, lam: np.ndarray, *, t: int, report_every: int | None = None,
                    cap_inner_lr: bool = True) -> Iterator[Report]:
    """The generic trainable: t steps of Φ from ``w_init`` at λ, reporting every
    ``report_every`` steps (and at t) the float64 validation loss L_out(w_s, λ).

    The steps are the backend's ``first_order`` estimator (so JAX compiles once for every
    t: t is traced), resumed from the previous iterate. Cost: t inner-gradient
    evaluations plus one L_out gradient per report; memory O(dim w).
    """
    from hypersweep import algorithms
    first_order = algorithms.get("first_order", problem.backend)
    lam_backend = problem.as_lam(lam)
    # η = min(η, 1/L(λ)): a trial at large λ must not diverge only because η was set for
    # λ₀ (the same rule as the HPO pipeline); a copy sharing data and compiled shapes.
    resumed = problem.with_inner_lr(problem.stable_inner_lr(lam) if cap_inner_lr
                                    else problem.inner_lr)
    every = t if report_every is None else max(1, min(int(report_every), t))
    done = 0
    while done < t:
        steps = min(every, t - done)
        out = first_order(resumed, lam_backend, t=steps)
        resumed = resumed.with_w_init(out.w_t)
        done += steps
        with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported, not warned
            val_loss = problem.outer_loss_np(out.w_t, lam)
        yield Report(done, int(out.n_inner_grad_evals), val_loss, out.w_t, final=done >= t)


@dataclasses.dataclass
class TrialRecord:
    """A finished trial. ``val_loss`` is what was measured (may be NaN/inf: then
    ``nonfinite``); ``objective`` what the searcher was told; ``elapsed_s`` and
    ``total_evals`` are the search's running totals when the trial finished."""

    index: int
    trial_id: str
    lam: np.ndarray
    val_loss: float
    objective: float
    steps: int
    evals: int
    nonfinite: bool
    stopped_early: bool
    elapsed_s: float
    total_evals: int
    w: Any = None


def objective_of(val_loss: float) -> tuple[float, bool]:
    """(what the searcher is told, whether the measurement was non-finite)."""
    if not math.isfinite(val_loss):
        return OBJECTIVE_CAP, True
    return min(val_loss, OBJECTIVE_CAP), False


@dataclasses.dataclass
class _Running:
    suggestion: Suggestion
    lam: np.ndarray
    reports: Iterator[Report]
    last: Report | None = None
    evals: int = 0


def run_search(search: TuneSearch, trainable: Callable[..., Iterator[Report]], *,
               num_samples: int, time_budget_s: float | None = None,
               clock: Callable[[], float] = time.perf_counter,
               ) -> tuple[list[TrialRecord], str]:
    """Run up to ``num_samples`` trials of ``trainable(lam, report_every=...)``.

    Returns the finished trials in completion order and why the search stopped:
    ``"num_samples"``, ``"time_budget"`` (no trial starts after ``time_budget_s``; trials
    in flight are then closed with their last report) or ``"exhausted"`` (the searcher
    had no more points, e.g. a full grid). A trial whose report is non-finite is stopped
    and its searcher told :data:`OBJECTIVE_CAP`.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1; got {num_samples!r}")
    start = clock()
    records: list[TrialRecord] = []
    running: list[_Running] = []
    started = 0
    total_evals = 0
    reason = None
    scheduler = search.scheduler

    def finish(run: _Running, stopped_early: bool) -> None:
        report = run.last
        objective, nonfinite = objective_of(report.val_loss)
        search.complete(run.suggestion, objective)
        if scheduler is not None:
            scheduler.on_trial_complete(None, run.suggestion.trial,
                                        {RESOURCE: report.steps, METRIC: objective})
        records.append(TrialRecord(
            index=len(records), trial_id=run.suggestion.trial_id, lam=run.lam,
            val_loss=float(report.val_loss), objective=objective, steps=report.steps,
            evals=run.evals, nonfinite=nonfinite, stopped_early=stopped_early,
            elapsed_s=clock() - start, total_evals=total_evals, w=report.w))

    try:
        while True:
            while reason is None and len(running) < search.workers:
                if started >= num_samples:
                    reason = "num_samples"
                elif time_budget_s is not None and clock() - start >= time_budget_s:
                    reason = "time_budget"
                elif (suggestion := search.suggest()) is None:
                    reason = "exhausted"
                else:
                    started += 1
                    lam = search.space.to_lam(suggestion.config)
                    if scheduler is not None:
                        scheduler.on_trial_add(None, suggestion.trial)
                    running.append(_Running(suggestion, lam, iter(
                        trainable(lam, report_every=search.report_every))))
            if not running:
                break
            if (reason == "time_budget" or (
                    time_budget_s is not None and clock() - start >= time_budget_s)):
                reason = "time_budget"
                for run in running:
                    if run.last is not None:
                        finish(run, stopped_early=True)
                running.clear()
                break
            run = running.pop(0)
            report = next(run.reports)
            run.last = report
            run.evals += report.evals
            total_evals += report.evals
            objective, nonfinite = objective_of(report.val_loss)
            if report.final or nonfinite:
                # a diverged inner loop cannot recover: stop it at once
                finish(run, stopped_early=not report.final)
                continue
            if scheduler is not None:
                from ray.tune.schedulers import TrialScheduler
                decision = scheduler.on_trial_result(
                    None, run.suggestion.trial, {RESOURCE: report.steps, METRIC: objective})
                if decision == TrialScheduler.STOP:
                    finish(run, stopped_early=True)
                    continue
            running.append(run)
    finally:
        search.close()
    return records, reason or "num_samples"


def best_so_far(values: Sequence[float]) -> list[float]:
    """Running minimum over the finite values (NaN until the first finite one)."""
    out, best = [], math.nan
    for v in values:
        if math.isfinite(v) and (math.isnan(best) or v < best):
            best = v
        out.append(best)
    return out
