"""The ``fixed`` baseline: λ stays λ₀, w is trained as the estimators train it.

Both backends: the function returns a zero hypergradient of λ's shape and dtype, the w_t of
t steps of Φ (the first-order estimator's, bit for bit), and counts t inner gradients only.
In the hpo pipeline λ_final is λ₀ exactly (Adam, SGD, warm starts alike), the row's
``val_loss`` is the float64 oracle's F(λ₀) and ``outer_grad_norm_rel`` is 1. It is a
``baseline``, not an estimator: the hypergradient_error pipeline and the regression suite
never run it. A tiny study runs it beside itd, in-process and (marked ``ray``) through the
driver, and the tuned method beats it.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from hypersweep import algorithms, cli, problems
from hypersweep.orchestrator.cell import Cell, canonical_json, run_cell
from hypersweep.orchestrator.expand import expand
from hypersweep.orchestrator.spec import StudyError, load_study, parse_study
from hypersweep.pipelines.common import problem_for

BACKENDS = ("jax", "torch")
LOGREG = {"n_features": 5, "n_train": 40, "n_val": 30, "n_test": 20}
RIDGE = {"n_features": 10, "n_train": 40, "n_val": 30}
T = 30
F_RTOL = 1e-8  # the row's F(λ₀) is the oracle's own number: equal to rounding


def _problem(backend: str, name: str = "logreg", params=None, dtype: str = "float64"):
    return problems.make(name, backend=backend, seed=0, dtype=dtype, **(params or LOGREG))


def _np(x) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)


def _cell(backend: str, *, algorithm: str = "fixed", problem: str = "logreg", params=None,
          pipeline_params=None, t: int = T, K=None, seed: int = 0) -> Cell:
    return Cell(study="fixed-test", pipeline="hpo", problem=problem, algorithm=algorithm,
                backend=backend, t=t, K=K, seed=seed, dtype="float64",
                problem_params=canonical_json(params or LOGREG),
                pipeline_params=canonical_json(pipeline_params or {}))


# -- the catalog ----------------------------------------------------------------------------
def test_fixed_is_a_baseline_on_both_backends_run_by_hpo_only():
    spec = algorithms.spec("fixed")
    assert spec.kind == "baseline" and set(spec.impls) == set(BACKENDS)
    assert not spec.uses_K and not spec.requires and not spec.consistent
    assert "fixed" not in algorithms.names("estimator")  # no error study, no regression cell
    from hypersweep.pipelines.catalog import PIPELINES

    assert {name for name in ("hypergradient_error", "hpo", "blackbox")
            if "baseline" in PIPELINES.spec(name).algorithm_kinds} == {"hpo"}


def test_the_error_pipeline_refuses_it_at_validation():
    text = yaml.safe_dump(dict(study="x", pipeline="hypergradient_error", backend="jax",
                               problems=["ridge"], algorithms=["itd", "fixed"], t=[5],
                               output="out", mlflow={"enabled": False}))
    with pytest.raises(StudyError, match=r"algorithms\[1\].*'fixed' is of kind 'baseline'"):
        parse_study(text)


# -- the function ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_hypergradient_and_the_first_order_inner_solve(backend):
    problem = _problem(backend)
    lam = problem.initial_hyperparams() + 0.3
    out = algorithms.get("fixed", backend)(problem, lam, t=T)
    ref = algorithms.get("first_order", backend)(problem, lam, t=T)
    g = _np(out.hypergrad)
    assert g.shape == tuple(problem.lam_shape) and not np.any(g)
    assert str(out.hypergrad.dtype).endswith("float64")
    np.testing.assert_array_equal(_np(out.w_t), _np(ref.w_t))  # the same t steps of Φ
    assert (out.n_inner_grad_evals, out.n_hvp_evals, out.n_cross_evals,
            out.n_outer_grad_evals, out.n_oracle_calls) == (T, 0, 0, 0, T)
    assert out.solver_iters is None and out.n_samples_touched is None


def test_backends_agree_and_float32_stays_float32():
    w = {b: _np(algorithms.get("fixed", b)(p, p.initial_hyperparams(), t=T).w_t)
         for b, p in ((b, _problem(b)) for b in BACKENDS)}
    np.testing.assert_allclose(w["jax"], w["torch"], rtol=1e-12, atol=1e-14)
    for backend in BACKENDS:
        p32 = _problem(backend, dtype="float32")
        out = algorithms.get("fixed", backend)(p32, p32.initial_hyperparams(), t=T)
        assert str(out.hypergrad.dtype).endswith("float32")
        assert str(out.w_t.dtype).endswith("float32")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_budgets_are_refused_like_an_estimators(backend):
    problem = _problem(backend)
    with pytest.raises(ValueError, match="t must be an integer >= 1"):
        algorithms.get("fixed", backend)(problem, problem.initial_hyperparams(), t=0)
    with pytest.raises(ValueError, match="no adjoint warm start"):
        algorithms.get("fixed", backend)(problem, problem.initial_hyperparams(), t=2,
                                         v0=np.zeros(problem.w_shape))


# -- the hpo pipeline -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pipeline_params", [
    {"outer_steps": 6},
    {"outer_steps": 5, "optimizer": "sgd", "outer_lr": 10.0, "warm_start_w": True},
    {"outer_steps": 4, "lam0": 0.7, "eval_every": 3},
], ids=["adam", "sgd-warm", "lam0"])
def test_hpo_row_is_f_at_lam0_with_lambda_untouched(backend, pipeline_params):
    cell = _cell(backend, pipeline_params=pipeline_params)
    row, traces = run_cell(cell)
    assert row["status"] == "ok", row["error_message"]
    problem = problem_for(cell)
    lam0 = problem.initial_hyperparams() if "lam0" not in pipeline_params else \
        np.full(problem.lam_shape, pipeline_params["lam0"])
    extra = json.loads(row["extra"])
    assert extra["lam_final"] == lam0.reshape(-1).tolist()  # exactly, not approximately
    assert extra["outer_steps_done"] == pipeline_params["outer_steps"]
    assert {tr["lam_mean"] for tr in traces} == {float(np.mean(lam0))}
    assert row["val_loss"] == pytest.approx(problem.value(lam0), rel=F_RTOL)
    assert row["outer_grad_norm_rel"] == 1.0
    assert row["hypergrad_norm"] == 0.0
    steps = pipeline_params["outer_steps"]
    assert (row["n_inner_grad_evals"], row["n_oracle_calls"]) == (steps * T, steps * T)
    assert (row["n_hvp_evals"], row["n_cross_evals"], row["n_outer_grad_evals"]) == (0, 0, 0)
    # the test loss of w*(λ₀): what an untuned model scores
    w_star = problem.exact_inner_solution(lam0)
    assert row["test_loss"] == pytest.approx(problem.metrics(w_star, lam0)["test_loss"],
                                             rel=F_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_oracle_metrics_the_row_is_the_trained_iterate_at_lam0(backend):
    cell = _cell(backend, pipeline_params={"outer_steps": 3, "oracle_metrics": False})
    row, _ = run_cell(cell)
    assert row["status"] == "ok", row["error_message"]
    problem = problem_for(cell)
    lam0 = problem.initial_hyperparams()
    w_t = _np(algorithms.get("first_order", backend)(problem, lam0, t=T).w_t)
    assert row["val_loss"] == pytest.approx(problem.metrics(w_t, lam0)["val_loss"], rel=1e-12)
    assert "last iterate" in json.loads(row["extra"])["val_loss_is"]
    assert row["outer_grad_norm_rel"] is None  # nothing scored by the oracle


# -- a study with fixed beside a tuning method ----------------------------------------------
STUDY = dict(study="fixed-vs-itd", pipeline="hpo", backend=["jax", "torch"],
             problems=[{"name": "ridge", "params": RIDGE}], algorithms=["fixed", "itd"],
             t=[50], seeds=[0], pipeline_params={"outer_steps": 15, "outer_lr": 0.3},
             resources={"num_cpus": 1}, mlflow={"enabled": False})


def _check_fixed_vs_itd(rows: list[dict]) -> None:
    by = {(r["algorithm"], r["backend"]): r for r in rows}
    assert set(by) == {(a, b) for a in ("fixed", "itd") for b in BACKENDS}
    assert all(r["status"] == "ok" for r in rows), [r["error_message"] for r in rows]
    problem = problems.make("ridge", backend="jax", seed=0, dtype="float64", **RIDGE)
    lam0 = problem.initial_hyperparams()
    for backend in BACKENDS:
        fixed, itd = by[("fixed", backend)], by[("itd", backend)]
        assert fixed["val_loss"] == pytest.approx(problem.value(lam0), rel=F_RTOL)
        assert fixed["outer_grad_norm_rel"] == 1.0
        assert json.loads(fixed["extra"])["lam_final"] == lam0.reshape(-1).tolist()
        # what tuning bought: a lower F and a smaller gradient than at λ₀
        assert itd["val_loss"] < fixed["val_loss"]
        assert itd["outer_grad_norm_rel"] < 1.0
    fixed_losses = [by[("fixed", backend)]["val_loss"] for backend in BACKENDS]
    assert fixed_losses[0] == pytest.approx(fixed_losses[1], rel=1e-12)


def test_a_study_runs_fixed_beside_itd_in_process(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**STUDY, "output": str(tmp_path / "out")}))
    assert cli.main(["plan", str(path)]) == 0
    assert "fixed" in capsys.readouterr().out
    rows = [run_cell(cell)[0] for cell in expand(load_study(path))]
    _check_fixed_vs_itd(rows)


@pytest.mark.ray
def test_a_study_runs_fixed_beside_itd_on_ray(ray_session, tmp_path):
    from hypersweep.io.parquet import read_results
    from hypersweep.orchestrator import driver

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**STUDY, "output": str(tmp_path / "out")}))
    driver.run_study(load_study(path), quiet=True)
    _check_fixed_vs_itd(read_results(tmp_path / "out").to_pylist())
