"""The t-grid form of the estimators (``algorithms.get_grid``) against the per-point calls.

A grid call runs one inner loop per lane (lanes sharing a problem object and λ share
one) and evaluates the estimator at every (t, K) of the lane on the way; JAX vmaps the
lanes in one compiled call. Every result must be the per-point call's: the estimate, w_t
and the adjoint v to float64 rounding (rel ≤ 1e-10: the same operations, batched, in a
different loop structure), and the cost columns, ``solver_iters`` and ``extras`` keys
identical. Every algorithm with ``grid_impls`` in the catalog is checked, on both
backends, on the catalog's small instances of three problems.
"""
from __future__ import annotations

import functools

import jax_traces
import numpy as np
import pytest

from hypersweep import algorithms, problems
from hypersweep.problems import base

BACKENDS = ("jax", "torch")
GRID_ALGORITHMS = [n for n in algorithms.names("estimator") if algorithms.spec(n).grid_impls]
# three problems of different structure: linear-quadratic, logistic (analytic inner_grad
# with a nonlinearity), and a generic quadratic with a set condition number
GRID_PROBLEMS = [n for n in problems.names() if n in ("ridge", "logreg", "quadratic")]
T_GRID = (1, 3, 8, 20)
T_GRID_OTHER = (2, 3, 13)  # another seed's grid: other t values, fewer points (padding)
K_FIXED = 5
RTOL = 1e-10  # float64: the same arithmetic up to the order XLA/torch batch it in
TRACED = "_grid_lanes"  # the JAX grid's jitted function (tests/jax_traces.py)


@functools.lru_cache(maxsize=None)
def make(name: str, backend: str, seed: int, **extra):
    return problems.make(name, backend=backend, seed=seed, dtype="float64",
                         **{**problems.spec(name).small, **extra})


def to_numpy(x) -> np.ndarray:
    backend = "torch" if type(x).__module__.startswith("torch") else "jax"
    return np.asarray(base.load_ops(backend).to_numpy(x), dtype=np.float64)


def rel_diff(a, b) -> float:
    a, b = to_numpy(a), to_numpy(b)
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else 0.0


def per_point(name: str, problem, lam, t: int, K):
    return algorithms.get(name, problem.backend)(problem, lam, t=t, K=K)


def assert_same(got, want, where: str) -> None:
    """``got`` (grid) is ``want`` (per-point call) to rounding; counts identical."""
    assert type(got.hypergrad) is type(want.hypergrad), where
    assert type(got.w_t) is type(want.w_t), where
    assert rel_diff(got.hypergrad, want.hypergrad) <= RTOL, where
    assert rel_diff(got.w_t, want.w_t) <= RTOL, where
    assert got.costs() == want.costs(), where
    assert got.solver_iters == want.solver_iters, where
    assert got.extras.keys() == want.extras.keys(), where
    for key, value in want.extras.items():
        if key == "v":
            assert type(got.extras["v"]) is type(value), where
            assert rel_diff(got.extras["v"], value) <= RTOL, where
        elif key == "solver_rel_residual":
            # a residual already relative to ‖rhs‖, often at rounding level (1e-16) when
            # the solver converged: compared absolutely
            assert abs(got.extras[key] - value) <= RTOL, (where, got.extras[key], value)
        else:
            assert got.extras[key] == value, (where, key)


def lines(name: str, ts=T_GRID) -> tuple[list, list]:
    """(K = fixed line, K = t line) of points; K None where the algorithm ignores it."""
    uses_K = algorithms.spec(name).uses_K
    return ([(t, K_FIXED if uses_K else None) for t in ts],
            [(t, t if uses_K else None) for t in ts])


def check_lanes(name, lane_problems, lane_lams, lane_points, results) -> None:
    assert len(results) == len(lane_points)
    for i, (problem, lam, points, got) in enumerate(
            zip(lane_problems, lane_lams, lane_points, results)):
        assert len(got) == len(points)
        for (t, K), result in zip(points, got):
            assert_same(result, per_point(name, problem, lam, t, K),
                        f"{name} lane {i} t={t} K={K}")


# -- every grid algorithm = its per-point calls ---------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("problem_name", GRID_PROBLEMS)
@pytest.mark.parametrize("name", GRID_ALGORITHMS)
def test_grid_equals_per_point_calls(backend, problem_name, name):
    seeds = [make(problem_name, backend, seed) for seed in (0, 1)]
    # two seeds × (K fixed, K = t); the two lines of one seed share the problem object
    # (one run); the seeds' grids differ, so JAX masks each run's steps and pads one
    lane_problems = [seeds[0], seeds[0], seeds[1], seeds[1]]
    lane_lams = [p.initial_hyperparams() for p in lane_problems]
    lane_points = [*lines(name), *lines(name, T_GRID_OTHER)]
    grid = algorithms.get_grid(name, backend)
    results = grid(lane_problems, lane_lams, points=lane_points)
    check_lanes(name, lane_problems, lane_lams, lane_points, results)


@pytest.mark.parametrize("name", GRID_ALGORITHMS)
def test_jax_shared_grid_equals_per_point_calls(name):
    """Every run with the same points: JAX passes t and K unbatched (scalar loop bounds)."""
    traces = jax_traces.counts()
    seeds = [make("logreg", "jax", seed) for seed in (0, 1, 2)]
    lane_problems = [p for p in seeds for _ in range(2)]
    lane_lams = [p.initial_hyperparams() for p in lane_problems]
    lane_points = [*lines(name)] * len(seeds)
    before = traces[TRACED]
    results = algorithms.get_grid(name, "jax")(lane_problems, lane_lams, points=lane_points)
    assert traces[TRACED] <= before + 1
    check_lanes(name, lane_problems, lane_lams, lane_points, results)


def test_every_estimator_with_a_grid_has_it_on_both_backends():
    assert {"itd", "tbptt", "one_step", "first_order", "itd_forward", "aid_cg", "aid_fp",
            "aid_neumann"} <= set(GRID_ALGORITHMS)
    for name in algorithms.names("estimator"):
        for backend in BACKENDS:
            grid = algorithms.get_grid(name, backend)
            assert (grid is None) == (name not in GRID_ALGORITHMS), (name, backend)


# -- hostile lanes ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ("aid_cg", "itd"))
def test_a_diverging_lane_diverges_alone(backend, name):
    p0, p1 = make("quadratic", backend, 0), make("quadratic", backend, 1)
    # 50× the stable step: |1 − η·eig| up to 49, overflow (non-finite) within 400 steps
    wild = p0.with_inner_lr(50 * p0.inner_lr)
    points = [(t, 10) for t in (5, 50, 400)]
    lane_problems = [p0, wild, p1]
    lam = p0.initial_hyperparams()
    grid = algorithms.get_grid(name, backend)
    results = grid(lane_problems, [lam] * 3, points=[points] * 3)
    assert not np.all(np.isfinite(to_numpy(results[1][-1].w_t)))
    # the wild lane is its per-point calls too, non-finite entries in the same places
    # (aid_cg's estimate stays finite: CG stops at once on a non-finite rhs, v = 0)
    for (t, K), result in zip(points, results[1]):
        want = per_point(name, wild, lam, t, K)
        for got_x, want_x in ((result.hypergrad, want.hypergrad), (result.w_t, want.w_t)):
            np.testing.assert_allclose(to_numpy(got_x), to_numpy(want_x), rtol=RTOL,
                                       equal_nan=True)
    check_lanes(name, [p0, p1], [lam, lam], [points, points], [results[0], results[2]])
    # and bit for bit what the same call (same shapes: one compiled program) gives with a
    # calm lane in the wild one's place (a copy, so that it is not merged with lane 0)
    calm = grid([p0, p0.with_inner_lr(p0.inner_lr), p1], [lam] * 3, points=[points] * 3)
    for with_wild, without in zip((results[0], results[2]), (calm[0], calm[2])):
        for a, b in zip(with_wild, without):
            np.testing.assert_array_equal(to_numpy(a.hypergrad), to_numpy(b.hypergrad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ("aid_cg", "aid_fp"))
def test_solver_iters_stay_per_lane(backend, name):
    """One lane's solver stops at its tolerance next to lanes that spend their whole K
    (under vmap they share one while loop, each lane frozen once done)."""
    p0, p1 = make("logreg", backend, 0), make("logreg", backend, 1)
    lam = p0.initial_hyperparams()
    big = 5000  # far more than either solver needs at tolerance 1e-12 on dim w = 5
    lane_points = [[(20, 2), (60, 3)], [(20, big), (60, big)], [(20, 4), (60, big)]]
    lane_problems = [p0, p0, p1]
    results = algorithms.get_grid(name, backend)(lane_problems, [lam] * 3,
                                                 points=lane_points)
    check_lanes(name, lane_problems, [lam] * 3, lane_points, results)
    assert [r.solver_iters for r in results[0]] == [2, 3]
    early = [r.solver_iters for r in results[1]] + [results[2][1].solver_iters]
    assert all(0 < k < big for k in early), early
    assert results[2][0].solver_iters == 4


# -- at scale (JAX): many lanes, long grids, one compilation ------------------------------------
def test_jax_eight_seeds_ten_t_values_one_compilation():
    traces = jax_traces.counts()
    params = dict(n_train=120, n_val=80, n_test=0, n_features=12)  # used by no other test
    seeds = [make("logreg", "jax", seed, **params) for seed in range(8)]
    ts = (1, 2, 5, 10, 20, 50, 100, 200, 350, 500)
    fixed, full = lines("aid_cg", ts)
    lane_problems = [p for p in seeds for _ in range(2)]
    lane_lams = [p.initial_hyperparams() for p in lane_problems]
    lane_points = [fixed, full] * len(seeds)
    grid = algorithms.get_grid("aid_cg", "jax")
    before = traces[TRACED]
    results = grid(lane_problems, lane_lams, points=lane_points)
    assert traces[TRACED] == before + 1, "one grid call, one compilation"
    check_lanes("aid_cg", lane_problems, lane_lams, lane_points, results)
    # other t and K values, same number of points: the compiled function is reused
    moved = [[(t + 3, K + 1) for t, K in lane] for lane in lane_points]
    again = grid(lane_problems, lane_lams, points=moved)
    assert traces[TRACED] == before + 1, "a new t or K recompiled the grid"
    lane = 5
    for (t, K), result in zip(moved[lane], again[lane]):
        assert_same(result, per_point("aid_cg", lane_problems[lane], lane_lams[lane], t, K),
                    f"moved t={t} K={K}")


def test_jax_trajectory_cap_falls_back_to_per_point_calls(monkeypatch):
    from hypersweep.algorithms.jax import grid as jax_grid

    traces = jax_traces.counts()
    problem = make("ridge", "jax", 0)
    lam = problem.initial_hyperparams()
    points = [(t, None) for t in T_GRID]
    # 2 runs × next_pow2(20) = 32 slots × dim w 5 × 8 bytes = 2560 bytes > 2000
    monkeypatch.setattr(jax_grid, "GRID_TRAJECTORY_CAP_BYTES", 2000)
    other = make("ridge", "jax", 1)
    before = traces[TRACED]
    results = algorithms.get_grid("itd", "jax")([problem, other], [lam, lam],
                                                points=[points, points])
    assert traces[TRACED] == before, "over the cap, the grid kernel must not run"
    check_lanes("itd", [problem, other], [lam, lam], [points, points], results)


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_grid_bad_input_raises_value_error(backend):
    grid = algorithms.get_grid("aid_cg", backend)
    p = make("ridge", backend, 0)
    lam = p.initial_hyperparams()
    with pytest.raises(ValueError, match=r"problems\[1\] differs from problems\[0\] in "
                                         r"w_shape: \(6,\) vs \(5,\)"):
        grid([p, make("ridge", backend, 0, n_features=6)], [lam, np.zeros(6)],
             points=[[(3, 2)], [(3, 2)]])
    with pytest.raises(ValueError, match=r"problems\[1\] differs .* in fns"):
        grid([p, make("quadratic", backend, 0)], [lam, np.zeros(3)],
             points=[[(3, 2)], [(3, 2)]])
    with pytest.raises(ValueError, match=r"points\[0\] must be sorted by increasing t; "
                                         r"got t=2 after t=5"):
        grid([p], [lam], points=[[(5, 2), (2, 2)]])
    with pytest.raises(ValueError, match=r"K must be an integer >= 0.*None"):
        grid([p], [lam], points=[[(5, None)]])
    with pytest.raises(ValueError, match=r"\bt must be an integer >= 1; got 0"):
        grid([p], [lam], points=[[(0, 2)]])
    with pytest.raises(ValueError, match=r"one lam and one points list per problem"):
        grid([p, p], [lam], points=[[(1, 1)], [(1, 1)]])
    with pytest.raises(ValueError, match=r"Unknown parameter 'tol'"):
        grid([p], [lam], points=[[(1, 1)]], tol=1e-3)
    other = make("ridge", "torch" if backend == "jax" else "jax", 0)
    with pytest.raises(ValueError, match=r"problems\[0\] is on backend"):
        grid([other], [lam], points=[[(1, 1)]])
    assert grid([p, p], [lam, lam], points=[[], [(2, 1)]])[0] == []
