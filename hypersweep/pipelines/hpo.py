"""Gradient-based HPO pipeline: an outer loop on λ driven by the cell's algorithm.

Two kinds of algorithm run here:

* ``kind="estimator"`` (itd, aid_*, one_step, first_order, exact, …): each outer step
  calls the estimator at the current λ with the cell's t (inner steps) and K (its linear
  system / truncation budget), then takes one step of the outer optimizer on λ.
  With ``warm_start_w`` the inner loop of step k+1 starts from step k's w_t (so
  ``first_order``/``one_step`` with warm starts are the classic online baselines); with
  ``warm_start_v`` the adjoint solver of step k+1 starts from step k's adjoint v.
* ``kind="online"`` (hyperdistill, t1t2, greedy): ``init`` once, then one ``step`` per
  outer step (t inner steps on the carried w and one λ update; see
  :mod:`hypersweep.algorithms.online_common` for t and K per method). w is always carried.
* ``kind="baseline"`` (fixed): the estimator loop without its outer update — each outer
  step trains w as the estimators do (t inner steps, ``warm_start_w`` and
  ``cap_inner_lr`` alike) and λ stays λ₀ exactly, so its row is the untuned reference:
  F(λ₀) and, by construction, ``outer_grad_norm_rel`` = 1.

``pipeline_params`` (defaults in :data:`DEFAULTS`):

``outer_steps`` (100)      λ updates to run at most.
``time_budget_s`` (none)   stop once the timed wall clock passes this many seconds.
``optimizer`` ("adam")     outer optimizer on λ: "adam" or "sgd" (optax in JAX, a
                           functional copy of torch.optim's equations in PyTorch).
``outer_lr`` (0.1)         its step size.
``warm_start_w`` (false)   start each inner loop from the previous w_t (hypergradient kind).
``warm_start_v`` (false)   adjoint warm start, for aid_cg and aid_fp only (others raise
                           ``ValueError``): step k+1's solver starts from step k's v
                           (``Hypergrad.extras["v"]``, passed as ``v0``), rescaled by
                           η_k/η_{k+1} when the capped η changed (η H v = rhs, so η v
                           does not depend on η). K stays the bound on solver iterations;
                           a warm CG start costs one extra HVP (r₀ = rhs − ηH v₀), a warm
                           fixed-point start one (its first step is no longer free), both
                           counted in ``n_hvp_evals``. Step 0 starts from v = 0.
``cap_inner_lr`` (true)    each outer step uses η_k = min(η, 1/L(λ_k)) where the problem
                           bounds its curvature as a function of λ (``lipschitz``): as λ
                           moves, a fixed η = 1/L(λ₀) can stop Φ from contracting. ITD
                           then differentiates t steps with η_k held constant.
``lam0`` (none)            initial λ: a scalar broadcast to λ's shape, or a full list;
                           default: the problem's λ₀.
``eval_every`` (1)         write a trace row every this many outer steps (and the last).
``oracle_metrics`` (true)  score the cell with the problem's float64 oracle: trace rows'
                           ``outer_grad_norm`` (‖∇F(λ_k)‖) and ``inner_distance``
                           (‖w_k − w*(λ_k)‖); the result row's F(λ_final), ‖∇F‖ and
                           ``inner_suboptimality``. false: none of them (each costs exact
                           solves: at MNIST's shape, n = 20,000 and 7,850 inner variables,
                           ~30 s per solve, more than a study's budget per cell); the result
                           row's ``val_loss`` is then the last iterate's L_out(w_t, λ), with
                           its test metrics (``val_loss_is`` says which).

Output, in the shared schemas. One trace row per evaluated outer step k (0-based): the
state *at which step k's hypergradient was computed* — λ_k (mean/min/max), ``val_loss`` =
L_out(w_t, λ_k) in float64 at that step's inner iterate, ``test_loss``/``test_accuracy``
there, ``best_val_loss`` so far, ``hypergrad_norm``, cumulative ``wall_time_s`` (estimator
+ λ update only; evaluation excluded) and cumulative evaluation counts; ``extra`` holds
``value`` = F(λ_k) (the exact value function, on problems with a closed form) and
method diagnostics (e.g. HyperDistill's θ). The result row: ``val_loss`` = the *exact*
value function F(λ_final) = ``problem.value`` at the λ after the last update (not the
last iterate's L_out, which is ``extra.last_iterate_val_loss``), ``test_*`` at
w*(λ_final), total ``wall_time_s``, ``compile_time_s`` (warm-up call minus a timed step),
total counts, and the final λ in ``extra`` (``lam_final_mean/min/max``, the full λ when
small); also where the run was best, for a run that drifts after it: ``best_step`` (the
evaluated step with the lowest val loss, ``best_val_loss``) and its λ
(``best_lam_mean/min/max``, ``best_lam`` when small).
"""
from __future__ import annotations

import importlib
import io
import json
import math
import sys
import time
from typing import Any

import numpy as np

from hypersweep import algorithms
from hypersweep.algorithms.common import add_costs, check_budget, cost_columns
from hypersweep.orchestrator.cell import PipelineResult, canonical_json
from hypersweep.pipelines._measure import PeakHeap
from hypersweep.pipelines.common import oracle_grad_norm, problem_for
from hypersweep.pipelines.params import HpoParams
from hypersweep.seeding import derive_seed
from hypersweep.validation import ParamsError

#: the schema of ``pipeline_params``, shared with ``hypersweep plan``
#: (:class:`hypersweep.pipelines.params.HpoParams`)
DEFAULTS: dict[str, Any] = HpoParams.defaults()
#: λ with at most this many coordinates is written out in full in ``extra``
MAX_LAM_IN_EXTRA = 64


def check_params(params: dict) -> dict:
    """Merge ``pipeline_params`` over :data:`DEFAULTS`, checked by the schema the study
    validator uses at plan time; bad keys/values raise ``ValueError`` (ParamsError)."""
    return HpoParams.parse(params, prefix="pipeline_params").as_dict()


def check_warm_start_v(params: dict, algorithm: str) -> None:
    """``warm_start_v: true`` needs an estimator with a ``v0``; ``ValueError`` otherwise."""
    issues = HpoParams.parse(params, prefix="pipeline_params").algorithm_issues(algorithm)
    if issues:
        raise ParamsError(issues)


def initial_lam(problem, lam0) -> np.ndarray:
    """λ₀ from ``lam0`` (scalar broadcast to λ's shape, or a full list) or the problem's."""
    if lam0 is None:
        return problem.initial_hyperparams()
    try:
        lam = np.asarray(lam0, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"pipeline_params.lam0 must be a number or a list of numbers; "
                         f"got {lam0!r}") from None
    if lam.ndim == 0:
        lam = np.full(problem.lam_shape, float(lam))
    if not np.all(np.isfinite(lam)):
        raise ValueError(f"pipeline_params.lam0 must be finite; got {lam0!r}")
    return problem.lam_numpy(lam)


def _lam_summary(lam: np.ndarray, prefix: str = "lam") -> dict:
    return {f"{prefix}_mean": float(np.mean(lam)), f"{prefix}_min": float(np.min(lam)),
            f"{prefix}_max": float(np.max(lam))}


def _inner_distance(problem, w, lam) -> float | None:
    """‖w − w*(λ)‖ in float64."""
    value = float(np.linalg.norm(np.asarray(w, dtype=np.float64)
                                 - problem.exact_inner_solution(lam)))
    return value if math.isfinite(value) else None


def _backend_online(backend: str):
    return importlib.import_module(f"hypersweep.algorithms.{backend}.online")


class _HypergradientLoop:
    """Outer loop for ``kind="estimator"``: estimator + outer optimizer on λ. For
    ``kind="baseline"`` the same loop with no outer update: λ is never touched."""

    def __init__(self, cell, problem, params, lam0):
        self.cell, self.problem = cell, problem
        self.estimator = algorithms.get(cell.algorithm, cell.backend)
        # not "a zero step": an optimizer with decay or momentum would still move λ
        self.tunes = algorithms.spec(cell.algorithm).kind != "baseline"
        self.algo_kwargs = algorithms.check_params(cell.algorithm, cell.algorithm_kwargs)
        self.warm_w = params["warm_start_w"]
        self.warm_v = params["warm_start_v"]
        self.cap_lr = params["cap_inner_lr"]
        self.opt = _backend_online(cell.backend).outer_optimizer(params["optimizer"],
                                                                 float(params["outer_lr"]))
        self.lam = problem.as_lam(lam0)
        self.opt_state = self.opt.init(self.lam)
        self.w_prev = None
        self.v_prev = self.eta_prev = None  # the last adjoint and the η it was solved with
        self.k = 0

    def _call(self, problem, lam, k, v0=None):
        # A distinct, reproducible seed per outer step (minibatches of stocbio differ).
        seed = derive_seed("hpo", self.cell.seed, k, bits=31)  # PRNGKey takes 32 bits
        warm = {} if v0 is None else {"v0": v0}
        return self.estimator(problem, lam, t=self.cell.t, K=self.cell.K, seed=seed,
                              **self.algo_kwargs, **warm)

    def _v0(self, eta: float):
        """The previous adjoint for a system with inner step ``eta`` (None at step 0)."""
        if not self.warm_v or self.v_prev is None:
            return None
        if eta == self.eta_prev:
            return self.v_prev
        # v solves η H v = rhs, so η v is η-free: rescale when the capped η moved.
        return self.v_prev * (self.eta_prev / eta)

    def warm_up(self):
        hg = self._call(self.problem, self.lam, 0)
        if self.tunes:
            out = self.opt.apply(self.lam, hg.hypergrad, self.opt_state)
            self.problem.ops.block(out[0])
        else:
            self.problem.ops.block(hg.w_t)

    def step(self):
        problem = self.problem
        if self.warm_w and self.w_prev is not None:
            problem = problem.with_w_init(self.w_prev)
        lam = self.lam
        if self.cap_lr:
            eta = problem.stable_inner_lr(lam)
            if eta < problem.inner_lr:
                problem = problem.with_inner_lr(eta)
        hg = self._call(problem, lam, self.k, self._v0(problem.inner_lr))
        if self.tunes:
            self.lam, self.opt_state = self.opt.apply(lam, hg.hypergrad, self.opt_state)
            self.problem.ops.block(self.lam)
        else:
            self.problem.ops.block(hg.w_t)
        self.w_prev = hg.w_t
        if self.warm_v:
            self.v_prev, self.eta_prev = hg.extras["v"], problem.inner_lr
        self.k += 1
        return dict(lam=lam, w=hg.w_t, hypergrad=hg.hypergrad, costs=hg.costs(),
                    extras={} if hg.solver_iters is None else {"solver_iters":
                                                                int(hg.solver_iters)})


class _OnlineLoop:
    """Outer loop for ``kind="online"``: ``init`` once, ``step`` per outer step."""

    def __init__(self, cell, problem, params, lam0):
        self.cell, self.problem = cell, problem
        self.method = algorithms.get(cell.algorithm, cell.backend)
        self.cap_lr = params["cap_inner_lr"]
        kwargs = algorithms.check_params(cell.algorithm, cell.algorithm_kwargs)
        self.state = self.method.init(problem, lam0, seed=cell.seed,
                                      optimizer=params["optimizer"],
                                      outer_lr=float(params["outer_lr"]), **kwargs)

    @property
    def lam(self):
        return self.state.lam

    def warm_up(self):
        state, _ = self.method.step(self.problem, self.state, t=self.cell.t, K=self.cell.K)
        self.problem.ops.block(state.lam)  # steps are pure: the warm-up state is dropped

    def step(self):
        problem = self.problem
        if self.cap_lr:
            eta = problem.stable_inner_lr(self.state.lam)
            if eta < problem.inner_lr:
                problem = problem.with_inner_lr(eta)
        self.state, info = self.method.step(problem, self.state, t=self.cell.t,
                                            K=self.cell.K)
        self.problem.ops.block(self.state.lam)
        return dict(lam=info.lam, w=info.w, hypergrad=info.hypergrad, costs=info.costs(),
                    extras=dict(info.extras))


class _SolverLoop:
    """Outer loop for ``kind="solver"``: a :class:`~hypersweep.algorithms.solver_run.
    SolverRun`; one ``step`` is a chunk of outer iterations up to the next evaluation
    (one compiled ``lax.scan`` in JAX). The solver's own step sizes and batch are its
    algorithm params; ``optimizer``/``outer_lr``/``warm_start_*``/``cap_inner_lr`` and the
    cell's t and K do not apply (see the catalog)."""

    def __init__(self, cell, problem, params, lam0):
        from hypersweep.algorithms.solver_run import SolverRun

        self.run = SolverRun(problem, cell.algorithm, seed=cell.seed,
                             params=dict(cell.algorithm_kwargs), lam0=lam0)
        self.problem = problem
        self.chunk = int(params["eval_every"])
        self.total = int(params["outer_steps"])

    @property
    def lam(self):
        return self.run.state.outer

    def warm_up(self):
        self.run.warm_up(min(self.chunk, self.total))
        rest = self.total % self.chunk
        if rest and self.total > self.chunk:
            self.run.warm_up(rest)  # the last, shorter chunk compiles its own scan

    def step(self):
        before = dict(self.run.costs)
        n = min(self.chunk, self.total - self.run.k)
        snap = self.run.advance(n)
        costs = {k: (None if snap.costs[k] is None else snap.costs[k] - (before[k] or 0))
                 for k in snap.costs}
        return dict(lam=snap.lam, w=snap.w, hypergrad=None, costs=costs, extras={},
                    n_steps=n)


def run(cell) -> PipelineResult:
    # A diverging run overflows in its float64 evaluations on the way to inf/NaN; that is
    # recorded (the row becomes "diverged"), not warned about.
    # peak_memory_mb: the extra heap (malloc'd bytes: numpy, torch and XLA:CPU buffers)
    # from the cell's start, building its problem included, sampled every 5 ms
    with np.errstate(over="ignore", invalid="ignore"), PeakHeap(interval=5e-3) as mem:
        result = _run(cell)
    result.metrics.setdefault("peak_memory_mb", mem.peak_mb)
    return result


def _run(cell) -> PipelineResult:
    params = check_params(cell.pipeline_kwargs)
    spec = algorithms.spec(cell.algorithm)
    kinds = ("estimator", "online", "solver", "baseline")
    if spec.kind not in kinds:
        valid = [n for kind in kinds for n in algorithms.names(kind)]
        raise ValueError(f"pipeline 'hpo' runs hypergradient, online, solver or baseline "
                         f"algorithms; "
                         f"{cell.algorithm!r} is of kind {spec.kind!r}. Valid choices: "
                         f"{', '.join(valid)}")
    if spec.kind != "solver":
        check_budget(cell.t, cell.K, uses_K=spec.uses_K)
    check_warm_start_v(params, cell.algorithm)
    problem = problem_for(cell)
    lam0 = initial_lam(problem, params["lam0"])
    loop_cls = {"online": _OnlineLoop, "solver": _SolverLoop}.get(spec.kind,
                                                                  _HypergradientLoop)
    loop = loop_cls(cell, problem, params, lam0)
    oracle = params["oracle_metrics"]
    grad0_norm = oracle_grad_norm(problem, lam0) if oracle else None
    ops = problem.ops
    closed_form = "closed_form" in problem.capabilities

    # Warm-up (JAX compiles here; t and K are traced so one compilation serves the run).
    compile_clock = ops.compile_seconds
    c0 = compile_clock()
    loop.warm_up()

    traces: list[dict] = []
    wall = 0.0
    costs = cost_columns(0, 0, 0, 0)
    best, best_at = math.inf, None  # best val loss over the evaluations, and (step, λ)
    stop_reason = "outer_steps"
    last = None
    steps_done = 0
    total = params["outer_steps"]
    solver = spec.kind == "solver"
    if solver:  # curves start at λ₀ (a solver's trace step counts iterations done)
        w0 = ops.to_numpy(problem.w_init)
        m0 = problem.metrics(w0, lam0)
        traces.append(dict(
            step=0, wall_time_s=0.0, val_loss=m0["val_loss"], test_loss=m0["test_loss"],
            test_accuracy=m0["test_accuracy"], best_val_loss=None, hypergrad_norm=None,
            **costs, outer_grad_norm=grad0_norm,
            inner_distance=_inner_distance(problem, w0, lam0) if oracle else None,
            extra=canonical_json({"value": problem.value(lam0)} if closed_form else {}),
            **_lam_summary(lam0)))
    while steps_done < total:
        t0 = time.perf_counter()
        out = loop.step()
        elapsed = time.perf_counter() - t0
        wall += elapsed
        costs = add_costs(costs, out["costs"])
        k = steps_done + out.get("n_steps", 1) - 1  # the last outer step this call ran
        steps_done = k + 1
        last = out
        lam_k = ops.to_numpy(out["lam"])
        g = None if out["hypergrad"] is None else ops.to_numpy(out["hypergrad"])
        w = ops.to_numpy(out["w"])
        finite = bool((g is None or np.all(np.isfinite(g))) and np.all(np.isfinite(w))
                      and np.all(np.isfinite(ops.to_numpy(loop.lam))))
        is_last = (steps_done == total or not finite or (
            params["time_budget_s"] is not None and wall >= params["time_budget_s"]))
        if k % params["eval_every"] == 0 or is_last or "n_steps" in out:
            if finite:
                m = problem.metrics(w, lam_k)
            else:
                m = {"val_loss": float("nan"), "test_loss": None, "test_accuracy": None}
            if math.isfinite(m["val_loss"]) and m["val_loss"] < best:
                best, best_at = m["val_loss"], (steps_done if solver else k, lam_k)
            extra = dict(out["extras"])
            if closed_form and finite:
                extra["value"] = problem.value(lam_k)
            scored = finite and oracle
            grad_norm = oracle_grad_norm(problem, lam_k) if scored else None
            traces.append(dict(
                step=steps_done if solver else k, wall_time_s=wall, val_loss=m["val_loss"], test_loss=m["test_loss"],
                test_accuracy=m["test_accuracy"],
                best_val_loss=best if math.isfinite(best) else None,
                hypergrad_norm=None if g is None else float(np.linalg.norm(g)), **costs,
                outer_grad_norm=grad_norm,
                inner_distance=_inner_distance(problem, w, lam_k) if scored else None,
                extra=canonical_json(extra), **_lam_summary(lam_k)))
        if not finite:
            stop_reason = "diverged"
            break
        if params["time_budget_s"] is not None and wall >= params["time_budget_s"]:
            stop_reason = "time_budget"
            break

    lam_final = ops.to_numpy(loop.lam)
    compile_time = compile_clock() - c0  # the warm-up's, plus any inside the steps
    best_lam = {}
    if best_at is not None:  # where the run was best, for a run that drifted after it
        best_lam = {"best_step": best_at[0], **_lam_summary(best_at[1], "best_lam")}
        if best_at[1].size <= MAX_LAM_IN_EXTRA:
            best_lam["best_lam"] = best_at[1].reshape(-1).tolist()
    metrics: dict[str, Any] = dict(
        wall_time_s=wall, compile_time_s=compile_time, compiled=compile_time > 0,
        **costs, outer_steps_done=steps_done,
        stop_reason=stop_reason, val_loss_is="exact value function F(lam_final)",
        **_lam_summary(lam_final, "lam_final"), **best_lam)
    if lam_final.size <= MAX_LAM_IN_EXTRA:
        metrics["lam_final"] = lam_final.reshape(-1).tolist()
    if last["hypergrad"] is not None:
        metrics["hypergrad_norm"] = float(np.linalg.norm(ops.to_numpy(last["hypergrad"])))
    if stop_reason == "diverged" or not np.all(np.isfinite(lam_final)):
        metrics["val_loss"] = float("nan")  # the row becomes "diverged"
    elif not oracle:  # no exact solve: the last iterate's losses
        metrics.update(problem.metrics(ops.to_numpy(last["w"]), ops.to_numpy(last["lam"])))
        metrics["val_loss_is"] = "last iterate L_out(w_t, lam) (oracle_metrics false)"
        metrics["best_val_loss"] = best if math.isfinite(best) else None
    else:
        w_star = problem.exact_inner_solution(lam_final)
        metrics.update(problem.metrics(w_star, lam_final))  # val_loss = F(λ_final)
        w_last = ops.to_numpy(last["w"])
        lam_last = ops.to_numpy(last["lam"])
        metrics["inner_suboptimality"] = float(np.linalg.norm(
            w_last - problem.exact_inner_solution(lam_last)))
        metrics["last_iterate_val_loss"] = problem.outer_loss_np(last["w"], lam_last)
        metrics["best_val_loss"] = best if math.isfinite(best) else None
        metrics["outer_grad_norm"] = oracle_grad_norm(problem, lam_final)
        if grad0_norm:
            metrics["outer_grad_norm_rel"] = metrics["outer_grad_norm"] / grad0_norm
    return PipelineResult(metrics=metrics, traces=traces, device=ops.device_name())


# -- the ridge tutorial's summary table ---------------------------------------------------
def _rows(results) -> list[dict]:
    """Result rows as dicts, from a list of dicts, a pandas DataFrame or a pyarrow Table."""
    if hasattr(results, "to_pylist"):
        return results.to_pylist()
    if hasattr(results, "to_dict") and hasattr(results, "columns"):
        return results.to_dict("records")
    return [dict(r) for r in results]


def _final_log_lam(row: dict) -> float | None:
    extra = row.get("extra")
    # JSON text from Parquet; None, or NaN in a pandas frame, when absent
    extra = json.loads(extra) if isinstance(extra, str) and extra else (
        extra if isinstance(extra, dict) else {})
    for key in ("lam_final_mean", "best_lam_mean"):  # hpo, blackbox
        if extra.get(key) is not None:
            return float(extra[key])
    return None


def tutorial_table(results, *, file=sys.stdout) -> str:
    """The ridge tutorial's summary table from result rows (list of dicts, DataFrame, Table).

    One line per ``ok`` row: method, t, final λ (ridge's h = log λ is shown as exp(h),
    the tutorial's λ), final validation loss (``val_loss``: F(λ_final) for hpo rows, the
    best trial's loss for grid search) and runtime (``wall_time_s``). Rows are ordered
    grid, exact, aid_exact, itd, then the rest, by t. Writes to ``file`` (None: don't) and
    returns the text.
    """
    order = {"grid": 0, "exact": 1, "aid_exact": 2, "itd": 3}
    rows = [r for r in _rows(results) if r.get("status", "ok") == "ok"]
    rows.sort(key=lambda r: (order.get(r["algorithm"], 9), r["algorithm"], r.get("t") or 0,
                             r.get("backend") or ""))
    buf = io.StringIO()
    header = (f"{'method':<14} {'backend':<7} {'t':>5} {'final λ':>12} {'final val loss':>15}"
              f" {'runtime (s)':>12}")
    buf.write(header + "\n" + "-" * len(header) + "\n")
    for r in rows:
        h = _final_log_lam(r)
        lam_txt = "n/a" if h is None else f"{math.exp(h):.4f}"
        val = r.get("val_loss")
        val_txt = "n/a" if val is None else f"{val:.4f}"
        wall = r.get("wall_time_s")
        wall_txt = "n/a" if wall is None else f"{wall:.4f}"
        buf.write(f"{r['algorithm']:<14} {str(r.get('backend', '')):<7} {r.get('t') or '':>5}"
                  f" {lam_txt:>12} {val_txt:>15} {wall_txt:>12}\n")
    text = buf.getvalue()
    if file is not None:
        file.write(text)
    return text
