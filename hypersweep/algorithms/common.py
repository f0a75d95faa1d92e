"""Backend-free pieces shared by every estimator: the result types, the counting
conventions and the argument checks (both backends import them; this module imports
neither torch nor jax)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np


@dataclass(frozen=True)
class Hypergrad:
    """What every hypergradient estimator returns.

    ``hypergrad``: the estimate of ∇F(λ) (backend array, λ's shape and dtype).
    ``w_t``: the inner iterate the estimate was computed at.
    ``solver_iters``: iterations the linear solver actually used (≤ K; None if none).

    The cost columns follow one convention for every algorithm and both backends
    (``docs/costs.md`` has the table per algorithm):

    ``n_inner_grad_evals``: evaluations of ∇_w L_in (one per Φ step; minibatch ones too).
    ``n_hvp_evals``: products ∇²_ww L_in · v (a reverse step through Φ counts one, a
    forward-mode JVP of Φ counts one per direction, a solver iteration one per product).
    ``n_cross_evals``: products ∇²_λw L_in · v (a reverse step through Φ counts one too,
    since one vjp of Φ yields both parts; the AID cross term (∂_λ g)ᵀ v counts one).
    ``n_outer_grad_evals``: evaluations of (∇_w L_out, ∇_λ L_out) (one pair counts one).
    ``n_samples_touched``: data rows read by minibatch methods (None for full-batch ones).
    ``n_oracle_calls`` (derived): the sum of the four counts above.
    """

    hypergrad: Any
    w_t: Any
    n_inner_grad_evals: int
    n_hvp_evals: int
    solver_iters: int | None = None
    extras: dict = field(default_factory=dict)
    n_cross_evals: int = 0
    n_outer_grad_evals: int = 1
    n_samples_touched: int | None = None

    @property
    def n_oracle_calls(self) -> int:
        return oracle_calls(self.n_inner_grad_evals, self.n_hvp_evals, self.n_cross_evals,
                            self.n_outer_grad_evals)

    def costs(self) -> dict:
        """The cost columns of a result row."""
        return cost_columns(self.n_inner_grad_evals, self.n_hvp_evals, self.n_cross_evals,
                            self.n_outer_grad_evals, self.n_samples_touched)


def oracle_calls(n_inner: int, n_hvp: int, n_cross: int, n_outer: int) -> int:
    """``n_oracle_calls``: every first- and second-order oracle call, one unit each."""
    return int(n_inner) + int(n_hvp) + int(n_cross) + int(n_outer)


def cost_columns(n_inner: int, n_hvp: int, n_cross: int, n_outer: int,
                 n_samples: int | None = None) -> dict:
    """The cost columns shared by result rows and trace rows (same names, same sum)."""
    return dict(n_inner_grad_evals=int(n_inner), n_hvp_evals=int(n_hvp),
                n_cross_evals=int(n_cross), n_outer_grad_evals=int(n_outer),
                n_oracle_calls=oracle_calls(n_inner, n_hvp, n_cross, n_outer),
                n_samples_touched=None if n_samples is None else int(n_samples))


def add_costs(total: dict, step: dict) -> dict:
    """Running totals of two cost-column dicts (``n_samples_touched`` stays None unless one
    of them counts samples)."""
    samples = [v["n_samples_touched"] for v in (total, step)
               if v.get("n_samples_touched") is not None]
    return cost_columns(*(total[k] + step[k] for k in (
        "n_inner_grad_evals", "n_hvp_evals", "n_cross_evals", "n_outer_grad_evals")),
        sum(samples) if samples else None)


class SolveResult(NamedTuple):
    """What the linear solvers of both backends' ``_core`` (``cg``, ``fixed_point``,
    ``neumann``) return.

    ``x``: the solution estimate (b's shape). ``iters``: iterations that changed the
    iterate (the algorithmic count, ≤ the budget). ``rel_residual``: the solver's own
    stopping quantity relative to ‖b‖ at the returned x (CG: recursive residual; fixed
    point: last step ‖v_k − v_{k−1}‖; Neumann: last term; 0 when b = 0). ``matvecs``:
    products computed, including ones a GPU run discards after convergence (torch reads
    its stop flag every few iterations there). In JAX the fields are traced arrays inside
    the jitted estimators; in torch Python numbers.
    """

    x: Any
    iters: Any
    rel_residual: Any
    matvecs: Any


def adjoint_hvps(solver: str, iters: int, warm: bool) -> int:
    """The ``n_hvp_evals`` of an AID adjoint solve, the same rule for both backends.

    ``cg``: one product per iteration, + 1 for r₀ = rhs − ηH v₀ from a warm start.
    ``fp``: from v₀ = 0 the first step v₁ = rhs needs no product (iters − 1); from a warm
    v₀ every step costs one (iters). ``neumann``: one product per added term (iters).
    """
    iters = int(iters)
    if solver == "cg":
        return iters + int(warm)
    if solver == "fp":
        return iters if warm else max(iters - 1, 0)
    if solver == "neumann":
        return iters
    raise ValueError(f"Unknown adjoint solver {solver!r}. Valid choices: cg, fp, neumann")


def check_budget(t: Any, K: Any, *, uses_K: bool) -> tuple[int, int]:
    """Validate t ≥ 1 and K ≥ 0 as integers; raise ``ValueError`` naming the key."""
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ValueError(f"t must be an integer >= 1; got {t!r}")
    if K is None:
        if uses_K:
            raise ValueError("K must be an integer >= 0 for this algorithm; got None")
        K = 0
    if isinstance(K, bool) or not isinstance(K, int) or K < 0:
        raise ValueError(f"K must be an integer >= 0; got {K!r}")
    return t, K


# Relative residual at which CG / fixed-point / Neumann stop early (K is an upper bound).
DEFAULT_TOL = {"float64": 1e-12, "float32": 1e-6}


def next_pow2(n: int) -> int:
    """Smallest power of two ≥ max(n, 1): JAX's static trajectory-buffer length for n steps,
    so t values compile in O(log t) buckets instead of one function per t."""
    return 1 << (max(int(n), 1) - 1).bit_length()


# -- the t-grid form (``algorithms/<backend>/grid.py``) ------------------------------------
#: The largest trajectory buffer, in bytes over all lanes together, that one JAX grid call
#: of a reverse-mode estimator (itd, tbptt, one_step) allocates: runs × next_pow2(largest
#: reverse length) × dim w × itemsize. Above it the call falls back to per-point calls
#: (each with its own, smaller buffer). 256 MiB: 8 lanes of t = 4096 at dim w = 1000 in
#: float64.
GRID_TRAJECTORY_CAP_BYTES = 256 * 2 ** 20


class GridRun(NamedTuple):
    """One inner trajectory of a grid call: the lanes that share a problem object and an
    equal λ (e.g. the K = 10 and the K = t line of one seed), their points merged.

    ``points``: (t, K) pairs sorted by t (stable: ties keep lane order). ``origin[j]``:
    (lane, index in that lane's points) of ``points[j]``.
    """

    problem: Any
    lam: Any
    points: list
    origin: list


def _grid_signature(problem) -> dict:
    """What every problem of one grid call must share (its lanes are stacked)."""
    return {"backend": problem.backend, "dtype": problem.dtype, "fns": problem.fns,
            "w_shape": tuple(problem.w_shape), "lam_shape": tuple(problem.lam_shape),
            "w_init shape": tuple(problem.w_init.shape),
            "array shapes": {k: (tuple(v.shape), str(v.dtype))
                             for k, v in sorted(problem.arrays.items())},
            "device": problem.ops.device_name()}


def grid_runs(problems, lams, points, *, uses_K: bool) -> list[GridRun]:
    """Check a grid call's lanes and merge those that share one inner trajectory.

    Lane i is (problems[i], lams[i], points[i]); points[i] is a list of (t, K) pairs in
    non-decreasing t (each checked by :func:`check_budget`; K may be None when the
    algorithm ignores it). Every problem must have the same functions, shapes, dtype and
    device as problems[0] (``ValueError`` naming the first difference). Lanes with the
    same problem *object* and equal λ values become one run (one inner loop); a lane
    without points gets no run. Raises ``ValueError`` on bad input.
    """
    problems, lams, points = list(problems), list(lams), list(points)
    if not len(problems) == len(lams) == len(points):
        raise ValueError(f"a grid call needs one lam and one points list per problem; got "
                         f"{len(problems)} problems, {len(lams)} lams, {len(points)} points")
    reference = _grid_signature(problems[0]) if problems else {}
    runs: list[GridRun] = []
    lam_values: list = []
    for i, (problem, lam, lane) in enumerate(zip(problems, lams, points)):
        signature = _grid_signature(problem)
        for key, value in signature.items():
            if value != reference[key]:
                raise ValueError(f"problems[{i}] differs from problems[0] in {key}: "
                                 f"{value!r} vs {reference[key]!r}; the lanes of one grid "
                                 f"call must share functions, shapes, dtype and device")
        checked = []
        for j, point in enumerate(lane):
            try:
                t, K = point
            except (TypeError, ValueError):
                raise ValueError(f"points[{i}][{j}] must be a (t, K) pair; got "
                                 f"{point!r}") from None
            checked.append(check_budget(t, K, uses_K=uses_K))
            if j and checked[-1][0] < checked[-2][0]:
                raise ValueError(f"points[{i}] must be sorted by increasing t; got t={t} "
                                 f"after t={checked[-2][0]}")
        if not checked:
            continue
        lam_np = problem.lam_numpy(lam)
        origin = [(i, j) for j in range(len(checked))]
        for r, run in enumerate(runs):
            if run.problem is problem and np.array_equal(lam_values[r], lam_np):
                merged = sorted(zip(run.points + checked, run.origin + origin),
                                key=lambda item: item[0][0])
                runs[r] = run._replace(points=[p for p, _ in merged],
                                       origin=[o for _, o in merged])
                break
        else:
            runs.append(GridRun(problem, lam, checked, origin))
            lam_values.append(lam_np)
    return runs


def grid_results(runs: list[GridRun], n_lanes: int, per_run: list[list]) -> list[list]:
    """Per lane, its results in its points' order, from ``per_run[r][j]``, the result of
    ``runs[r].points[j]`` (entries past a run's points, padding, are ignored)."""
    out: list[list] = [[] for _ in range(n_lanes)]
    slots = {origin: result for run, results in zip(runs, per_run)
             for origin, result in zip(run.origin, results)}
    for lane, index in sorted(slots):
        out[lane].append(slots[(lane, index)])
    return out


def minibatch_sizes(problem) -> tuple[int, int]:
    """(n_train, n_val): the rows a problem's minibatch losses index — the rows of its
    ``X_train``/``X_val`` arrays, else ``info["n_train"]``/``info["n_val"]`` (problems whose
    samples are not rows of an X, e.g. ``quadratic_sum``). ``ValueError`` when neither."""
    out = []
    for split in ("train", "val"):
        key = f"X_{split}"
        if key in problem.arrays_np:
            out.append(int(problem.arrays_np[key].shape[0]))
            continue
        n = problem.built.info.get(f"n_{split}")
        if n is None:
            raise ValueError(f"problem {problem.name!r} has neither array {key!r} nor "
                             f"info['n_{split}']: minibatches cannot be sized")
        out.append(int(n))
    return out[0], out[1]
