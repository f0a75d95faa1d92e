"""Hypergradient-error pipeline: one estimate at a fixed λ, compared with the exact oracle.

Per cell: relative/absolute error ‖ĝ − ∇F‖ (/‖∇F‖), ‖ĝ‖, inner suboptimality ‖w_t − w*‖,
val/test metrics at w_t, wall time (after warm-up), the compile the cell actually paid
(``compile_time_s``: JAX's own compile events during its calls; 0, with
``extra.compiled = false``, when it reused compiled functions), peak extra heap during the
call, and the cost columns the estimator reports (``docs/costs.md``).

An exactly zero estimate where ∇F ≠ 0 (e.g. ``first_order`` on a problem whose L_out has
no direct λ term) is flagged ``extra.zero_hypergradient = true``; the run summary warns.

Batches (:func:`run_batch`; the driver sends cells of one ``Cell.batch_key()`` — same
problem, params, backend, dtype, algorithm — as one task). When the algorithm has a t-grid
form (``AlgorithmSpec.grid_impls``), the batch's cells become *lanes*, one per (seed,
K setting), each with its grid of t; one grid call runs every lane's inner loop once, to
its largest t, and evaluates the estimator at each grid point on the way (JAX: the lanes
vmapped in one compiled call, so seeds turn matrix-vector products into matrix-matrix
ones). Each cell keeps its own row: its own estimate, error, status (a diverging seed
diverges alone) and cost columns (those of the per-(t, K) method, not of the shared
work); its ``wall_time_s`` and ``compile_time_s`` are its share of the batch's, in
proportion to its ``n_oracle_calls``, and ``extra`` records ``batch_wall_time_s`` and
``batch_compile_time_s`` (the driver adds ``batch_size``). Algorithms without a grid form run
their cells one by one inside the task.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator

import numpy as np

from hypersweep import algorithms
from hypersweep.orchestrator.cell import PipelineResult
from hypersweep.pipelines._measure import PeakHeap, timed
from hypersweep.algorithms.common import next_pow2
from hypersweep.pipelines.common import WARM_UPS, fixed_lam, oracle, problem_for
from hypersweep.pipelines.params import HypergradientErrorParams


def _params(cell) -> dict:
    # the schema ``hypersweep plan`` checks the study with (only ``lam``)
    return HypergradientErrorParams.parse(cell.pipeline_kwargs,
                                          prefix="pipeline_params").as_dict()


def _measured_call(problem, call, block, warm_up_key):
    """(result, wall s, compile s, peak MB) of ``call()``: warmed up once per process and
    ``warm_up_key`` (the compile stays out of the wall time), timed after a device sync,
    and timed again if it compiled inside the timed call after all."""
    def measured():
        with PeakHeap() as mem:
            result, wall = timed(call, block)
        return result, wall, mem.peak_mb

    compile_clock = problem.ops.compile_seconds
    c0 = compile_clock()
    if WARM_UPS.first_time(warm_up_key):  # compiles here; first-call costs stay out of wall
        timed(call, block)
    c1 = compile_clock()
    result, wall, peak_mb = measured()
    if compile_clock() > c1:  # compiled inside the timed call after all: time it again
        result, wall, peak_mb = measured()
    return result, wall, compile_clock() - c0, peak_mb


def _metrics(problem, lam: np.ndarray, result, *, wall: float, compile_time: float,
             peak_mb: float | None) -> dict:
    """The row metrics of one estimate ``result`` at λ = ``lam`` against the oracle."""
    g = problem.ops.to_numpy(result.hypergrad)
    g_star, w_star = oracle(problem, lam)
    w_t = problem.ops.to_numpy(result.w_t)
    abs_err = float(np.linalg.norm(g - g_star))
    ref = float(np.linalg.norm(g_star))
    metrics = dict(
        hypergrad_abs_error=abs_err,
        hypergrad_rel_error=abs_err / ref if ref > 0 else abs_err,
        hypergrad_norm=float(np.linalg.norm(g)),
        inner_suboptimality=float(np.linalg.norm(w_t - w_star)),
        wall_time_s=wall,
        compile_time_s=compile_time,
        compiled=compile_time > 0,
        peak_memory_mb=peak_mb,
        solver_iters=None if result.solver_iters is None else int(result.solver_iters),
        exact_hypergrad_norm=ref,
        **result.costs(),
    )
    if ref > 0 and not np.any(g):
        metrics["zero_hypergradient"] = True
    if np.all(np.isfinite(w_t)):
        metrics.update(problem.metrics(w_t, lam))
    else:
        metrics["val_loss"] = float("nan")
    return metrics


def run(cell) -> PipelineResult:
    params = _params(cell)
    problem = problem_for(cell)
    lam = fixed_lam(problem, params)
    estimator = algorithms.get(cell.algorithm, cell.backend)
    kwargs = dict(t=cell.t, K=cell.K, seed=cell.seed, **cell.algorithm_kwargs)
    lam_b = problem.as_lam(lam)
    # One compilation serves every t up to the same power of two (trajectory buffers).
    key = ("hypergradient_error", cell.algorithm, cell.algorithm_params, cell.shape_key(),
           problem.ops.device_name(), next_pow2(cell.t))
    result, wall, compile_time, peak_mb = _measured_call(
        problem, lambda: estimator(problem, lam_b, **kwargs),
        lambda r: problem.ops.block(r.hypergrad), key)
    return PipelineResult(metrics=_metrics(problem, lam, result, wall=wall,
                                           compile_time=compile_time, peak_mb=peak_mb),
                          device=problem.ops.device_name())


def cost(cell) -> float:
    """Expected oracle calls of a cell: t forward steps, up to t reverse steps (ITD) and
    the K of the adjoint solve or truncation (what caps a batch's size)."""
    return 2.0 * cell.t + float(cell.K or 0)


def _lanes(cells) -> dict[tuple, list]:
    """The batch's lanes: cells of one (seed, K setting), sorted by t (then K)."""
    lanes: dict[tuple, list] = defaultdict(list)
    for cell in cells:
        lanes[(cell.seed, cell.K_setting)].append(cell)
    for lane in lanes.values():
        lane.sort(key=lambda c: (c.t, -1 if c.K is None else c.K))
    return dict(sorted(lanes.items(), key=lambda item: (item[0][0], str(item[0][1]))))


def _shape_signature(problem) -> tuple:
    """What one vmapped call needs equal across its instances."""
    return (problem.fns, problem.w_shape, problem.lam_shape, tuple(
        (k, tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in
        sorted(problem.arrays_np.items())))


def run_batch(cells) -> Iterator[tuple[object, PipelineResult]]:
    """Run cells of one batch key (module docstring): one grid call per group of lanes
    whose instances have equal shapes, then a row per cell."""
    first = cells[0]
    grid = algorithms.get_grid(first.algorithm, first.backend)
    if grid is None:  # no t-grid form: the cells one by one, inside this task
        for cell in cells:
            yield cell, run(cell)
        return
    params = _params(first)
    groups: dict[tuple, list] = defaultdict(list)
    for lane_cells in _lanes(cells).values():
        problem = problem_for(lane_cells[0])
        groups[_shape_signature(problem)].append((problem, lane_cells))
    for lanes in groups.values():
        yield from _run_lanes(grid, lanes, params)


def _run_lanes(grid, lanes, params):
    first = lanes[0][1][0]
    problems = [problem for problem, _ in lanes]
    lams = [fixed_lam(problem, params) for problem in problems]
    points = [[(c.t, c.K) for c in lane_cells] for _, lane_cells in lanes]
    lam_b = [problem.as_lam(lam) for problem, lam in zip(problems, lams)]
    t_max = max(t for lane in points for t, _ in lane)
    ops = problems[0].ops
    # The grid function compiles per (shapes, method, lanes, points, trajectory bucket).
    key = ("hypergradient_error.grid", first.algorithm, first.algorithm_params,
           first.shape_key(), ops.device_name(), len(lanes),
           max(len(lane) for lane in points), next_pow2(t_max))
    results, wall, compile_time, peak_mb = _measured_call(
        problems[0], lambda: grid(problems, lam_b, points=points, **first.algorithm_kwargs),
        lambda out: [ops.block(r.hypergrad) for lane in out for r in lane], key)
    weights = [[max(r.n_oracle_calls, 1) for r in lane] for lane in results]
    total = float(sum(map(sum, weights)))
    device = ops.device_name()
    for (problem, lane_cells), lam, lane_results, lane_weights in zip(
            lanes, lams, results, weights):
        for cell, result, weight in zip(lane_cells, lane_results, lane_weights):
            share = weight / total
            metrics = _metrics(problem, lam, result, wall=wall * share,
                               compile_time=compile_time * share, peak_mb=peak_mb)
            metrics.update(batch_wall_time_s=wall, batch_compile_time_s=compile_time)
            yield cell, PipelineResult(metrics=metrics, device=device)
