"""t-grid forms of the deterministic estimators in JAX: one trajectory per lane, lanes vmapped.

Every function here is ``fn(problems, lams, *, points, seed=0) -> list[list[Hypergrad]]``:
lane i is (problems[i], lams[i], points[i]) with points[i] a list of (t, K) pairs in
increasing t (K ignored by the algorithms that ignore it), and the result holds, per lane
and in the order of its points, the ``Hypergrad`` that the per-point call
``algorithms.get(name, "jax")(problems[i], lams[i], t=t, K=K, seed=seed)`` returns: the
same estimate and w_t to rounding (the same operations, batched), the same cost columns
(those of the per-point method, not of the shared work), ``solver_iters`` and ``extras``.

What is shared. Lanes with the same problem object and equal λ (the K = 10 and the K = t
line of one seed) are merged into one *run* (:func:`~hypersweep.algorithms.common.grid_runs`),
and every run does one inner loop to its largest t, evaluating the estimator at each grid
point on the way (``lax.scan`` over the points, each continuing the loop from the
previous point's t):

* AID (``aid_cg``, ``aid_fp``, ``aid_neumann``): w_{t_prev} → w_t by ``_core.run_inner``,
  then the adjoint solve at w_t with that point's K, from 0 (no ``v0``: the per-point
  calls it equals are cold).
* ``first_order``: the same segments, ∇_λ L_out(w_t, λ) at each t.
* ``itd_forward``: (w, Z) carried from segment to segment.
* ``itd``, ``tbptt``, ``one_step``: the forward loop writes w_s into a ring buffer of static
  length ``bucket`` = next power of two ≥ the longest reverse pass of the call (n = t,
  min(K, t) and 1 respectively: next_pow2(t_max) for itd, much less for the truncated
  ones), and each point runs its reverse pass of n steps from w_t. The buffer is
  allocated only while runs × bucket × dim w × itemsize ≤
  ``common.GRID_TRAJECTORY_CAP_BYTES`` (256 MiB); above it the call falls back to the
  per-point calls (logged).

Cost of a call, per run: t_max gradient steps (instead of Σ t), plus each point's own
adjoint solve / reverse pass / readout.

Compilation: one jitted function (``_grid_lanes``) per (problem functions, array shapes,
method, buffer length, number of runs, number of points, whether all runs share their
points), called once per grid call: the runs are stacked on a new leading axis (data,
w_init, λ, η) and vmapped, and t and K are traced int32 arrays, so a call with other t
or K values reuses it. When every run has the same points (every seed on one grid, the
usual sweep) t and K go in unbatched, so loop bounds and buffer indices stay scalars
under vmap; otherwise they are per-lane, and runs with fewer points are padded by
repeating their last point (a zero-length segment; the padded results are dropped).

Under vmap a loop with per-lane bounds runs until every lane stops, each lane's state
frozen once its own condition is false, so per-lane ``solver_iters`` stay exact and a
diverging lane (non-finite iterates) stops its solver at once without touching the
others. With per-lane points the reverse-mode forward loop instead runs the union of
the lanes' steps with unbatched bounds and a per-lane mask (``itd._record``): per-lane
bounds would make XLA select over the whole buffer at every step.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hypersweep.algorithms.common import (GRID_TRAJECTORY_CAP_BYTES, Hypergrad, grid_results,
                                          grid_runs, next_pow2)
from hypersweep.algorithms.jax import _core
from hypersweep.algorithms.jax import aid as _aid
from hypersweep.algorithms.jax import itd as _itd
from hypersweep.problems.jax import executables

_LOG = logging.getLogger(__name__)


# -- one lane (vmapped) ---------------------------------------------------------------------
def _lane(fns, method, bucket, shared, w0, lam, arrays, eta, ts, budgets, lo, hi):
    """Every grid point of one run: ``ts``, ``budgets`` (K, or the reverse length) are its
    (padded) points; ``lo``, ``hi`` (unbatched) bound the reverse-mode forward segments
    over all runs (``shared``: every run has these points, so no step needs a mask).
    Returns per-point stacked outputs."""
    grad_fn = _core.inner_grad_fn(fns, arrays)
    t0 = jnp.zeros((), ts.dtype)
    if method == "reverse":
        def point(carry, x):
            w, trajectory, t_prev = carry
            t, n_rev, s_lo, s_hi = x
            live = None if shared else (lambda s: (s >= t_prev) & (s < t))
            w, trajectory = _itd._record(grad_fn, lam, eta, bucket, w, trajectory, s_lo,
                                         s_hi, live)
            h = _itd._reverse_pass(fns, grad_fn, arrays, lam, eta, bucket, trajectory, w,
                                   t, n_rev)
            return (w, trajectory, t), (h, w)

        trajectory = jnp.zeros((bucket,) + w0.shape, w0.dtype)
        return lax.scan(point, (w0, trajectory, t0), (ts, budgets, lo, hi))[1]
    if method == "forward":
        directions, Z0 = _itd._forward_start(w0, lam)

        def point(carry, t):
            w, Z, t_prev = carry
            w, Z = _itd._forward_steps(grad_fn, lam, eta, directions, w, Z, t - t_prev)
            return (w, Z, t), (_itd._forward_readout(fns, arrays, lam, directions, w, Z), w)

        return lax.scan(point, (w0, Z0, t0), ts)[1]

    def point(carry, x):  # first_order and AID: only w is carried
        w, t_prev = carry
        t, K = x
        w = _core.run_inner(grad_fn, w, lam, eta, t - t_prev)
        if method == "first_order":
            return (w, t), (_core.outer_grads(fns, w, lam, arrays)[1], w)
        hypergrad, res = _aid._adjoint(fns, method, grad_fn, w, lam, arrays, eta, K)
        return (w, t), (hypergrad, w, res.x, res.iters, res.rel_residual, res.matvecs)

    return lax.scan(point, (w0, t0), (ts, budgets))[1]


@functools.partial(jax.jit, static_argnames=("fns", "method", "bucket", "shared"))
def _grid_lanes(fns, method, bucket, shared, w0, lam, arrays, eta, ts, budgets, lo, hi):
    lane = functools.partial(_lane, fns, method, bucket, shared)
    points_axis = None if shared else 0
    return jax.vmap(lane, in_axes=(0, 0, 0, 0, points_axis, points_axis, None, None))(
        w0, lam, arrays, eta, ts, budgets, lo, hi)


# its executables kept on disk: a warm process loads them without tracing or lowering
_grid_lanes_stored = executables.cached(_grid_lanes,
                                        static_argnames=("fns", "method", "bucket", "shared"))


# -- the host side ----------------------------------------------------------------------------
def _rows(x) -> list[list]:
    """[runs, points, ...] array → per run, per point arrays (two levels of unstacking),
    read back once and split on the host: slicing on the device would compile an unstack
    per shape."""
    device = next(iter(x.devices()))
    host = np.asarray(jax.device_get(x))
    return [[jax.device_put(point, device) for point in row] for row in host]


def _call(method: str, runs, budget, bucket: int = 0):
    """Stack the runs, pad their points, run ``_grid_lanes`` once (blocking); returns its
    outputs, each [runs, points, ...]. ``budget(t, K)`` is a point's traced budget."""
    problems = [run.problem for run in runs]
    first = problems[0]
    n_points = max(len(run.points) for run in runs)
    padded = [run.points + [run.points[-1]] * (n_points - len(run.points)) for run in runs]
    ts = np.array([[t for t, _ in pts] for pts in padded], np.int32)
    budgets = np.array([[budget(t, K) for t, K in pts] for pts in padded], np.int32)
    # the reverse-mode forward segments of every run at once: point j covers the steps
    # from the smallest previous t to the largest t over the runs
    previous = np.concatenate([np.zeros((len(runs), 1), np.int32), ts[:, :-1]], axis=1)
    lo, hi = previous.min(axis=0), ts.max(axis=0)

    # the usual sweep (every seed on one grid): t and K go in unbatched, so every loop
    # bound and buffer index is a scalar under vmap
    shared = bool(np.all(ts == ts[0]) and np.all(budgets == budgets[0]))
    if shared:
        ts, budgets = ts[0], budgets[0]

    def put(x):
        return jax.device_put(x, first.device)

    def stacked(arrays):  # on the host, then one copy: jnp.stack compiles per shape
        return put(np.stack([np.asarray(jax.device_get(a)) for a in arrays]))

    # the problems' arrays already share one device (grid_runs checked it)
    out = _grid_lanes_stored(
        first.fns, method, bucket, shared, stacked([p.w_init for p in problems]),
        put(np.stack([np.asarray(jax.device_get(run.lam), first.w_init.dtype)
                      for run in runs])),
        {k: stacked([p.arrays[k] for p in problems]) for k in first.arrays},
        put(np.array([p.inner_lr for p in problems], first.dtype)),
        put(ts), put(budgets), put(lo), put(hi))
    return jax.block_until_ready(out)


def _scatter(runs, n_lanes: int, make) -> list[list[Hypergrad]]:
    """Per lane, its results in its points' order; ``make(r, j, t, K)`` builds run r's
    point j (padded points are never built)."""
    return grid_results(runs, n_lanes, [[make(r, j, t, K) for j, (t, K) in
                                         enumerate(run.points)] for r, run in enumerate(runs)])


def _reverse_grid(problems, lams, points, seed: int, name: str, n_rev, per_point):
    runs = grid_runs(problems, lams, points, uses_K=name == "tbptt")
    if not runs:
        return [[] for _ in problems]
    bucket = next_pow2(max(n_rev(t, K) for run in runs for t, K in run.points))
    first = runs[0].problem
    n_w = int(np.prod(first.w_shape))
    buffer_bytes = len(runs) * bucket * n_w * np.dtype(first.dtype).itemsize
    if buffer_bytes > GRID_TRAJECTORY_CAP_BYTES:
        _LOG.info("%s grid: a %d-step trajectory buffer for %d runs of dim w %d needs "
                    "%.0f MiB > the %.0f MiB cap; falling back to per-point calls", name,
                    bucket, len(runs), n_w, buffer_bytes / 2 ** 20,
                    GRID_TRAJECTORY_CAP_BYTES / 2 ** 20)
        return _scatter(runs, len(problems), lambda r, j, t, K: per_point(
            runs[r].problem, runs[r].lam, t=t, K=K, seed=seed))
    hg, w = (_rows(x) for x in _call("reverse", runs, n_rev, bucket))

    def make(r, j, t, K):
        n = n_rev(t, K)
        return Hypergrad(hypergrad=hg[r][j], w_t=w[r][j], n_inner_grad_evals=t,
                         n_hvp_evals=n, n_cross_evals=n, solver_iters=None)

    return _scatter(runs, len(problems), make)


def _aid_grid(method: str, problems, lams, points):
    runs = grid_runs(problems, lams, points, uses_K=True)
    if not runs:
        return [[] for _ in problems]
    hg, w, v, iters, rel, matvecs = _call(method, runs, lambda t, K: K)
    hg, w, v = _rows(hg), _rows(w), _rows(v)
    iters, rel, matvecs = (np.asarray(x) for x in (iters, rel, matvecs))

    def make(r, j, t, K):
        return _aid._result(method, hg[r][j], w[r][j], t, int(iters[r, j]), False,
                            float(rel[r, j]), int(matvecs[r, j]), v[r][j])

    return _scatter(runs, len(problems), make)


# -- the estimators -------------------------------------------------------------------------
def itd(problems, lams, *, points, seed: int = 0) -> list[list[Hypergrad]]:
    """``itd`` at every (t, ·) of every lane: one forward loop to t_max per run, then a
    reverse pass of t steps from each grid t. K, seed: unused. Buffer next_pow2(t_max)
    per run, under ``common.GRID_TRAJECTORY_CAP_BYTES`` (else per-point calls)."""
    return _reverse_grid(problems, lams, points, seed, "itd", lambda t, K: t, _itd.itd)


def tbptt(problems, lams, *, points, seed: int = 0) -> list[list[Hypergrad]]:
    """``tbptt`` at every (t, K): one forward loop per run, a reverse pass of min(K, t)
    steps from each grid t. Buffer next_pow2(largest min(K, t)) per run (a ring)."""
    return _reverse_grid(problems, lams, points, seed, "tbptt", min, _itd.tbptt)


def one_step(problems, lams, *, points, seed: int = 0) -> list[list[Hypergrad]]:
    """``one_step`` at every (t, ·): one forward loop per run, one reverse step from each
    grid t (a one-slot buffer). K, seed: unused."""
    return _reverse_grid(problems, lams, points, seed, "one_step", lambda t, K: 1,
                         _itd.one_step)


def first_order(problems, lams, *, points, seed: int = 0) -> list[list[Hypergrad]]:
    """``first_order`` at every (t, ·): ∇_λ L_out(w_t, λ) along one inner loop per run.
    K, seed: unused."""
    runs = grid_runs(problems, lams, points, uses_K=False)
    if not runs:
        return [[] for _ in problems]
    hg, w = (_rows(x) for x in _call("first_order", runs, lambda t, K: 0))
    return _scatter(runs, len(problems), lambda r, j, t, K: Hypergrad(
        hypergrad=hg[r][j], w_t=w[r][j], n_inner_grad_evals=t, n_hvp_evals=0))


def itd_forward(problems, lams, *, points, seed: int = 0) -> list[list[Hypergrad]]:
    """``itd_forward`` at every (t, ·): (w, Z) carried along one inner loop per run, the
    readout at each grid t. Memory O(dim λ · dim w) per run, any t. K, seed: unused."""
    runs = grid_runs(problems, lams, points, uses_K=False)
    if not runs:
        return [[] for _ in problems]
    hg, w = (_rows(x) for x in _call("forward", runs, lambda t, K: 0))
    n_lam = int(np.prod(runs[0].problem.lam_shape))
    return _scatter(runs, len(problems), lambda r, j, t, K: Hypergrad(
        hypergrad=hg[r][j], w_t=w[r][j], n_inner_grad_evals=t, n_hvp_evals=t * n_lam,
        n_cross_evals=t * n_lam))


def aid_cg(problems, lams, *, points, seed: int = 0) -> list[list[Hypergrad]]:
    """``aid_cg`` at every (t, K): the inner loop continued from grid t to grid t, CG with
    budget K from 0 at each. seed: unused."""
    return _aid_grid("cg", problems, lams, points)


def aid_fp(problems, lams, *, points, seed: int = 0) -> list[list[Hypergrad]]:
    """``aid_fp`` at every (t, K), from v₀ = 0, along one inner loop per run."""
    return _aid_grid("fp", problems, lams, points)


def aid_neumann(problems, lams, *, points, seed: int = 0) -> list[list[Hypergrad]]:
    """``aid_neumann`` at every (t, K) along one inner loop per run."""
    return _aid_grid("neumann", problems, lams, points)
