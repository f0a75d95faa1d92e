"""The bilevel solvers as one family: the interface, the sampler, parity, counts, and the
``hpo`` pipeline running them. Every list comes from the catalog (``kind="solver"``); the
per-family files (``test_solvers_<family>.py``) hold the convergence and identity tests.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from hypersweep import algorithms, problems
from hypersweep.algorithms.solvers_common import DRAW_BLOCK, Sampler, make_config, solver_names

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")

from hypersweep.algorithms.solver_run import SolverRun  # noqa: E402
from hypersweep.orchestrator.cell import Cell, run_cell  # noqa: E402

SOLVERS = solver_names()
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "bb_quadratic_n1024.npz"
RIDGE = dict(n_features=5, n_train=30, n_val=20)


def minibatch_params(name: str) -> dict:
    """Batches of 8 rows (where the solver takes a batch; hoag is full-batch) and a step
    of 0.05 (below the ridge instance's η = 0.24: 10 consecutive inner/Neumann steps on
    one 8-row batch, whose curvature reaches 14.5, must not amplify)."""
    spec = algorithms.spec(name)
    return {"step_size": 0.05, **({"batch_size": 8} if "batch_size" in spec.params else {})}


def ridge(backend, dtype="float64"):
    return problems.make("ridge", backend=backend, dtype=dtype, seed=0, **RIDGE)


def test_the_catalog_lists_sixteen_solvers_each_needing_minibatches():
    assert SOLVERS == ["soba", "saba", "srba", "fsla", "mrbo", "sustain", "ttsa", "ma_soba",
                       "stocbio_solver", "bsa", "amigo", "vrbo", "hoag", "f2sa", "bome",
                       "pzobo"]
    for name in SOLVERS:
        assert algorithms.spec(name).requires == frozenset({"minibatch"})


# -- the sampler ----------------------------------------------------------------------------
def _cfg(name="soba", n_train=1000, n_val=300, **params):
    return make_config(name, {"batch_size": 16, **params}, inner_lr=0.1, n_train=n_train,
                       n_val=n_val)


def test_draws_do_not_depend_on_the_chunking():
    sampler = Sampler(_cfg(), ("train", "val"), seed=3)
    whole = sampler.chunk(0, 3 * DRAW_BLOCK + 7)
    parts = [sampler.chunk(s, n) for s, n in ((0, 5), (5, DRAW_BLOCK), (5 + DRAW_BLOCK,
                                                                         2 * DRAW_BLOCK + 2))]
    for slot in range(2):
        np.testing.assert_array_equal(whole[slot], np.concatenate([p[slot] for p in parts]))
    assert whole[0].shape == (3 * DRAW_BLOCK + 7, 16)
    assert whole[0].min() >= 0 and whole[0].max() < 1000 and whole[1].max() < 300


def test_draws_are_with_replacement_uniform_and_seeded():
    cfg = _cfg(n_train=50)
    a = Sampler(cfg, ("train",), seed=0).chunk(0, 2000)[0]
    b = Sampler(cfg, ("train",), seed=1).chunk(0, 2000)[0]
    assert not np.array_equal(a, b)
    counts = np.bincount(a.ravel(), minlength=50)
    # 32,000 draws over 50 rows: 640 each; a χ² with 49 dof stays far below 150
    chi2 = float(((counts - 640.0) ** 2 / 640.0).sum())
    assert chi2 < 150, chi2
    assert any(len(set(row)) < len(row) for row in a)  # repeats occur: with replacement


def test_a_split_no_larger_than_the_batch_is_read_whole_in_order():
    cfg = _cfg(n_train=12, n_val=300, batch_size=64)
    assert (cfg.b_train, cfg.b_val) == (12, 64)  # the batch is clamped to the split
    train, val = Sampler(cfg, ("train", "val"), seed=0).chunk(0, 3)
    np.testing.assert_array_equal(train, np.tile(np.arange(12), (3, 1)))
    assert val.shape == (3, 64)


def test_drawing_costs_batch_rows_not_n_at_any_n():
    # n = 10⁹ rows: an O(n) draw (a permutation, an arange) would need gigabytes
    cfg = _cfg(n_train=10**9, n_val=10**9, batch_size=64)
    tracemalloc.start()
    Sampler(cfg, ("train", "val"), seed=0).chunk(0, 2 * DRAW_BLOCK)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * 2**20, peak


# -- every solver, both backends ---------------------------------------------------------------
@pytest.mark.parametrize("name", SOLVERS)
def test_every_solver_is_a_pair_with_a_state_of_inner_and_outer(name):
    for backend in ("jax", "torch"):
        solver = algorithms.get(name, backend)
        assert callable(solver.init) and callable(solver.step)
        run = SolverRun(ridge(backend), name, seed=0, params=minibatch_params(name))
        state = run.state
        assert hasattr(state, "inner") and hasattr(state, "outer")
        assert tuple(state.outer.shape) == run.problem.lam_shape


@pytest.mark.parametrize("name", SOLVERS)
def test_torch_and_jax_trajectories_agree_over_50_steps(name):
    """Same seed, same minibatch sequence (drawn on the host), float64: rel ≤ 1e-8."""
    snaps = {}
    for backend in ("jax", "torch"):
        run = SolverRun(ridge(backend), name, seed=4, params=minibatch_params(name))
        snap = run.advance(20)
        snap = run.advance(30)
        snaps[backend] = (snap, run.problem.ops)
    (sj, oj), (st, ot) = snaps["jax"], snaps["torch"]
    for field in ("lam", "w", "v"):
        a, b = getattr(sj, field), getattr(st, field)
        if a is None:
            assert b is None
            continue
        a, b = oj.to_numpy(a), ot.to_numpy(b)
        assert np.all(np.isfinite(a)), (name, field)
        scale = max(np.linalg.norm(a), 1e-12)
        assert np.linalg.norm(a - b) / scale <= 1e-8, (name, field)
    assert sj.costs == st.costs


FULL_BATCH_PROBLEMS = {
    "ridge": RIDGE,
    "logreg": dict(n_train=40, n_val=40, n_test=10, n_features=5),
    "quadratic_sum": dict(n_samples=40, n_samples_outer=30, dim_inner=4, dim_outer=3),
}


@pytest.mark.parametrize("problem_name", list(FULL_BATCH_PROBLEMS))
@pytest.mark.parametrize("name", SOLVERS)
def test_full_batch_trajectories_agree_in_torch_and_jax(name, problem_name):
    """The deterministic limit (every batch the whole split), float64: torch follows JAX's
    trajectory (rel ≤ 1e-8 after 100 iterations). The families' convergence tests run
    their long deterministic runs in JAX only and rely on this."""
    params = {"batch_size": 10**6} if "batch_size" in algorithms.spec(name).params else {}
    snaps = {}
    for backend in ("jax", "torch"):
        problem = problems.make(problem_name, backend=backend, dtype="float64", seed=0,
                                **FULL_BATCH_PROBLEMS[problem_name])
        run = SolverRun(problem, name, seed=0, params=params)
        snaps[backend] = (run.advance(100), problem.ops)
    (sj, oj), (st, ot) = snaps["jax"], snaps["torch"]
    for field in ("lam", "w"):
        a, b = oj.to_numpy(getattr(sj, field)), ot.to_numpy(getattr(st, field))
        assert np.all(np.isfinite(a)), (name, field)
        assert np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12) <= 1e-8, (name, field)
    assert sj.costs == st.costs


@pytest.mark.parametrize("name", SOLVERS)
def test_a_run_is_reproducible_and_its_costs_are_the_sum_of_step_counts(name):
    out = []
    for _ in range(2):
        run = SolverRun(ridge("jax"), name, seed=7, params=minibatch_params(name))
        snap = run.advance(13)
        out.append((np.asarray(snap.lam), snap.costs))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    assert out[0][1] == out[1][1]
    costs = out[0][1]
    assert costs["n_oracle_calls"] == sum(costs[k] for k in (
        "n_inner_grad_evals", "n_hvp_evals", "n_cross_evals", "n_outer_grad_evals"))
    assert costs["n_oracle_calls"] >= 13  # every iteration calls some oracle


@pytest.mark.parametrize("name", SOLVERS)
def test_a_chunk_compiles_once_and_later_chunks_compile_nothing(name):
    """One trace and compile per (solver, problem, config, chunk length): the second and
    third chunks of the same length, from other states and draws, run the cached
    executable (an eager ``lax.scan`` traced and compiled its body again on every chunk,
    ~0.3 s each). 23: a chunk length no other test uses, so the first chunk traces here."""
    compiles = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        run = SolverRun(ridge("jax"), name, seed=11, params=minibatch_params(name))
        run.advance(23)
        first = len(compiles)
        run.advance(23)
        run.advance(23)
        assert first >= 1 and len(compiles) == first, (first, len(compiles))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_the_torch_state_is_never_written_in_place():
    problem = ridge("torch")
    run = SolverRun(problem, "soba", seed=0, params={"batch_size": 8})
    w0 = problem.w_init.clone()
    before = run.state
    copies = [x.clone() for x in (before.inner, before.adjoint, before.outer)]
    run.advance(5)
    for x, c in zip((before.inner, before.adjoint, before.outer), copies):
        assert torch.equal(x, c)
    assert torch.equal(problem.w_init, w0)


def test_a_solver_refuses_a_problem_without_minibatches():
    problem = problems.make("quadratic", backend="jax", dtype="float64", seed=0)
    with pytest.raises(ValueError, match="minibatch"):
        SolverRun(problem, "soba")
    with pytest.raises(ValueError, match="not a solver"):
        SolverRun(ridge("jax"), "aid_cg")


# -- the shared benchmark_bilevel instance ---------------------------------------------------
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason=f"{SHARED} is absent")


@needs_shared
def test_quadratic_sum_reads_the_peer_instance_and_matches_its_reference():
    ref = np.load(SHARED)
    p = problems.make("quadratic_sum", backend="jax", dtype="float64", data=str(SHARED))
    lam0 = p.initial_hyperparams()
    np.testing.assert_array_equal(lam0, ref["outer_var0"].astype(np.float64))
    g0 = p.exact_hypergradient(lam0)
    # the peer's metric at x₀ is float32 arithmetic: agreement to float32 rounding
    assert float(g0 @ g0) == pytest.approx(float(ref["metric0_value"]), rel=1e-6)
    x_star = ref["ref_x_star"]
    assert np.linalg.norm(p.exact_hypergradient(x_star)) < 1e-12
    assert p.value(x_star) == pytest.approx(float(ref["ref_h_star"]), rel=1e-12)
    np.testing.assert_allclose(p.exact_inner_solution(x_star), ref["ref_z_star"], atol=1e-12)


# -- the hpo pipeline -------------------------------------------------------------------------
def _cell(algorithm, backend, problem="ridge", problem_params=RIDGE, algorithm_params=None,
          pipeline_params=None, seed=0):
    return Cell(study="test-solvers", pipeline="hpo", problem=problem, algorithm=algorithm,
                backend=backend, t=10, K=None, seed=seed,
                problem_params=json.dumps(problem_params),
                algorithm_params=json.dumps(algorithm_params or {}),
                pipeline_params=json.dumps(pipeline_params or {}))


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_hpo_runs_a_solver_and_scores_it_with_the_oracle(backend):
    cell = _cell("soba", backend, algorithm_params={"batch_size": 1000},
                 pipeline_params={"outer_steps": 1000, "eval_every": 250})
    row, traces = run_cell(cell)
    assert row["status"] == "ok", row["error_message"]
    problem = problems.make("ridge", backend=backend, dtype="float64", seed=0, **RIDGE)
    lam0 = problem.initial_hyperparams()
    g0 = np.linalg.norm(problem.exact_hypergradient(lam0))
    lam_final = np.asarray(json.loads(row["extra"])["lam_final"])
    g = np.linalg.norm(problem.exact_hypergradient(lam_final))
    assert row["outer_grad_norm"] == pytest.approx(g, rel=1e-12)
    assert row["outer_grad_norm_rel"] == pytest.approx(g / g0, rel=1e-12)
    assert row["outer_grad_norm_rel"] < 1e-2
    assert [t["step"] for t in traces] == [0, 250, 500, 750, 1000]
    assert traces[0]["outer_grad_norm"] == pytest.approx(g0, rel=1e-12)
    assert traces[0]["n_oracle_calls"] == 0 and traces[0]["wall_time_s"] == 0.0
    assert traces[-1]["n_oracle_calls"] == row["n_oracle_calls"] == 4 * 1000
    assert all(t["inner_distance"] is not None for t in traces)
    walls = [t["wall_time_s"] for t in traces]
    assert walls == sorted(walls)


def test_hpo_rows_of_estimators_gain_the_oracle_gradient_norm_too():
    cell = _cell("aid_cg", "jax", pipeline_params={"outer_steps": 5})
    cell = Cell(**{**cell.__dict__, "K": 5, "cell_id": ""})
    row, traces = run_cell(cell)
    assert row["status"] == "ok", row["error_message"]
    assert row["outer_grad_norm"] > 0 and row["outer_grad_norm_rel"] > 0
    assert all(t["outer_grad_norm"] is not None for t in traces)


@pytest.mark.parametrize("name", ["soba", "aid_cg"])
def test_oracle_metrics_false_scores_nothing_with_the_oracle(name):
    """Losses vs time without exact solves: trace rows leave ‖∇F‖ and the inner distance
    empty, the result row has no ‖∇F‖ and reports the last iterate's L_out (the last
    trace row's val loss), saying so; with the oracle on, every one is filled."""
    for flag in (True, False):
        cell = _cell(name, "jax", pipeline_params={"outer_steps": 40, "eval_every": 10,
                                                   "oracle_metrics": flag})
        if name == "aid_cg":
            cell = Cell(**{**cell.__dict__, "K": 5, "cell_id": ""})
        row, traces = run_cell(cell)
        assert row["status"] == "ok", row["error_message"]
        filled = [t["outer_grad_norm"] is not None and t["inner_distance"] is not None
                  for t in traces]
        assert len(traces) >= 4 and all(filled) == flag and not any(filled) == (not flag)
        assert all(t["val_loss"] is not None for t in traces)
        extra = json.loads(row["extra"])
        if flag:
            assert row["outer_grad_norm"] > 0
            assert extra["val_loss_is"] == "exact value function F(lam_final)"
        else:
            assert row["outer_grad_norm"] is None and row["outer_grad_norm_rel"] is None
            assert extra["val_loss_is"].startswith("last iterate")
            assert "inner_suboptimality" not in extra
            assert row["val_loss"] == pytest.approx(traces[-1]["val_loss"], rel=1e-12)


def test_plan_rejects_bad_solver_input_in_one_line_with_exit_2(tmp_path):
    base = dict(study="bad", pipeline="hpo", backend="jax", dtype="float64", t=[10],
                seeds=1, pipeline_params={"outer_steps": 10}, output=str(tmp_path / "o"))
    cases = [
        ({"problems": [{"name": "ridge"}], "algorithms": [{"name": "soba",
                                                           "params": {"momentum": 1}}]},
         "momentum"),
        ({"problems": [{"name": "ridge"}], "algorithms": [{"name": "soba",
                                                           "params": {"step_size": -1}}]},
         "step_size must be a finite number > 0"),
        ({"problems": [{"name": "quadratic"}], "algorithms": ["soba"]},
         "soba requires minibatch, which quadratic lacks"),
    ]
    for i, (extra, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(json.dumps({**base, **extra}))
        proc = subprocess.run([sys.executable, "-m", "hypersweep", "plan", str(path)],
                              capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and message in lines[0], proc.stderr
        assert not (tmp_path / "o").exists()
