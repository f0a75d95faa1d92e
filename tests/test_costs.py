"""Cost accounting: every algorithm's counts against their definition (docs/costs.md).

The definitions are written out here, independently of the code: for each hypergradient
algorithm in the catalog, (n_inner_grad_evals, n_hvp_evals, n_cross_evals,
n_outer_grad_evals) as a function of t, K, the solver iterations and the sizes; torch and
JAX must report identical counts. In torch the solvers' Hessian-vector and cross products
are also counted where they happen (the linearization's ``hvp``/``cross`` methods wrapped),
so the AID counts are checked against the work done, not only against the formula.
Online methods and the HPO / black-box pipelines' result and trace rows are covered too.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from hypersweep import algorithms, problems
from hypersweep.algorithms.common import cost_columns
from hypersweep.algorithms.online_common import step_counts
from hypersweep.orchestrator.cell import Cell, canonical_json, run_cell
from hypersweep.io.schema import COST_COLUMNS, RESULT_COLUMNS, TRACE_COLUMNS

BACKENDS = ("jax", "torch")
# logreg: per-feature λ (dim λ = 4), minibatch capability, dim w = 4
PARAMS = dict(n_train=30, n_val=20, n_test=10, n_features=4)
T, K = 7, 3


def _problem(backend, name="logreg", **params):
    return problems.make(name, backend=backend, seed=0, dtype="float64",
                         **(params or PARAMS))


def expected(name: str, *, t: int, K: int, iters, dim_lam: int, dim_w: int) -> tuple:
    """(inner, hvp, cross, outer) by definition; ``iters`` = the solver iterations."""
    table = {
        "itd": (t, t, t, 1),
        "itd_forward": (t, t * dim_lam, t * dim_lam, 1),
        "tbptt": (t, min(K, t), min(K, t), 1),
        "one_step": (t, 1, 1, 1),
        "first_order": (t, 0, 0, 1),
        "aid_cg": (t, iters, 1, 1),                 # from v0 = 0: one product per iteration
        "aid_fp": (t, max((iters or 0) - 1, 0), 1, 1),  # from v0 = 0, v₁ = rhs is free
        "aid_neumann": (t, iters, 1, 1),
        "aid_exact": (t, dim_w, 1, 1),              # dense Hessian: dim w products
        "stocbio": (t, K, 1, 1),
        "exact": (0, 0, 0, 0),                      # the float64 oracle, no backend work
    }
    return table[name]


HYPERGRADIENT = algorithms.names("estimator")


def test_every_hypergradient_algorithm_has_a_definition():
    for name in HYPERGRADIENT:
        expected(name, t=1, K=1, iters=1, dim_lam=1, dim_w=1)  # KeyError if missing


@pytest.mark.parametrize("name", HYPERGRADIENT)
def test_counts_follow_the_definition_and_backends_agree(name):
    counts = {}
    for backend in BACKENDS:
        problem = _problem(backend)
        params = {"batch_size": 8} if name == "stocbio" else {}
        res = algorithms.get(name, backend)(problem, problem.initial_hyperparams(), t=T, K=K,
                                            seed=0, **params)
        got = (res.n_inner_grad_evals, res.n_hvp_evals, res.n_cross_evals,
               res.n_outer_grad_evals)
        want = expected(name, t=T, K=K, iters=res.solver_iters,
                        dim_lam=int(np.prod(problem.lam_shape)),
                        dim_w=int(np.prod(problem.w_shape)))
        assert got == want, f"{name} [{backend}]: {got} != definition {want}"
        assert res.n_oracle_calls == sum(want)
        if res.solver_iters is not None:
            assert 0 <= res.solver_iters <= K
        costs = res.costs()
        assert set(costs) == set(COST_COLUMNS)
        assert costs["n_oracle_calls"] == sum(want)
        if name == "stocbio":
            b = 8
            assert res.n_samples_touched == T * b + K * b + b + b
        else:
            assert res.n_samples_touched is None
        counts[backend] = (got, res.solver_iters, res.n_samples_touched, sorted(res.extras))
    # the same counts and the same extras keys in both backends
    assert counts["jax"] == counts["torch"], f"{name}: {counts}"


def test_itd_and_aid_no_longer_coincide_in_oracle_calls():
    """At equal t, ITD's reverse pass costs t Hessian-vector and t cross products that
    AID-CG does not pay (it pays its CG iterations)."""
    problem = _problem("jax")
    lam = problem.initial_hyperparams()
    itd = algorithms.get("itd", "jax")(problem, lam, t=200)
    cg = algorithms.get("aid_cg", "jax")(problem, lam, t=200, K=10)
    assert itd.n_oracle_calls == 200 + 200 + 200 + 1
    assert cg.n_oracle_calls == 200 + cg.solver_iters + 1 + 1
    assert itd.n_oracle_calls > 2.5 * cg.n_oracle_calls


@pytest.mark.parametrize("name", ["aid_cg", "aid_fp", "aid_neumann", "aid_exact"])
def test_torch_aid_counts_equal_the_products_computed(name, monkeypatch):
    """Count the Hessian-vector and cross products where they happen."""
    from hypersweep.algorithms.torch import _core

    done = {"hvp": 0, "cross": 0, "dense": 0}
    hvp, cross, dense = _core.Linearization.hvp, _core.Linearization.cross, \
        _core.Linearization.dense_hessian

    def counting(kind, fn):
        def wrapped(self, *args, **kwargs):
            done[kind] += 1
            return fn(self, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(_core.Linearization, "hvp", counting("hvp", hvp))
    monkeypatch.setattr(_core.Linearization, "cross", counting("cross", cross))
    monkeypatch.setattr(_core.Linearization, "dense_hessian", counting("dense", dense))
    problem = _problem("torch")
    res = algorithms.get(name, "torch")(problem, problem.initial_hyperparams(), t=T, K=6)
    computed_hvp = done["hvp"] + done["dense"] * int(np.prod(problem.w_shape))
    matvecs = res.extras.get("matvecs_computed")
    assert res.n_cross_evals == done["cross"] == 1
    # the solvers may compute one product they then discard (a converged last step)
    assert res.n_hvp_evals == computed_hvp or (matvecs is not None
                                               and computed_hvp == matvecs), (
        res.n_hvp_evals, done, matvecs)


def test_warm_start_counts_the_extra_product_in_both_backends():
    counts = {}
    for backend in BACKENDS:
        problem = _problem(backend)
        lam = problem.initial_hyperparams()
        cold = algorithms.get("aid_cg", backend)(problem, lam, t=T, K=2)
        warm = algorithms.get("aid_cg", backend)(problem, lam, t=T, K=2,
                                                  v0=problem.ops.to_numpy(cold.extras["v"]))
        assert warm.n_hvp_evals == warm.solver_iters + 1  # + the r₀ = rhs − ηH v₀ product
        counts[backend] = (cold.n_hvp_evals, warm.n_hvp_evals, warm.solver_iters)
    assert counts["jax"] == counts["torch"]


@pytest.mark.parametrize("method", algorithms.names("online"))
def test_online_step_counts_by_definition_and_backends_agree(method):
    definition = {"hyperdistill": lambda t, n: (t, n, 1 + n, 1),
                  "t1t2": lambda t, n: (t, 0, 2, 1),
                  "greedy": lambda t, n: (t, 0, t, t + 1)}[method]
    seen = {}
    for backend in BACKENDS:
        problem = _problem(backend, "quadratic", dim_inner=6, dim_outer=2)
        online = algorithms.get(method, backend)
        state = online.init(problem, problem.initial_hyperparams(), seed=0)
        infos = []
        for _ in range(3):  # hyperdistill refits θ at update 0 (theta_every = 10)
            state, info = online.step(problem, state, t=4, K=2)
            infos.append(info)
        got = [(i.n_inner_grad_evals, i.n_hvp_evals, i.n_cross_evals, i.n_outer_grad_evals)
               for i in infos]
        n_drmad = [min(4, 2), 0, 0] if method == "hyperdistill" else [0, 0, 0]
        assert got == [definition(4, n) for n in n_drmad], (method, backend, got)
        assert all(i.costs()["n_oracle_calls"] == sum(g) for i, g in zip(infos, got))
        seen[backend] = (got, [sorted(i.extras) for i in infos])
    assert seen["jax"] == seen["torch"]  # counts and extras keys
    assert step_counts(method, t=4, n_drmad=2)["n_inner_grad_evals"] == 4


def _cell(pipeline, algorithm, backend, *, t, K=None, pipeline_params=None):
    return Cell(study="costs", pipeline=pipeline, problem="logreg", algorithm=algorithm,
                backend=backend, t=t, K=K, seed=0, dtype="float64",
                problem_params=canonical_json(PARAMS),
                pipeline_params=canonical_json(pipeline_params or {}))


def test_schemas_carry_the_cost_columns():
    for column in COST_COLUMNS + ("K_setting",):
        assert column in RESULT_COLUMNS
    for column in COST_COLUMNS:
        assert column in TRACE_COLUMNS


@pytest.mark.parametrize("backend", BACKENDS)
def test_result_and_trace_rows_carry_the_counts(backend):
    """hypergradient_error, hpo (traces cumulative, the row = the last trace) and blackbox."""
    row, _ = run_cell(_cell("hypergradient_error", "itd", backend, t=9))
    assert row["status"] == "ok", row["error_message"]
    assert (row["n_inner_grad_evals"], row["n_hvp_evals"], row["n_cross_evals"],
            row["n_outer_grad_evals"], row["n_oracle_calls"]) == (9, 9, 9, 1, 28)

    steps = 5
    row, traces = run_cell(_cell("hpo", "aid_cg", backend, t=6, K=4,
                                 pipeline_params={"outer_steps": steps, "eval_every": 1}))
    assert row["status"] == "ok", row["error_message"]
    assert len(traces) == steps
    iters = [json.loads(tr["extra"])["solver_iters"] for tr in traces]
    cumulative = np.cumsum([cost_columns(6, i, 1, 1)["n_oracle_calls"] for i in iters])
    assert [tr["n_oracle_calls"] for tr in traces] == cumulative.tolist()
    for tr in traces:
        assert tr["n_oracle_calls"] == (tr["n_inner_grad_evals"] + tr["n_hvp_evals"]
                                        + tr["n_cross_evals"] + tr["n_outer_grad_evals"])
    assert row["n_oracle_calls"] == traces[-1]["n_oracle_calls"]
    assert row["n_hvp_evals"] == sum(iters) and row["n_cross_evals"] == steps

    row, traces = run_cell(_cell("blackbox", "random", backend, t=5,
                                 pipeline_params={"num_samples": 3}))
    assert row["status"] == "ok", row["error_message"]
    assert row["n_oracle_calls"] == row["n_inner_grad_evals"] == 15
    assert [tr["n_oracle_calls"] for tr in traces] == [5, 10, 15]


def test_compile_time_is_the_compile_paid_and_zero_when_reused():
    """The first JAX cell of a shape compiles (compile_time_s > 0, extra.compiled); the
    next seed of the same shapes reuses the compiled function: 0 and compiled = false.
    torch compiles nothing."""
    shapes = canonical_json(dict(PARAMS, n_features=3, n_train=17))  # seen by no other test

    def cell(backend, seed):
        return Cell(study="costs", pipeline="hypergradient_error", problem="logreg",
                    algorithm="aid_fp", backend=backend, t=11, K=5, seed=seed,
                    problem_params=shapes)

    first, _ = run_cell(cell("jax", 101))
    again, _ = run_cell(cell("jax", 102))
    torch_row, _ = run_cell(cell("torch", 101))
    extra = [json.loads(r["extra"]) for r in (first, again, torch_row)]
    assert first["compile_time_s"] > 0 and extra[0]["compiled"] is True
    assert again["compile_time_s"] == 0 and extra[1]["compiled"] is False
    assert torch_row["compile_time_s"] == 0 and extra[2]["compiled"] is False
    assert first["hypergrad_rel_error"] != again["hypergrad_rel_error"]  # other data


def test_first_order_zero_hypergradient_is_flagged():
    """quadratic's L_out has no direct λ term: first_order returns exactly 0."""
    cell = Cell(study="costs", pipeline="hypergradient_error", problem="quadratic",
                algorithm="first_order", backend="jax", t=5, K=None, seed=0,
                problem_params=canonical_json({"dim_inner": 6, "dim_outer": 2}))
    row, _ = run_cell(cell)
    assert row["status"] == "ok"
    assert row["hypergrad_norm"] == 0.0
    assert json.loads(row["extra"])["zero_hypergradient"] is True
    # hyper_rep's L_out depends on λ directly (the shared representation): no flag
    cell = Cell(study="costs", pipeline="hypergradient_error", problem="hyper_rep",
                algorithm="first_order", backend="jax", t=5, K=None, seed=0,
                problem_params=canonical_json({"n_tasks": 3, "n_features": 4, "n_hidden": 2,
                                               "n_train": 8, "n_val": 8}))
    row, _ = run_cell(cell)
    assert row["status"] == "ok" and row["hypergrad_norm"] > 0
    assert "zero_hypergradient" not in json.loads(row["extra"])


def test_results_are_immutable():
    """A result's counts cannot be edited after the fact (Hypergrad is frozen)."""
    import dataclasses

    from hypersweep.algorithms.common import Hypergrad

    res = Hypergrad(hypergrad=np.zeros(2), w_t=np.zeros(3), n_inner_grad_evals=1,
                    n_hvp_evals=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.n_hvp_evals = 5
