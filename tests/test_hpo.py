"""The HPO pipeline (``pipeline: hpo``): outer loop, traces, warm starts, the exact oracle.

References are independent of the pipeline: the grid optimum of the exact value function
F(λ) = ``problem.value`` (closed form), and a hand-written numpy Adam on the closed-form
∇F (the ridge tutorial's "gradient descent on the value function").
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from hypersweep import algorithms, problems
from hypersweep.orchestrator.cell import Cell, run_cell
from hypersweep.pipelines import hpo

RIDGE = {"n_features": 10, "n_train": 40, "n_val": 30, "n_test": 30}


def _cell(algorithm, *, backend="jax", t=10, K=None, problem="ridge", problem_params=None,
          algorithm_params=None, **pipeline_params) -> Cell:
    return Cell(study="test-hpo", pipeline="hpo", problem=problem, algorithm=algorithm,
                backend=backend, t=t, K=K, seed=0, dtype="float64",
                problem_params=json.dumps(problem_params if problem_params is not None
                                          else RIDGE, sort_keys=True),
                algorithm_params=json.dumps(algorithm_params or {}, sort_keys=True),
                pipeline_params=json.dumps(pipeline_params, sort_keys=True))


def _run(cell):
    row, traces = run_cell(cell)
    assert row["status"] == "ok", (row["error_message"], row["extra"])
    return row, traces, json.loads(row["extra"])


def _grid_optimum(problem):
    hs = np.log(np.logspace(-4, 2, 100))
    values = [problem.value(np.array([h])) for h in hs]
    i = int(np.argmin(values))
    return hs[i], values[i]


def _adam_reference(grad_fn, lam0, steps, lr=0.1):
    """numpy Adam (β = 0.9, 0.999, ε = 1e-8), the tutorial's torch.optim.Adam equations."""
    lam, m, v = np.array(lam0, dtype=float), 0.0, 0.0
    for k in range(1, steps + 1):
        g = grad_fn(lam)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        lam = lam - lr * (m / (1 - 0.9 ** k)) / (np.sqrt(v / (1 - 0.999 ** k)) + 1e-8)
    return lam


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_aid_cg_reaches_grid_optimum_and_traces_are_consistent(backend):
    steps, t, K = 60, 200, 40
    problem = problems.make("ridge", backend=backend, seed=0, dtype="float64", **RIDGE)
    _, grid_best = _grid_optimum(problem)
    row, traces, extra = _run(_cell("aid_cg", backend=backend, t=t, K=K, outer_steps=steps))
    # 1%: the grid spacing is 6/99 decades, so the grid optimum itself is within a
    # fraction of a percent of min F; gradient descent must do at least as well.
    assert row["val_loss"] <= 1.01 * grid_best
    lam_final = np.array(extra["lam_final"])
    # the result's val_loss is the exact value function at the final λ
    assert row["val_loss"] == pytest.approx(problem.value(lam_final), rel=1e-12)
    w_star = problem.exact_inner_solution(lam_final)
    r = problem.arrays_np["X_test"] @ w_star - problem.arrays_np["y_test"]
    assert row["test_loss"] == pytest.approx(np.mean(r * r), rel=1e-12)
    assert row["n_inner_grad_evals"] == steps * t
    assert extra["outer_steps_done"] == steps and extra["stop_reason"] == "outer_steps"

    assert [tr["step"] for tr in traces] == list(range(steps))
    wall = [tr["wall_time_s"] for tr in traces]
    assert all(b > a for a, b in zip(wall, wall[1:]))
    assert wall[-1] == pytest.approx(row["wall_time_s"])
    inner = [tr["n_inner_grad_evals"] for tr in traces]
    assert inner == [t * (k + 1) for k in range(steps)]
    hvp = [tr["n_hvp_evals"] for tr in traces]
    assert all(b > a for a, b in zip(hvp, hvp[1:])) and hvp[-1] == row["n_hvp_evals"]
    vals = [tr["val_loss"] for tr in traces]
    best = [tr["best_val_loss"] for tr in traces]
    np.testing.assert_allclose(best, np.minimum.accumulate(vals), rtol=0, atol=0)
    assert all(b <= a for a, b in zip(best, best[1:]))
    # t = 200 inner steps from 0 at a contraction: L_out(w_t) ≈ F(λ_k) (extra "value")
    for tr in traces[:: steps // 6]:
        ex = json.loads(tr["extra"])
        assert tr["val_loss"] == pytest.approx(ex["value"], rel=1e-6)
        assert tr["lam_min"] == tr["lam_mean"] == tr["lam_max"]
    assert traces[0]["lam_mean"] == 0.0  # λ₀, before the first update


def test_exact_matches_oracle_and_tutorial_adam():
    """``exact`` is the oracle as a backend array; the pipeline with it reproduces a numpy
    Adam loop on the closed-form ∇F (the tutorial's method 1) to rounding."""
    for backend in ("jax", "torch"):
        p = problems.make("ridge", backend=backend, seed=0, dtype="float64", **RIDGE)
        lam = np.array([0.3])
        hg = algorithms.get("exact", backend)(p, lam, t=1)
        np.testing.assert_array_equal(p.ops.to_numpy(hg.hypergrad),
                                      p.exact_hypergradient(lam))
        # independent check of the oracle: AID with an exact solve at a converged w_t
        ref = algorithms.get("aid_exact", backend)(p, lam, t=2000)
        np.testing.assert_allclose(p.ops.to_numpy(hg.hypergrad),
                                   p.ops.to_numpy(ref.hypergrad), rtol=1e-9)
    p = problems.make("ridge", backend="jax", seed=0, dtype="float64", **RIDGE)
    ref_lam = _adam_reference(p.exact_hypergradient, [0.0], 50)
    row, traces, extra = _run(_cell("exact", backend="torch", t=1, outer_steps=50))
    np.testing.assert_allclose(extra["lam_final"], ref_lam, rtol=1e-12)
    assert row["n_inner_grad_evals"] == 0 and len(traces) == 50


def test_warm_start_w():
    """t large: warm starts change nothing but rounding (both w_t ≈ w*); t small: warm
    starts change the run, and w_t tracks w*(λ) far better than t = 3 steps from zero
    (λ moves slowly, so the previous w_t is a good start)."""
    common = dict(backend="jax", outer_steps=40)
    lam = {}
    for warm in (False, True):
        _, _, extra = _run(_cell("aid_cg", t=300, K=40, warm_start_w=warm, **common))
        lam[warm] = extra["lam_final"][0]
    # 1e-8: with t = 300 the inner error q^t is ~1e-12 either way.
    assert lam[True] == pytest.approx(lam[False], rel=1e-8, abs=1e-10)

    rows = {warm: _run(_cell("itd", t=3, warm_start_w=warm, **common))[0]
            for warm in (False, True)}
    lam_cold = json.loads(rows[False]["extra"])["lam_final"][0]
    lam_warm = json.loads(rows[True]["extra"])["lam_final"][0]
    assert abs(lam_warm - lam_cold) > 1e-3
    # ‖w_t − w*(λ)‖ at the last step: 3 steps from 0 leave most of w* unreached
    assert rows[True]["inner_suboptimality"] < 0.1 * rows[False]["inner_suboptimality"]


def test_online_method_in_pipeline_equals_one_step_warm_started():
    """T1-T2 (t = 1) is the one-step hypergradient with warm-started w: the HPO pipeline
    running ``one_step`` with ``warm_start_w`` must follow the same λ trajectory."""
    common = dict(backend="jax", t=1, outer_steps=30)
    _, tr_online, ex_online = _run(_cell("t1t2", **common))
    _, tr_one, ex_one = _run(_cell("one_step", warm_start_w=True, **common))
    # 1e-7: the finite difference is exact for ridge up to cancellation (~1e-12 relative);
    # Adam's normalization keeps those errors at that level over 30 steps.
    np.testing.assert_allclose([tr["lam_mean"] for tr in tr_online],
                               [tr["lam_mean"] for tr in tr_one], rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(ex_online["lam_final"], ex_one["lam_final"], rtol=1e-7)
    assert tr_online[-1]["n_inner_grad_evals"] == 30


@pytest.mark.parametrize("algorithm,t,K", [("hyperdistill", 2, 5), ("greedy", 5, None)])
def test_online_methods_run_in_pipeline(algorithm, t, K):
    row, traces, extra = _run(_cell(algorithm, t=t, K=K, backend="torch", outer_steps=20,
                                    eval_every=7, problem="quadratic", problem_params={}))
    assert [tr["step"] for tr in traces] == [0, 7, 14, 19]
    assert traces[-1]["n_inner_grad_evals"] == row["n_inner_grad_evals"] == 20 * t
    assert np.isfinite(row["val_loss"]) and len(extra["lam_final"]) == 5


def test_time_budget_and_divergence():
    _, traces, extra = _run(_cell("itd", t=5, outer_steps=10_000, time_budget_s=0.3))
    assert extra["stop_reason"] == "time_budget" and len(traces) < 10_000
    row, _ = run_cell(_cell("first_order", t=5, optimizer="sgd", outer_lr=1e6,
                            outer_steps=100, lam0=1.0, problem="quadratic",
                            problem_params={"rho": 1.0}))
    # λ ← (1 − 10⁶ ρ) λ overflows to inf after ~52 steps: a "diverged" row, not a crash
    assert row["status"] == "diverged", row["error_message"]
    assert json.loads(row["extra"])["stop_reason"] == "diverged"


def test_bad_pipeline_params_raise():
    with pytest.raises(ValueError, match="Valid choices: outer_steps"):
        hpo.check_params({"outer_step": 3})
    with pytest.raises(ValueError, match="optimizer"):
        hpo.check_params({"optimizer": "lbfgs"})
    with pytest.raises(ValueError, match="warm_start_v"):
        hpo.check_params({"warm_start_v": "yes"})
    # warm_start_v: true itself is valid; the algorithm check is in tests/test_warm_start.py
    assert hpo.check_params({"warm_start_v": True})["warm_start_v"] is True
    with pytest.raises(ValueError, match="outer_lr"):
        hpo.check_params({"outer_lr": -1})
    row, _ = run_cell(_cell("itd", outer_steps=0))
    assert row["status"] == "error" and "outer_steps" in row["error_message"]
    row, _ = run_cell(_cell("aid_cg", K=None))
    assert row["status"] == "error" and "K must be" in row["error_message"]


def test_tutorial_table():
    rows = [
        dict(algorithm="itd", backend="torch", t=10, status="ok", val_loss=0.5,
             wall_time_s=1.0, extra=json.dumps({"lam_final_mean": 0.0})),
        dict(algorithm="grid", backend="jax", t=10000, status="ok", val_loss=0.4,
             wall_time_s=2.0, extra=json.dumps({"best_lam_mean": np.log(2.0)})),
        dict(algorithm="aid_cg", backend="jax", t=5, status="error", val_loss=None,
             wall_time_s=None, extra=None),
    ]
    text = hpo.tutorial_table(rows, file=None)
    lines = text.strip().splitlines()
    assert len(lines) == 4  # header, rule, two ok rows
    assert lines[2].split()[:2] == ["grid", "jax"] and "2.0000" in lines[2]
    assert lines[3].split()[0] == "itd" and "1.0000" in lines[3]


def test_with_w_init_is_a_shallow_copy():
    p = problems.make("ridge", backend="torch", seed=0, dtype="float64", **RIDGE)
    w = p.ops.asarray(np.ones(RIDGE["n_features"]), "float64")
    q = p.with_w_init(w)
    assert q.w_init is w and float(p.w_init.abs().sum()) == 0.0
    assert q.arrays is p.arrays and q.fns is p.fns
    # the start point matters to an estimator, the oracle does not see it
    one = algorithms.get("itd", "torch")
    assert not np.allclose(p.ops.to_numpy(one(p, [0.0], t=2).w_t),
                           p.ops.to_numpy(one(q, [0.0], t=2).w_t))


@pytest.mark.parametrize("algorithm, K", [("aid_cg", 5), ("soba", None)])
def test_best_lambda_is_tracked_beside_the_final_one(algorithm, K):
    """The row keeps where the run was best — the evaluated step of the lowest val loss and
    its λ — beside the final λ (Adam lr 3 for aid_cg: λ overshoots and oscillates, so the
    best step is not the last; a solver's chunks are evaluated at their ends)."""
    cell = _cell(algorithm, K=K, outer_steps=30, outer_lr=3.0, eval_every=1)
    row, traces, extra = _run(cell)
    rows = [t for t in traces if t["step"] > 0 or algorithm != "soba"]
    best = min(rows, key=lambda t: t["val_loss"])
    assert extra["best_step"] == best["step"]
    recorded = row["best_val_loss"] if row.get("best_val_loss") is not None else \
        extra["best_val_loss"]
    assert recorded == pytest.approx(best["val_loss"], rel=1e-15)
    assert extra["best_lam_mean"] == pytest.approx(best["lam_mean"], rel=1e-15)
    assert len(extra["best_lam"]) == 1 and extra["best_lam"][0] == pytest.approx(
        best["lam_mean"], rel=1e-15)
    assert "lam_final_mean" in extra
