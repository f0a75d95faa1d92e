"""Adjoint warm starts: ``v0`` of aid_cg / aid_fp and ``warm_start_v`` of the HPO pipeline.

References are independent of the solvers: on ridge the adjoint at w_t is a dense numpy
solve, v* = (η H)⁻¹ ∇_w L_out(w_t) with H = (2/n) XᵀX + diag(e^h), and the hypergradient
is −η (∂_h g)ᵀ v with ∂_h g = diag(e^h ⊙ w_t) (L_out does not depend on h).

Tolerances (float64):
* 1e-10 for results of converged solves: CG and fixed point stop at relative residual
  1e-12, so their adjoint is within κ(ηH)·1e-12 of v*; κ ≈ 1/(1 − q) ≈ 5.5 here, which
  leaves ≥ 10× of room;
* 1e-8 for torch ↔ JAX parity (the bound and reasoning of tests/test_parity.py).
"""
from __future__ import annotations

import json

import jax_traces
import numpy as np
import pytest

from hypersweep import algorithms, problems
from hypersweep.orchestrator.cell import Cell, run_cell
from hypersweep.pipelines import hpo

BACKENDS = ("jax", "torch")
WARM = ("aid_cg", "aid_fp")
# 40 features: cold CG needs ~26 iterations (q = 0.82), so a saving is visible.
RIDGE = dict(n_features=40, n_train=80, n_val=40, per_feature=True)
T = 300           # q^T ≈ 1e-26: w_t = w* to rounding
CONVERGED_RTOL = 1e-10
PARITY_RTOL = 1e-8


def _problem(backend, **extra):
    return problems.make("ridge", backend=backend, seed=0, dtype="float64",
                         **{**RIDGE, **extra})


def _np(problem, x) -> np.ndarray:
    return np.asarray(problem.ops.to_numpy(x), dtype=np.float64)


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


def _exact_adjoint(problem, lam, w_t):
    """(v*, hypergradient) at w_t by a dense numpy solve (see the module docstring)."""
    a = problem.arrays_np
    X, Xv, yv = a["X_train"], a["X_val"], a["y_val"]
    e = np.broadcast_to(np.exp(lam), w_t.shape)
    H = 2.0 / X.shape[0] * X.T @ X + np.diag(e)
    rhs = 2.0 / Xv.shape[0] * Xv.T @ (Xv @ w_t - yv)
    eta = problem.inner_lr
    v = np.linalg.solve(eta * H, rhs)
    return v, -eta * e * w_t * v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", WARM)
def test_exact_adjoint_as_v0_needs_no_solve(backend, algo):
    p = _problem(backend)
    lam = p.initial_hyperparams() + 0.1
    est = algorithms.get(algo, backend)
    cold = est(p, lam, t=T, K=1000)
    v_star, hg_star = _exact_adjoint(p, lam, _np(p, cold.w_t))
    assert cold.solver_iters > 5  # the cold solve has real work to do
    assert rel(_np(p, cold.extras["v"]), v_star) <= CONVERGED_RTOL
    assert rel(_np(p, cold.hypergrad), hg_star) <= CONVERGED_RTOL

    warm = est(p, lam, t=T, K=1000, v0=v_star)
    if algo == "aid_cg":
        # r₀ = rhs − ηH v* is rounding (≈ 1e-16 relative) ≤ 1e-12: stop at once.
        assert warm.solver_iters <= 1
        assert warm.n_hvp_evals == warm.solver_iters + 1  # + the r₀ product
        assert warm.n_cross_evals == 1
    else:
        # the stop rule looks at ‖v₁ − v₀‖, so one step is always taken
        assert warm.solver_iters == 1 and warm.n_hvp_evals == 1
    assert rel(_np(p, warm.hypergrad), _np(p, cold.hypergrad)) <= CONVERGED_RTOL
    assert rel(_np(p, warm.hypergrad), hg_star) <= CONVERGED_RTOL
    # K = 0 keeps v = v0: the estimate is −η (∂_h g)ᵀ v*, with no solver step
    zero = est(p, lam, t=T, K=0, v0=v_star)
    assert zero.solver_iters == 0
    assert rel(_np(p, zero.hypergrad), hg_star) <= CONVERGED_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", WARM)
def test_nearby_v0_reduces_solver_iterations(backend, algo):
    p = _problem(backend)
    lam = p.initial_hyperparams()
    est = algorithms.get(algo, backend)
    v_prev = est(p, lam, t=T, K=1000).extras["v"]
    lam_next = lam + 1e-3  # an outer step's worth of change
    cold = est(p, lam_next, t=T, K=1000)
    warm = est(p, lam_next, t=T, K=1000, v0=v_prev)
    assert warm.solver_iters < cold.solver_iters < 1000
    assert warm.n_hvp_evals < cold.n_hvp_evals  # the saving outweighs the r₀ product
    assert rel(_np(p, warm.hypergrad), _np(p, cold.hypergrad)) <= CONVERGED_RTOL
    _, hg_star = _exact_adjoint(p, lam_next, _np(p, warm.w_t))
    assert rel(_np(p, warm.hypergrad), hg_star) <= CONVERGED_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", WARM)
def test_zero_v0_is_the_cold_run(backend, algo):
    """v0 = 0 skips the warm-start product: same numbers and counts as v0 = None."""
    p = _problem(backend)
    lam = p.initial_hyperparams()
    est = algorithms.get(algo, backend)
    for K in (0, 4, 1000):
        cold = est(p, lam, t=20, K=K)
        zero = est(p, lam, t=20, K=K, v0=np.zeros(p.w_shape))
        np.testing.assert_array_equal(_np(p, zero.hypergrad), _np(p, cold.hypergrad))
        np.testing.assert_array_equal(_np(p, zero.extras["v"]), _np(p, cold.extras["v"]))
        assert (zero.solver_iters, zero.n_hvp_evals) == (cold.solver_iters, cold.n_hvp_evals)


@pytest.mark.parametrize("algo", WARM)
@pytest.mark.parametrize("K", (3, 1000))
def test_warm_start_torch_matches_jax(algo, K):
    """The same v0 (a perturbed v*) on both backends; K = 3 leaves v far from converged,
    so the result depends on v0 and on every step of the warm-started recursion."""
    p_jax, p_torch = _problem("jax"), _problem("torch")
    lam = p_jax.initial_hyperparams() + 0.2
    w_t = _np(p_jax, algorithms.get("itd", "jax")(p_jax, lam, t=40).w_t)
    v_star, _ = _exact_adjoint(p_jax, lam, w_t)
    v0 = v_star * (1 + 0.3 * np.random.default_rng(0).standard_normal(v_star.shape))
    a = algorithms.get(algo, "jax")(p_jax, lam, t=40, K=K, v0=v0)
    b = algorithms.get(algo, "torch")(p_torch, lam, t=40, K=K, v0=p_torch.ops.asarray(v0))
    assert rel(_np(p_torch, b.hypergrad), _np(p_jax, a.hypergrad)) <= PARITY_RTOL
    assert rel(_np(p_torch, b.extras["v"]), _np(p_jax, a.extras["v"])) <= PARITY_RTOL
    assert (a.solver_iters, a.n_hvp_evals) == (b.solver_iters, b.n_hvp_evals)
    if K == 3:
        assert a.solver_iters == 3
        cold = algorithms.get(algo, "jax")(p_jax, lam, t=40, K=K)
        assert rel(_np(p_jax, cold.hypergrad), _np(p_jax, a.hypergrad)) > 1e-4  # v0 used


@pytest.mark.parametrize("algo", WARM)
def test_jax_warm_start_does_not_recompile(algo):
    pytest.importorskip("jax")
    p = _problem("jax", n_features=9, n_train=17)  # shapes no other test uses
    lam = p.initial_hyperparams()
    est = algorithms.get(algo, "jax")
    traces = jax_traces.counts()
    before = traces["_aid"]  # the jitted body of aid_cg / aid_fp / aid_neumann
    cold = est(p, lam, t=30, K=50)
    assert traces["_aid"] == before + 1
    warm = est(p, lam + 0.1, t=30, K=50, v0=cold.extras["v"])
    est(p, lam, t=7, K=2, v0=np.ones(p.w_shape))
    assert traces["_aid"] == before + 1, "a v0 recompiled"
    assert warm.solver_iters >= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_v0_raises(backend):
    p = _problem(backend)
    lam = p.initial_hyperparams()
    with pytest.raises(ValueError, match=r"'aid_neumann' takes no .*v0.*aid_cg, aid_fp"):
        algorithms.get("aid_neumann", backend)(p, lam, t=3, K=3, v0=np.ones(p.w_shape))
    with pytest.raises(ValueError, match=r"'itd' takes no"):
        algorithms.get("itd", backend)(p, lam, t=3, v0=np.ones(p.w_shape))
    with pytest.raises(ValueError, match=r"v0 .*shape \(40,\); got shape \(3,\)"):
        algorithms.get("aid_cg", backend)(p, lam, t=3, K=3, v0=np.ones(3))
    # v0 is call-time state, not a study parameter
    with pytest.raises(ValueError, match=r"Unknown parameter 'v0'"):
        algorithms.check_params("aid_cg", {"v0": None})


# -- the HPO pipeline ---------------------------------------------------------------------
HPO_RIDGE = {"n_features": 10, "n_train": 40, "n_val": 30, "n_test": 30}


def _hpo(algorithm, backend, K, **pipeline_params):
    cell = Cell(study="test-warm-v", pipeline="hpo", problem="ridge", algorithm=algorithm,
                backend=backend, t=200, K=K, seed=0, dtype="float64",
                problem_params=json.dumps(HPO_RIDGE, sort_keys=True), algorithm_params="{}",
                pipeline_params=json.dumps(pipeline_params, sort_keys=True))
    row, _ = run_cell(cell)
    assert row["status"] == "ok", row["error_message"]
    return row, json.loads(row["extra"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hpo_warm_start_v(backend):
    """Plain gradient descent on λ (SGD, lr 2, 40 steps) converges to a fixed point.

    Cold starts with a small K converge to where the *biased* estimate vanishes, off the
    optimum; warm starts carry the adjoint across steps, so as λ settles v → v* and the
    run reaches the optimum that an exact adjoint (aid_exact) reaches. With a K large
    enough that every solve stops at its tolerance, warm starts need fewer HVPs in total.
    """
    common = dict(optimizer="sgd", outer_lr=2.0, outer_steps=40)
    ref, ref_extra = _hpo("aid_exact", backend, None, **common)
    for algo, small_K in (("aid_cg", 1), ("aid_fp", 2)):
        cold, _ = _hpo(algo, backend, small_K, **common)
        warm, warm_extra = _hpo(algo, backend, small_K, warm_start_v=True, **common)
        assert warm["val_loss"] <= cold["val_loss"] + 1e-6, algo
        # measured: cold ends 6e-7 (fp) to 1.5e-5 (cg) above the optimum, warm ≤ 1e-15;
        # 1e-10 relative in λ: SGD's remaining contraction after 40 steps is ≪ that.
        assert warm["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-12), algo
        assert warm_extra["lam_final"] == pytest.approx(ref_extra["lam_final"], rel=1e-10)
        assert cold["val_loss"] > ref["val_loss"] + 1e-7, "cold K too large to be biased"

        cold, cold_extra = _hpo(algo, backend, 1000, **common)
        warm, warm_extra = _hpo(algo, backend, 1000, warm_start_v=True, **common)
        # measured (jax): cg 440 → 231, fp 1466 → 507 HVPs
        assert warm["n_hvp_evals"] < 0.8 * cold["n_hvp_evals"], algo
        assert warm["val_loss"] == pytest.approx(cold["val_loss"], rel=1e-12)
        assert warm_extra["lam_final"] == pytest.approx(cold_extra["lam_final"], rel=1e-10)


def test_hpo_warm_start_v_bad_input():
    with pytest.raises(ValueError, match="warm_start_v must be true or false"):
        hpo.check_params({"warm_start_v": 1})
    hpo.check_warm_start_v(hpo.check_params({"warm_start_v": True}), "aid_fp")
    for algo, K in (("itd", None), ("aid_neumann", 3), ("t1t2", None)):
        cell = Cell(study="test-warm-v", pipeline="hpo", problem="ridge", algorithm=algo,
                    backend="torch", t=2, K=K, seed=0, dtype="float64",
                    problem_params=json.dumps(HPO_RIDGE), algorithm_params="{}",
                    pipeline_params=json.dumps({"warm_start_v": True, "outer_steps": 2}))
        row, _ = run_cell(cell)
        assert row["status"] == "error"
        assert f"{algo!r} has no adjoint warm start" in row["error_message"]
        assert "Valid choices: aid_cg, aid_fp" in row["error_message"]
