"""Black-box baselines: Ray Tune searchers driven in-process, one cell at a time.

Rows are built with ``run_cell`` (no Ray) on ridge in float64 with the torch backend
(no compile: fast); one test checks the JAX backend gives the same trials.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hypersweep import algorithms, problems
from hypersweep.algorithms import searchers, trials
from hypersweep.orchestrator.cell import Cell, run_cell

SEARCHERS = algorithms.names("searcher")
T = 200  # inner steps: at the optimum q ≈ 0.54, so w_t = w* to machine precision

# Relative gap allowed between the best val loss found with 40 trials in [-3, 3] and
# min F over a 1201-point grid of the same box (F(h) ≈ F* (1 + 0.22 (h − h*)²) here):
# grid: 40 points, spacing 0.154 → gap ≤ 0.22·0.077² ≈ 0.13 %  → 0.5 %;
# random / asha: a point within 0.3 of h* has probability 1 − (1 − 0.6/6)^40 ≈ 98.5 %
#   → 2 % (0.22·0.3²); asha sees fewer full-budget trials, same bound;
# tpe / hyperopt: model-based, concentrate near h* after 10 random points → 0.5 %.
# (one limit per catalog searcher: a new searcher needs its own, argued like these)
GAP_TOL = {"grid": 5e-3, "random": 2e-2, "asha": 2e-2, "tpe": 5e-3, "hyperopt": 5e-3}


def make_cell(algorithm, *, backend="torch", t=T, seed=0, problem="ridge",
              problem_params=None, algorithm_params=None, **pipeline_params):
    pipeline_params.setdefault("num_samples", 40)
    pipeline_params.setdefault("space", {"low": -3, "high": 3})
    return Cell(study="bb", pipeline="blackbox", problem=problem, algorithm=algorithm,
                backend=backend, t=t, K=None, seed=seed,
                problem_params=json.dumps(problem_params or {}, sort_keys=True),
                algorithm_params=json.dumps(algorithm_params or {}, sort_keys=True),
                pipeline_params=json.dumps(pipeline_params, sort_keys=True))


@pytest.fixture(scope="module")
def ridge_optimum():
    problem = problems.make("ridge", backend="torch", seed=0, dtype="float64")
    grid = np.linspace(-3.0, 3.0, 1201)
    values = np.array([problem.value(np.array([h])) for h in grid])
    return float(values.min())


@pytest.fixture(scope="module")
def ridge_runs():
    return {name: run_cell(make_cell(name)) for name in SEARCHERS}


def test_searchers_are_registered_for_both_backends():
    assert SEARCHERS == ["grid", "random", "tpe", "hyperopt", "asha"]
    assert set(GAP_TOL) == set(SEARCHERS)
    for name in SEARCHERS:
        assert algorithms.spec(name).kind == "searcher"
        assert algorithms.get(name, "jax") is algorithms.get(name, "torch")
        factory = algorithms.get(name, "torch")
        assert factory.__module__ == searchers.__name__
        assert factory is getattr(searchers, factory.__name__)


@pytest.mark.parametrize("name", SEARCHERS)
def test_search_on_ridge_finds_the_grid_optimum(name, ridge_runs, ridge_optimum):
    row, traces = ridge_runs[name]
    assert row["status"] == "ok", row["error_message"]
    extra = json.loads(row["extra"])
    assert len(traces) == 40 == extra["n_trials"]
    assert [tr["step"] for tr in traces] == list(range(40))
    best = [tr["best_val_loss"] for tr in traces]
    assert all(b2 <= b1 for b1, b2 in zip(best, best[1:]))
    assert best[-1] == min(tr["val_loss"] for tr in traces) == row["val_loss"]
    # cumulative clocks and counts
    walls = [tr["wall_time_s"] for tr in traces]
    evals = [tr["n_inner_grad_evals"] for tr in traces]
    assert all(b >= a for a, b in zip(walls, walls[1:]))
    assert all(b >= a for a, b in zip(evals, evals[1:]))
    assert row["n_inner_grad_evals"] == evals[-1]
    if name == "asha":
        steps = [json.loads(tr["extra"])["inner_steps"] for tr in traces]
        assert min(steps) < T and max(steps) == T  # some stopped at a rung, some finished
        assert row["n_inner_grad_evals"] == sum(steps) < 40 * T
    else:
        assert row["n_inner_grad_evals"] == 40 * T
    # the best λ's val loss sits within the stated gap above the exact optimum, never below
    # it by more than rounding (w_t = w* here)
    gap = (row["val_loss"] - ridge_optimum) / ridge_optimum
    assert -1e-9 <= gap <= GAP_TOL[name], gap
    assert -3.0 <= extra["best_lam"][0] <= 3.0
    assert extra["best_lam_mean"] == extra["best_lam"][0]


@pytest.mark.parametrize("name", ["random", "tpe", "hyperopt", "asha"])
def test_seeded_searchers_are_deterministic(name, ridge_runs):
    row, traces = ridge_runs[name]
    again_row, again = run_cell(make_cell(name))
    key = lambda trs: [(tr["lam_mean"], tr["val_loss"], tr["n_inner_grad_evals"]) for tr in trs]
    assert key(again) == key(traces)
    assert again_row["val_loss"] == row["val_loss"]
    _, other_seed = run_cell(make_cell(name, seed=1))
    assert [tr["lam_mean"] for tr in other_seed] != [tr["lam_mean"] for tr in traces]


def test_jax_backend_runs_the_same_trials():
    torch_row, torch_traces = run_cell(make_cell("random", t=50, num_samples=6))
    jax_row, jax_traces = run_cell(make_cell("random", backend="jax", t=50, num_samples=6))
    assert jax_row["status"] == "ok", jax_row["error_message"]
    assert [tr["lam_mean"] for tr in jax_traces] == [tr["lam_mean"] for tr in torch_traces]
    # float64 both; 50 identical GD steps in a different summation order: 1e-12 relative
    np.testing.assert_allclose([tr["val_loss"] for tr in jax_traces],
                               [tr["val_loss"] for tr in torch_traces], rtol=1e-12)


def test_per_feature_lambda_searches_a_d_dimensional_box():
    params = {"per_feature": True, "n_features": 4}
    problem = problems.make("ridge", backend="torch", seed=0, dtype="float64", **params)
    space = searchers.search_space(problem, {"low": [-3, -2, -1, 0], "high": 3})
    assert space.dim == 4 and space.low == (-3.0, -2.0, -1.0, 0.0)
    for name in ("random", "tpe"):
        row, traces = run_cell(make_cell(name, t=50, num_samples=12, problem_params=params,
                                         space={"low": -3, "high": 3}))
        assert row["status"] == "ok", row["error_message"]
        extra = json.loads(row["extra"])
        assert len(extra["best_lam"]) == 4
        assert len(traces) == 12
        # each trial's λ is 4 different draws: min < mean < max
        assert all(tr["lam_min"] < tr["lam_mean"] < tr["lam_max"] for tr in traces)
    row, _ = run_cell(make_cell("grid", t=50, problem_params=params))
    assert row["status"] == "error"
    assert "grid search needs a λ of at most 3 coordinates" in row["error_message"]


def test_a_tied_box_searches_one_number_for_every_coordinate():
    """``tied: true``: one shared value for a λ of many coordinates (here 40 per-feature
    penalties): every trial's λ is constant, the grid searcher works (1 dimension), and the
    row's best λ is that value everywhere."""
    params = {"n_features": 40, "n_train": 120, "n_val": 60, "n_test": 30}
    problem = problems.make("logreg", backend="jax", seed=0, dtype="float64", **params)
    space = searchers.search_space(problem, {"low": -5, "high": 1, "tied": True})
    assert space.dim == 1 and space.names == ("lam",) and space.shape == (40,)
    np.testing.assert_array_equal(space.to_lam({"lam": -1.5}), np.full(40, -1.5))
    np.testing.assert_array_equal(space.center(), np.full(40, -2.0))
    with pytest.raises(ValueError, match="low, high"):
        searchers.search_space(problem, {"low": -5, "high": 1, "tide": True})
    for name in ("random", "tpe", "grid"):
        row, traces = run_cell(make_cell(name, t=30, num_samples=6, problem="logreg",
                                         problem_params=params,
                                         space={"low": -5, "high": 1, "tied": True}))
        assert row["status"] == "ok", row["error_message"]
        best = json.loads(row["extra"])["best_lam"]
        assert len(best) == 40 and len(set(best)) == 1 and -5 <= best[0] <= 1
        assert traces and all(tr["lam_min"] == tr["lam_mean"] == tr["lam_max"]
                              for tr in traces)
        # every trial's test metrics at its iterate (the report's test curves)
        assert all(tr["test_loss"] > 0 and 0 <= tr["test_accuracy"] <= 1 for tr in traces)


def test_oracle_metrics_false_leaves_the_gradient_norms_empty():
    rows = {}
    for flag in (True, False):
        row, traces = run_cell(make_cell("random", t=30, num_samples=5,
                                         oracle_metrics=flag))
        assert row["status"] == "ok", row["error_message"]
        rows[flag] = row
        assert all((tr["outer_grad_norm"] is not None) == flag for tr in traces)
    assert rows[True]["outer_grad_norm"] > 0 and rows[False]["outer_grad_norm"] is None
    assert rows[False]["val_loss"] == rows[True]["val_loss"]  # same seeded trials


def _hostile_trainable(lam, *, report_every=None, t=12):
    """NaN, +inf and −inf in three bands of h, a parabola with minimum at h = 1.5 elsewhere."""
    h = float(np.asarray(lam).reshape(-1)[0])
    value = (math.nan if h < -2 else math.inf if h < -1 else -math.inf if h < 0
             else (h - 1.5) ** 2)
    every = report_every or t
    done = 0
    while done < t:
        step = min(every, t - done)
        done += step
        yield trials.Report(done, step, value, None, final=done >= t)


@pytest.mark.parametrize("name", SEARCHERS)
def test_nan_and_inf_objectives_never_reach_a_searcher(name):
    problem = problems.make("ridge", backend="torch", seed=0, dtype="float64")
    space = searchers.search_space(problem, {"low": -3, "high": 3})
    search = algorithms.get(name, "torch")(space, num_samples=30, seed=0, max_t=12,
                                          **({"grace_period": 1} if name == "asha" else {}))
    records, reason = trials.run_search(search, _hostile_trainable, num_samples=30)
    assert reason == "num_samples" and len(records) == 30
    kinds = {("nan" if math.isnan(r.val_loss) else "inf" if r.val_loss > 0 else "-inf")
             for r in records if r.nonfinite}
    assert kinds == {"nan", "inf", "-inf"}, kinds  # half the box is hostile
    for r in records:
        h = float(r.lam.reshape(-1)[0])
        assert r.nonfinite == (h < 0)
        assert r.objective == (trials.OBJECTIVE_CAP if h < 0 else (h - 1.5) ** 2)
        if r.nonfinite:
            assert r.steps == (1 if name == "asha" else 12)  # stopped at the first report
    best = min(r.val_loss for r in records if not r.nonfinite)
    assert best < 0.5  # the searchers still found the finite basin


@pytest.mark.parametrize("name", SEARCHERS)
def test_diverging_inner_loop_gives_a_diverged_row_not_a_crash(name):
    # η = 50 on ridge: |1 − ηL| ≫ 1, w_t overflows to inf/NaN within t = 200 steps
    # (cap_inner_lr off: by default trials use min(η, 1/L(λ)), which would stabilize it)
    row, traces = run_cell(make_cell(name, num_samples=5, problem_params={"inner_lr": 50.0},
                                     cap_inner_lr=False))
    assert row["status"] == "diverged", (row["status"], row["error_message"])
    assert len(traces) == 5
    assert all(json.loads(tr["extra"])["nonfinite"] for tr in traces)
    assert all(tr["best_val_loss"] is None or math.isnan(tr["best_val_loss"])
               for tr in traces)
    assert json.loads(row["extra"])["n_nonfinite"] == 5


def test_time_budget_stops_new_trials():
    problem = problems.make("ridge", backend="torch", seed=0, dtype="float64")
    space = searchers.search_space(problem, None)
    assert (space.low, space.high) == ((-6.0,), (3.0,))  # the ridge default
    assert problems.spec("ridge").search_box == (-6.0, 3.0)
    ticks = iter(range(10_000))
    search = searchers.random_search(space, num_samples=50, seed=0, max_t=12)
    records, reason = trials.run_search(search, _hostile_trainable, num_samples=50,
                                        time_budget_s=20, clock=lambda: next(ticks))
    assert reason == "time_budget" and 0 < len(records) < 50
    assert all(r.elapsed_s <= 20 + 3 for r in records)  # at most one trial past the line


def test_bad_input_names_the_key():
    problem = problems.make("ridge", backend="torch", seed=0, dtype="float64")
    with pytest.raises(ValueError, match="needs low < high"):
        searchers.search_space(problem, {"low": 1, "high": 0})
    with pytest.raises(ValueError, match="space.low must be a number or a list of 1"):
        searchers.search_space(problem, {"low": [0, 1], "high": 2})
    with pytest.raises(ValueError, match=r"needs the keys low, high \(and optionally tied\)"):
        searchers.search_space(problem, {"low": 0, "high": 1, "mid": 0.5})
    row, _ = run_cell(make_cell("random", num_trials=3))
    assert row["status"] == "error"
    assert "Unknown pipeline_params key 'num_trials'" in row["error_message"]
    assert "num_samples" in row["error_message"]
    # per-problem boxes
    space = searchers.search_space(problem, {"ridge": {"low": -1, "high": 1},
                                             "logreg": {"low": -5, "high": 0}})
    assert (space.low, space.high) == ((-1.0,), (1.0,))


@pytest.mark.ray
def test_a_blackbox_cell_in_an_actor_holding_every_cpu(ray_session):
    """The design point: no nested Tuner, so an actor holding both CPUs cannot deadlock."""
    ray = ray_session

    @ray.remote(num_cpus=2)
    def cell_in_actor(cell):
        from hypersweep.orchestrator.cell import run_cell as run
        return run(cell)

    row, traces = ray.get(cell_in_actor.remote(make_cell("tpe", t=30, num_samples=8)),
                          timeout=120)
    assert row["status"] == "ok", row["error_message"]
    assert len(traces) == 8
