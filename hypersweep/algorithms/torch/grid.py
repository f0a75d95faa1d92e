"""t-grid forms of the deterministic estimators in PyTorch: one trajectory per lane.

The same functions, with the same signatures, as :mod:`hypersweep.algorithms.jax.grid`:
``fn(problems, lams, *, points, seed=0) -> list[list[Hypergrad]]``, lane i being
(problems[i], lams[i], points[i]) with points[i] a list of (t, K) pairs in increasing t.
Each result equals the per-point call ``algorithms.get(name, "torch")(problems[i],
lams[i], t=t, K=K, seed=seed)`` (the same operations in the same order, so in practice to
the bit) with the per-point method's cost columns, ``solver_iters`` and ``extras``.

What is shared. Lanes with the same problem object and equal λ are merged into one run
(:func:`~hypersweep.algorithms.common.grid_runs`), and the runs are processed one after
the other in Python; each does one inner loop to its largest t (``_core.run_inner``, one
segment per grid point) and evaluates at each grid point:

* AID (``aid_cg``, ``aid_fp``, ``aid_neumann``) and ``first_order``: the estimate at w_t
  from the per-point code (``aid._solve_at``, ``itd._reverse_from``), from 0.
* ``itd_forward``: (w, Z) carried from segment to segment.
* ``itd``: the t_max steps are recorded once by autograd and each grid t is one
  ``torch.autograd.grad`` from L_out(w_t) through the graph (``retain_graph``): t_max
  forward steps, Σ t backward ones. Memory: that of the per-point ``itd`` at t_max (the
  graph), so no cap is needed; the JAX form's ``common.GRID_TRAJECTORY_CAP_BYTES`` bounds
  a buffer for all lanes at once, which this form never holds.
* ``tbptt``, ``one_step``: one loop without a graph keeps only the iterates the grid needs
  (w_{t−min(K, t)}, resp. w_{t−1}: O(points · dim w)); each point then records its
  min(K, t) (resp. 1) steps from there and runs its reverse pass, as the per-point call.

Cost of a call, per run: t_max inner gradients (instead of Σ t), plus each point's own
adjoint solve / reverse pass / readout (tbptt and one_step also re-run each point's
recorded steps, min(K, t) resp. 1, to record them).
"""
from __future__ import annotations

import torch

from hypersweep.algorithms.common import Hypergrad, grid_results, grid_runs
from hypersweep.algorithms.torch import _core
from hypersweep.algorithms.torch import aid as _aid
from hypersweep.algorithms.torch import itd as _itd


def _segments(problems, lams, points, *, uses_K: bool, at) -> list[list[Hypergrad]]:
    """One inner loop per run, ``at(problem, lam, g, w_t, t, K)`` at each of its points."""
    runs = grid_runs(problems, lams, points, uses_K=uses_K)
    per_run = []
    for run in runs:
        fns, w, arrays, eta = _core.problem_inputs(run.problem)
        g = _core.inner_grad_fn(fns, arrays)
        results, t_prev = [], 0
        for t, K in run.points:
            w = _core.run_inner(g, w, run.lam, eta, t - t_prev)
            t_prev = t
            results.append(at(run.problem, run.lam, g, w, t, K))
        per_run.append(results)
    return grid_results(runs, len(problems), per_run)


def _from_saved(problems, lams, points, *, uses_K: bool, start, at):
    """One loop without a graph per run, keeping w_s for s = ``start(t, K)`` of each point;
    then ``at(problem, lam, g, w_s, t, K)`` per point."""
    runs = grid_runs(problems, lams, points, uses_K=uses_K)
    per_run = []
    for run in runs:
        fns, w, arrays, eta = _core.problem_inputs(run.problem)
        g = _core.inner_grad_fn(fns, arrays)
        saved, s = {}, 0
        for target in sorted({start(t, K) for t, K in run.points}):
            w = _core.run_inner(g, w, run.lam, eta, target - s)  # a new tensor each time
            saved[target], s = w, target
        per_run.append([at(run.problem, run.lam, g, saved[start(t, K)], t, K)
                        for t, K in run.points])
    return grid_results(runs, len(problems), per_run)


# -- the estimators -------------------------------------------------------------------------
def itd(problems, lams, *, points, seed: int = 0) -> list[list[Hypergrad]]:
    """``itd`` at every (t, ·) of every lane: the t_max steps recorded once, one backward
    pass from each grid t. K, seed: unused. Memory: the per-point ``itd`` at t_max."""
    runs = grid_runs(problems, lams, points, uses_K=False)
    per_run = []
    for run in runs:
        fns, w0, arrays, eta = _core.problem_inputs(run.problem)
        g = _core.inner_grad_fn(fns, arrays)
        lam_ = run.lam.detach().requires_grad_(True)
        results, t_prev = [], 0
        with torch.enable_grad():
            w = w0.detach().clone()
            for t, _ in run.points:
                for _ in range(t - t_prev):
                    w = _core.phi(g, w, lam_, eta)
                t_prev = t
                loss = fns.outer_loss(w, lam_, arrays)
                (hypergrad,) = torch.autograd.grad(loss, lam_, retain_graph=True,
                                                   allow_unused=True, materialize_grads=True)
                results.append(Hypergrad(hypergrad=hypergrad.detach(), w_t=w.detach(),
                                         n_inner_grad_evals=t, n_hvp_evals=t,
                                         n_cross_evals=t))
        per_run.append(results)
    return grid_results(runs, len(problems), per_run)


def tbptt(problems, lams, *, points, seed: int = 0) -> list[list[Hypergrad]]:
    """``tbptt`` at every (t, K): w_{t−min(K, t)} kept from one loop per run, then each
    point's min(K, t) recorded steps and reverse pass. seed: unused."""
    return _from_saved(problems, lams, points, uses_K=True,
                       start=lambda t, K: t - min(K, t),
                       at=lambda p, lam, g, w, t, K: _itd._reverse_from(p, lam, g, w, t,
                                                                        min(K, t)))


def one_step(problems, lams, *, points, seed: int = 0) -> list[list[Hypergrad]]:
    """``one_step`` at every (t, ·): w_{t−1} kept from one loop per run, one vjp at each.
    K, seed: unused."""
    return _from_saved(problems, lams, points, uses_K=False, start=lambda t, K: t - 1,
                       at=lambda p, lam, g, w, t, K: _itd._one_step_from(p, lam, g, w, t))


def first_order(problems, lams, *, points, seed: int = 0) -> list[list[Hypergrad]]:
    """``first_order`` at every (t, ·): ∇_λ L_out(w_t, λ) along one inner loop per run.
    K, seed: unused."""
    return _segments(problems, lams, points, uses_K=False,
                     at=lambda p, lam, g, w, t, K: _itd._reverse_from(p, lam, g, w, t, 0))


def itd_forward(problems, lams, *, points, seed: int = 0) -> list[list[Hypergrad]]:
    """``itd_forward`` at every (t, ·): (w, Z) carried along one inner loop per run, the
    readout at each grid t. K, seed: unused."""
    runs = grid_runs(problems, lams, points, uses_K=False)
    per_run = []
    for run in runs:
        step, tangents = _itd._forward_start(run.problem, run.lam)
        w, results, t_prev = run.problem.w_init.detach().clone(), [], 0
        for t, _ in run.points:
            w, tangents = _itd._forward_steps(step, w, tangents, t - t_prev)
            t_prev = t
            results.append(_itd._forward_result(run.problem, run.lam, w, tangents, t))
        per_run.append(results)
    return grid_results(runs, len(problems), per_run)


def _aid_at(method: str):
    return lambda p, lam, g, w, t, K: _aid._solve_at(method, p, lam, w, t, K)


def aid_cg(problems, lams, *, points, seed: int = 0) -> list[list[Hypergrad]]:
    """``aid_cg`` at every (t, K): the inner loop continued from grid t to grid t, CG with
    budget K from 0 at each. seed: unused."""
    return _segments(problems, lams, points, uses_K=True, at=_aid_at("cg"))


def aid_fp(problems, lams, *, points, seed: int = 0) -> list[list[Hypergrad]]:
    """``aid_fp`` at every (t, K), from v₀ = 0, along one inner loop per run."""
    return _segments(problems, lams, points, uses_K=True, at=_aid_at("fp"))


def aid_neumann(problems, lams, *, points, seed: int = 0) -> list[list[Hypergrad]]:
    """``aid_neumann`` at every (t, K) along one inner loop per run."""
    return _segments(problems, lams, points, uses_K=True, at=_aid_at("neumann"))
