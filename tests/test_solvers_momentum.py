"""The momentum (STORM-type) solvers FSLA, MRBO and SUSTAIN, in both backends.

* deterministic limit (batch ≥ split): ‖∇F(λ_k)‖ / ‖∇F(λ₀)‖ ≤ 1e-4 within 5,000 outer
  iterations on ridge and on the shared quadratic_sum instance (∇F from the float64 oracle);
  logreg (the small per-feature instance) has no finite stationary point: the logreg
  limit is tested on a shared-penalty instance in tests/test_solvers_logreg.py;
* identities: STORM is exact with exact oracles (the momentum changes nothing in the
  deterministic limit), FSLA with momentum 1 is SOBA, SUSTAIN's random truncation averages
  to MRBO's Neumann sum (SUSTAIN(Q + 1) = MRBO(Q) in the deterministic limit);
* torch ↔ JAX parity with minibatches (float64, rel ≤ 1e-8 on λ, w, v after 50 steps);
* counts: the cost columns are the docstrings' and the oracle calls a step really makes.
"""
from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hypersweep import problems
from hypersweep.algorithms import plans_momentum
from hypersweep.algorithms.solver_run import SolverRun
from hypersweep.algorithms.solvers_common import Sampler, make_config

SOLVERS = ("fsla", "mrbo", "sustain")
BACKENDS = ("jax", "torch")
QUAD_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bb_quadratic_n1024.npz"
PROBLEMS = {
    "ridge": dict(seed=0, n_features=5, n_train=30, n_val=20),
    "logreg": dict(seed=0, n_train=40, n_val=40, n_test=10, n_features=5),
    "quadratic_sum": dict(data=str(QUAD_DATA)),
}


@functools.lru_cache(maxsize=None)
def _problem(name: str, backend: str, dtype: str = "float64"):
    if name == "quadratic_sum":
        if not (Path(problems.__file__).parent / "quadratic_sum.py").exists():
            pytest.skip("problem quadratic_sum is not in this checkout")
        if not QUAD_DATA.exists():
            pytest.skip(f"shared instance {QUAD_DATA} is absent")
    return problems.make(name, backend=backend, dtype=dtype, **PROBLEMS[name])


def _np(problem, x) -> np.ndarray:
    return np.asarray(problem.ops.to_numpy(x), dtype=np.float64)


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _grad_ratio(problem, lam) -> float:
    g0 = np.linalg.norm(problem.exact_hypergradient(problem.initial_hyperparams()))
    return float(np.linalg.norm(problem.exact_hypergradient(problem.lam_numpy(lam))) / g0)


def _run_until(problem, name, params, *, tol, max_steps=5000, chunk=250):
    """Advance in chunks until ‖∇F‖ ratio ≤ tol or max_steps; returns (ratio, k)."""
    run = SolverRun(problem, name, seed=0, params=params)
    ratio = np.inf
    while run.k < max_steps:
        snap = run.advance(chunk)
        ratio = _grad_ratio(problem, snap.lam)
        if not np.isfinite(ratio) or ratio <= tol:
            break
    return ratio, run.k


# -- 1. the deterministic limit ------------------------------------------------------------------
FULL = 10**6  # batch_size ≥ every split: whole splits, in order
# Overrides of the defaults, per (problem, solver), and why:
# * MRBO / SUSTAIN: a Q-term Neumann series has the bias (I − ηH)^{Q+1} H⁻¹ (η = the
#   Neumann step = α), which puts their fixed point off the stationary point: Q = 10 leaves
#   ‖∇F‖ ratios of ~2e-3 (ridge) and 1.4e-3 (quadratic_sum, μ/L = 0.1). Q = 30 / 40 brings
#   the floor to 3e-6 / 3e-5. SUSTAIN's n_hia_steps is one more (Q − 1 Hessian factors,
#   the same estimator in this limit).
# * ridge: outer_ratio 0.2 (β = 5α): the decaying schedule s_k = (m/(m+k))^{1/3} of MRBO and
#   SUSTAIN (m = 100) would need ~3,000 iterations at β = α; with β = 5α they need 500.
# * FSLA: defaults everywhere.
DETERMINISTIC = {
    ("ridge", "fsla"): {},
    ("ridge", "mrbo"): {"n_hia_steps": 30, "outer_ratio": 0.2},
    ("ridge", "sustain"): {"n_hia_steps": 31, "outer_ratio": 0.2},
    ("quadratic_sum", "fsla"): {},
    ("quadratic_sum", "mrbo"): {"n_hia_steps": 40},
    ("quadratic_sum", "sustain"): {"n_hia_steps": 41},
}


def _deterministic_cases():
    for (prob, solver), params in DETERMINISTIC.items():
        # quadratic_sum, and the Neumann-sum methods (eager torch: 10 s a run): JAX only;
        # torch follows the same trajectory (tests/test_solvers.py::test_full_batch_trajectories_agree_in_torch_and_jax)
        only_jax = prob == "quadratic_sum" or solver in ("mrbo", "sustain")
        for backend in (("jax",) if only_jax else BACKENDS):
            yield pytest.param(prob, solver, backend, params,
                               id=f"{prob}-{solver}-{backend}")


@pytest.mark.parametrize("prob,solver,backend,params", list(_deterministic_cases()))
def test_deterministic_limit_converges(prob, solver, backend, params):
    problem = _problem(prob, backend)
    ratio, k = _run_until(problem, solver, {"batch_size": FULL, **params}, tol=1e-4)
    assert ratio <= 1e-4, f"{solver} on {prob} ({backend}): ratio {ratio:.2e} after {k}"


# -- identities ---------------------------------------------------------------------------------
def _trajectory(problem, name, params, n_steps, seed=0):
    snap = SolverRun(problem, name, seed=seed, params=params).advance(n_steps)
    v = None if snap.v is None else _np(problem, snap.v)
    return _np(problem, snap.lam), _np(problem, snap.w), v


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsla_with_momentum_one_is_soba(backend):
    """ρ = 1: d_k = D_λ(w_k, v_k, λ_k), SOBA's direction (minibatches, same draws)."""
    problem = _problem("ridge", backend)
    common = {"batch_size": 8, "step_size": 0.1}
    lam_f, w_f, v_f = _trajectory(problem, "fsla", {**common, "momentum": 1.0}, 60)
    lam_s, w_s, v_s = _trajectory(problem, "soba", common, 60)
    assert _rel(lam_f, lam_s) <= 1e-12 and _rel(w_f, w_s) <= 1e-12 and _rel(v_f, v_s) <= 1e-12


@pytest.mark.parametrize("solver,params", [
    ("fsla", {}), ("mrbo", {"n_hia_steps": 5}), ("sustain", {"n_hia_steps": 6})])
def test_storm_is_exact_in_the_deterministic_limit(solver, params):
    """With exact oracles d_k − D(x_k) = (1 − ρ)(d_{k−1} − D(x_{k−1})) = … = 0: the momentum
    does not change the trajectory (up to rounding)."""
    problem = _problem("ridge", "jax")
    base = {"batch_size": FULL, **params}
    a = _trajectory(problem, solver, {**base, "momentum": 0.3}, 300)
    b = _trajectory(problem, solver, {**base, "momentum": 1.0}, 300)
    for x, y in zip(a, b):
        if x is not None:
            assert _rel(x, y) <= 1e-10


@pytest.mark.parametrize("prob", ["ridge", "logreg"])
def test_sustain_mean_is_mrbo_in_the_deterministic_limit(prob):
    """Full batch: SUSTAIN(Q+1) uses the mean of its random truncation, η Σ_{j≤Q}(I − ηH)^j,
    MRBO(Q)'s estimator: identical trajectories."""
    problem = _problem(prob, "jax")
    a = _trajectory(problem, "mrbo", {"batch_size": FULL, "n_hia_steps": 7}, 200)
    b = _trajectory(problem, "sustain", {"batch_size": FULL, "n_hia_steps": 8}, 200)
    assert _rel(a[0], b[0]) <= 1e-13 and _rel(a[1], b[1]) <= 1e-13


def test_sustain_random_truncation_is_unbiased():
    """E_t[Q η Π_{j≤t}(I − ηH_j) r] over t ~ U{0..Q−1} = η Σ_{j<Q} Π_{i≤j}(I − ηH_i) r, for
    fixed Hessian minibatches (the estimator's definition; JAX's private helper)."""
    import jax.numpy as jnp

    from hypersweep.algorithms.jax import _solver_core, solvers_momentum as jm

    problem = _problem("ridge", "jax")
    q = 6
    cfg = make_config("sustain", {"batch_size": 8, "n_hia_steps": q}, inner_lr=problem.
                      inner_lr, n_train=30, n_val=20)
    oracles = _solver_core.Oracles(problem.fns, problem.arrays, 30, 20)
    rng = np.random.default_rng(0)
    hess = jnp.asarray(rng.integers(0, 30, size=(q - 1, 8)), jnp.int32)
    w = problem.w_init + 0.3
    lam = problem.as_lam(problem.initial_hyperparams())
    r = jnp.asarray(rng.standard_normal(problem.w_init.shape))
    mean = sum(_np(problem, jm._neumann_adjoint(oracles, w, lam, hess, r, cfg, jnp.asarray(t)))
               for t in range(q)) / q
    full = _np(problem, jm._neumann_adjoint(oracles, w, lam, hess, r, cfg, None))
    assert _rel(mean, full) <= 1e-13


def test_truncation_draw_is_uniform():
    """k = (Σ_j (i_j mod Q) c_j) mod Q over the host's draws: uniform on {0..Q−1}."""
    cfg = make_config("sustain", {"batch_size": 8, "n_hia_steps": 10}, inner_lr=1.0,
                      n_train=30, n_val=20)
    assert plans_momentum.random_truncation(cfg)
    samples = plans_momentum.sustain_samples(cfg)
    draws = Sampler(cfg, samples, seed=3).chunk(0, 20000)[-1]
    weights = np.asarray(plans_momentum.truncation_weights(cfg))
    k = ((draws % 10) * weights).sum(axis=1) % 10
    counts = np.bincount(k, minlength=10)
    # binomial(20000, 0.1): σ = 42; 5σ
    assert np.all(np.abs(counts - 2000) <= 5 * 42), counts
    # the weights are n^{b−1−j} mod Q: k is N mod Q for N the draw read in base n
    n_val = sum(int(i) * 30 ** (7 - j) for j, i in enumerate(draws[0]))
    assert k[0] == n_val % 10
    full = make_config("sustain", {"batch_size": 64}, inner_lr=1.0, n_train=30, n_val=20)
    assert not plans_momentum.random_truncation(full)


# -- 2. parity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("prob,batch", [("ridge", 8), ("logreg", 8), ("quadratic_sum", 64)])
def test_torch_jax_parity(solver, prob, batch):
    params = {"batch_size": batch}
    if prob == "quadratic_sum":
        params["step_size"] = 0.1  # the shared benchmark's setting
    out = {}
    for backend in BACKENDS:
        problem = _problem(prob, backend)
        out[backend] = _trajectory(problem, solver, params, 50, seed=4)
    for x, y in zip(out["torch"], out["jax"]):
        if y is None:
            assert x is None
            continue
        assert np.all(np.isfinite(y))
        assert _rel(x, y) <= 1e-8


# -- 3. counts ----------------------------------------------------------------------------------
def _expected(name, q, b_t, b_v):
    if name == "fsla":
        return dict(n_inner_grad_evals=1, n_hvp_evals=1, n_cross_evals=2,
                    n_outer_grad_evals=2, n_samples_touched=b_t + b_v)
    n_h = q if name == "mrbo" else q - 1
    return dict(n_inner_grad_evals=2, n_hvp_evals=2 * n_h, n_cross_evals=2,
                n_outer_grad_evals=2, n_samples_touched=(2 + n_h) * b_t + b_v)


@pytest.mark.parametrize("solver", SOLVERS)
def test_counts_match_docstring_and_solver_run(solver):
    problem = _problem("ridge", "jax")
    run = SolverRun(problem, solver, seed=0, params={"batch_size": 8, "n_hia_steps": 4}
                    if solver != "fsla" else {"batch_size": 8})
    snap = run.advance(7)
    per_step = _expected(solver, 4, 8, 8)
    for key, value in per_step.items():
        assert snap.costs[key] == 7 * value, key
    assert snap.costs["n_oracle_calls"] == 7 * sum(
        v for k, v in per_step.items() if k != "n_samples_touched")


# the cost columns one call of each torch oracle method stands for
_ORACLE_COSTS = {
    "inner_grad": Counter(inner=1), "inner_grads": Counter(inner=1, cross=1),
    "outer_grads": Counter(outer=1), "inner_vjp": Counter(inner=1, hvp=1, cross=1),
    "hvp": Counter(hvp=1), "cross": Counter(cross=1),
}


@pytest.mark.parametrize("solver", SOLVERS)
def test_counts_are_the_calls_made(solver):
    """Torch is eager: wrap the oracles of one step and count the top-level calls."""
    import torch

    from hypersweep.algorithms import get
    from hypersweep.algorithms.torch import _solver_core

    problem = _problem("ridge", "torch")
    params = {"batch_size": 8} if solver == "fsla" else {"batch_size": 8, "n_hia_steps": 4}
    cfg = make_config(solver, params, inner_lr=problem.inner_lr, n_train=30, n_val=20)
    impl = get(solver, "torch")
    oracles = _solver_core.Oracles(problem.fns, problem.arrays, 30, 20)
    seen, depth = Counter(), [0]

    def wrap(name, fn):
        def counted(*args):
            if depth[0] == 0:
                seen.update(_ORACLE_COSTS[name])
            depth[0] += 1
            try:
                return fn(*args)
            finally:
                depth[0] -= 1
        return counted

    for name in _ORACLE_COSTS:
        setattr(oracles, name, wrap(name, getattr(oracles, name)))
    state = impl.init(oracles, problem.w_init, problem.as_lam(problem.initial_hyperparams()),
                      cfg)
    sampler = Sampler(cfg, impl.samples(cfg), seed=0)
    chunk = [torch.as_tensor(d) for d in sampler.chunk(0, 3)]
    for k in range(3):
        seen.clear()
        state = impl.step(oracles, state, tuple(d[k] for d in chunk), cfg)
        costs = impl.counts(cfg, k)
        assert (seen["inner"], seen["hvp"], seen["cross"], seen["outer"]) == (
            costs["n_inner_grad_evals"], costs["n_hvp_evals"], costs["n_cross_evals"],
            costs["n_outer_grad_evals"])


# -- the shared benchmark instance -----------------------------------------------------------
PEER = {"mrbo": 2.8e-2, "sustain": 3.2e-2, "fsla": 6.1e-2}  # benchmark_bilevel, ‖∇h‖²


@pytest.mark.parametrize("solver", SOLVERS)
def test_shared_instance_within_three_times_peer(solver):
    """JAX float32, batch 64, step 0.1, outer ratio 1, 6,400 iterations: median of 3 seeds
    of ‖∇h‖² ≤ 3× benchmark_bilevel's figure (../shared/data/README.md)."""
    problem = _problem("quadratic_sum", "jax", "float32")
    params = {"batch_size": 64, "step_size": 0.1, "outer_ratio": 1.0}
    values = []
    for seed in range(3):
        lam = SolverRun(problem, solver, seed=seed, params=params).advance(6400).lam
        values.append(float(np.sum(problem.exact_hypergradient(problem.lam_numpy(lam)) ** 2)))
    assert np.median(values) <= 3 * PEER[solver], values
