"""F2SA, BOME and PZOBO (``hypersweep.algorithms.{jax,torch}.solvers_first_order``).

* Deterministic limit (every batch is its whole split): each solver, with its catalog
  defaults, brings ‖∇F(λ_k)‖ / ‖∇F(λ_0)‖ to ≤ 5e-2 within 5,000 outer iterations on
  ridge, logreg and the shared quadratic_sum instance (∇F: the problem's float64 oracle).
  The three are biased by design, hence 5e-2 and not 1e-4. JAX runs the 5,000 iterations
  and checks the *final* ratio (on quadratic_sum, whose full-batch steps are costly, the
  whole run is marked slow; the quick case stops at the first check that meets the
  target); PyTorch (eager: ~100 oracle calls per PZOBO step) stops at the first check
  that meets the target and must sit on JAX's trajectory there.
* Identities: F2SA's λ direction at converged w, z and a large multiplier ν is ∇F + O(1/ν);
  PZOBO's with long inner runs and a tiny smoothing is mean(u²)·∇F on a scalar λ; one BOME
  step is checked against a numpy re-derivation (the barrier: ⟨d, ∇q̂⟩ = max(⟨∇f, ∇q̂⟩, φ)).
* Parity: torch and JAX trajectories agree to 1e-8 (λ, w, and F2SA's z) after 50
  minibatch steps, float64, same seed.
* Counts: ``counts(cfg, k)`` equals the oracle calls a step makes (counted by a proxy
  around the torch oracles) and the rows of its draws; every draw is read.
* PZOBO's directions: the counter-based generator is bit-equal in numpy, JAX and torch.
"""
from __future__ import annotations

import collections
import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from hypersweep import problems
from hypersweep.algorithms.common import cost_columns
from hypersweep.algorithms import plans_first_order as plans
from hypersweep.algorithms.solver_run import SolverRun

SOLVERS = ("f2sa", "bome", "pzobo")
TARGET = 5e-2
MAX_STEPS = 5000
QUAD_DATA = Path("/work/shared/data/bb_quadratic_n1024.npz")
HAS_QUAD = importlib.util.find_spec("hypersweep.problems.quadratic_sum") is not None
FULL = {"batch_size": 10 ** 6}  # clamped to each split: the deterministic limit

PROBLEMS = {
    "ridge": dict(n_features=5, n_train=30, n_val=20),
    "logreg": dict(n_train=40, n_val=40, n_test=10, n_features=5),
    "quadratic_sum": dict(data=str(QUAD_DATA)),
}
# BOME's deterministic limit stalls where its barrier multiplier μ meets the stability
# bound of the joint step ξ(L_f + μ L_in) ≈ 2, so its bias grows with ξ = α/outer_ratio.
# With ξ = η = 1/L it ends at 0.048 (ridge) and 0.067 (quadratic_sum); ξ = η/3 and η/2
# end at 0.030 and 0.006. logreg keeps the default (0.020).
OVERRIDES = {("bome", "ridge"): {"outer_ratio": 3.0},
             ("bome", "quadratic_sum"): {"outer_ratio": 2.0}}
# the checks of the torch runs (eager PyTorch: a quadratic_sum step reads 1,024 rows of
# 10×10 matrices per oracle call, and PZOBO makes 110 calls a step)
CHECK_EVERY = {"ridge": 250, "logreg": 250, "quadratic_sum": 50}


@functools.lru_cache(maxsize=None)
def _problem(name: str, backend: str, **extra):
    if name == "quadratic_sum" and not (HAS_QUAD and QUAD_DATA.exists()):
        pytest.skip("quadratic_sum (hypersweep/problems/quadratic_sum.py) or its data "
                    f"{QUAD_DATA} is not available")
    return problems.make(name, backend=backend, dtype="float64", seed=0,
                         **{**PROBLEMS[name], **extra})


def _ratio(problem, lam, g0: float) -> float:
    return float(np.linalg.norm(problem.exact_hypergradient(problem.lam_numpy(lam))) / g0)


def _np(x) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)


def _rel(a, b) -> float:
    a, b = _np(a), _np(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# -- deterministic limit -------------------------------------------------------------------
def _jax_cases():
    """ridge, logreg: the whole 5,000 iterations (~1 s). quadratic_sum (1,024 rows of
    10×10 matrices per full-batch oracle call, ~3 ms a step): to the first check that
    meets the target, and the whole run marked slow."""
    cases = []
    for p in PROBLEMS:
        for s in SOLVERS:
            if p == "quadratic_sum":
                cases.append(pytest.param(s, p, False, id=f"{s}-{p}-first"))
                cases.append(pytest.param(s, p, True, id=f"{s}-{p}-full",
                                          marks=[pytest.mark.slow]))
            else:
                cases.append(pytest.param(s, p, True, id=f"{s}-{p}-full"))
    return cases


@pytest.mark.parametrize("name,problem_name,full", _jax_cases())
def test_deterministic_limit_jax(name, problem_name, full):
    problem = _problem(problem_name, "jax")
    params = {**FULL, **OVERRIDES.get((name, problem_name), {})}
    run = SolverRun(problem, name, params=params)
    g0 = _ratio(problem, run.state.outer, 1.0)
    every = CHECK_EVERY[problem_name]
    first, ratio = None, np.inf
    while run.k < MAX_STEPS and (full or first is None):
        snap = run.advance(every)
        ratio = _ratio(problem, snap.lam, g0)
        first = snap.k if first is None and ratio <= TARGET else first
    assert np.all(np.isfinite(problem.lam_numpy(snap.lam)))
    # full: the ratio after 5,000 iterations, not only the best one on the way
    assert first is not None and ratio <= TARGET, (
        f"{name} on {problem_name}: ratio {ratio:.3g} at {run.k} (first ≤ {TARGET} at "
        f"{first})")


# ridge only in torch (the whole run, eager: seconds); on the other problems torch follows
# JAX's trajectory (tests/test_solvers.py::test_full_batch_trajectories_agree_in_torch_and_jax)
@pytest.mark.parametrize("name,problem_name", [(s, "ridge") for s in SOLVERS])
def test_deterministic_limit_torch(name, problem_name):
    params = {**FULL, **OVERRIDES.get((name, problem_name), {})}
    problem = _problem(problem_name, "torch")
    run = SolverRun(problem, name, params=params)
    g0 = _ratio(problem, run.state.outer, 1.0)
    every = CHECK_EVERY[problem_name]
    snap, ratio = None, np.inf
    while run.k < MAX_STEPS and ratio > TARGET:
        snap = run.advance(every)
        ratio = _ratio(problem, snap.lam, g0)
    assert ratio <= TARGET, f"{name} on {problem_name}: ratio {ratio:.3g} at {run.k}"
    # the same trajectory as JAX's (whose whole run is checked above)
    ref = SolverRun(_problem(problem_name, "jax"), name, params=params).advance(snap.k)
    assert _rel(snap.lam, ref.lam) <= 1e-8 and _rel(snap.w, ref.w) <= 1e-8


# -- identities ----------------------------------------------------------------------------
def test_f2sa_large_multiplier_gives_the_hypergradient():
    """At w = argmin L_out/ν + L_in, z = w* and a large fixed ν, F2SA's λ direction is
    ∇_λ L_ν* = ∇F(λ) + O(1/ν) (Kwon et al., Lemma 3.1)."""
    problem = _problem("ridge", "jax", per_feature=True)
    nu = 1e4
    run = SolverRun(problem, "f2sa", params={**FULL, "n_inner_steps": 150,
                                              "multiplier0": nu, "multiplier_growth": 0.0})
    lam0 = problem.lam_numpy(run.state.outer)
    snap = run.advance(1)
    direction = (lam0 - problem.lam_numpy(snap.lam)) / run.cfg.outer_step
    exact = problem.exact_hypergradient(lam0)
    assert _rel(direction, exact) <= 1.0 / nu  # measured 0.50/ν at ν = 1e2, 1e3, 1e4
    assert _rel(run.state.lower, problem.exact_inner_solution(lam0)) <= 1e-10


def test_pzobo_long_inner_runs_give_the_hypergradient_along_its_directions():
    """With T large (w_T(λ') = w*(λ') for every λ') and μ tiny, δ_j = J u_j + O(μ); on a
    scalar λ with ∇_λ L_out = 0 (ridge) the direction is mean_j(u_j²)·∇F(λ), u_j from the
    numpy reference of the generator (salt of the whole train split, k = 0)."""
    problem = _problem("ridge", "jax")
    run = SolverRun(problem, "pzobo", params={**FULL, "n_inner_steps": 400,
                                               "smoothing": 1e-6, "n_directions": 7})
    lam0 = problem.lam_numpy(run.state.outer)
    snap = run.advance(1)
    direction = (lam0 - problem.lam_numpy(snap.lam)) / run.cfg.outer_step
    u = plans.counter_normals(plans.draw_salt(np.arange(run.cfg.n_train)), 0, (7, 1))
    assert _rel(direction, np.mean(u ** 2) * problem.exact_hypergradient(lam0)) <= 1e-5


@pytest.mark.parametrize("start", ["far", "near"])
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_bome_step_matches_a_numpy_derivation(backend, start):
    """One full-batch BOME step on ridge, re-derived in numpy from the closed forms
    (∇_w L_in = (2/n)Xᵀ(Xw − y) + e^h w, ∇_h L_in = ½ e^h ‖w‖², ∇_w L_out =
    (2/m)X_vᵀ(X_v w − y_v), ∇_h L_out = 0), and the barrier property of its direction d:
    ⟨d, ∇q̂⟩ = max(⟨∇f, ∇q̂⟩, φ). From w₀ "far" from w*, ∇f already decreases q̂ fast
    enough (μ = 0); from w₀ = w* − 0.1 H⁻¹∇_w L_out ("near"), ⟨∇f, ∇q̂⟩ < 0 and μ > 0."""
    problem = _problem("ridge", backend)
    a = problem.arrays_np
    X, y, Xv, yv = a["X_train"], a["y_train"], a["X_val"], a["y_val"]
    h0 = problem.initial_hyperparams()
    hess = 2.0 / len(y) * X.T @ X + np.exp(h0) * np.eye(X.shape[1])

    def g_w(w):
        return 2.0 / len(y) * X.T @ (X @ w - y) + np.exp(h0) * w

    def g_h(w):
        return np.atleast_1d(0.5 * np.exp(h0) * (w @ w))

    def f_w(w):
        return 2.0 / len(yv) * Xv.T @ (Xv @ w - yv)

    w_star = problem.exact_inner_solution(h0)
    w0 = (np.linspace(-1.0, 1.0, X.shape[1]) if start == "far"
          else w_star - 0.1 * np.linalg.solve(hess, f_w(w_star)))
    problem = problem.with_w_init(problem.ops.asarray(w0))
    eta, T = 0.3, 4
    run = SolverRun(problem, "bome", params={**FULL, "bome_eta": eta, "n_inner_steps": T,
                                              "outer_ratio": 2.0})
    snap = run.advance(1)
    alpha, xi = run.cfg.inner_step, run.cfg.outer_step
    theta = w0.copy()
    for _ in range(T):
        theta = theta - alpha * g_w(theta)
    grad_q = np.concatenate([g_w(w0), g_h(w0) - g_h(theta)])
    grad_f = np.concatenate([f_w(w0), [0.0]])
    phi = eta * grad_q @ grad_q
    mult = max((phi - grad_f @ grad_q) / (grad_q @ grad_q), 0.0)
    moved = np.concatenate([w0 - _np(snap.w), h0 - problem.lam_numpy(snap.lam)]) / xi
    assert _rel(moved, grad_f + mult * grad_q) <= 1e-12
    assert np.isclose(moved @ grad_q, max(grad_f @ grad_q, phi), rtol=1e-10)
    assert (mult > 0) == (start == "near")


# -- parity --------------------------------------------------------------------------------
PARITY_PROBLEMS = {"logreg": dict(PROBLEMS["logreg"]),
                   "quadratic_sum": dict(n_samples=40, n_samples_outer=30, dim_inner=4,
                                         dim_outer=3, mu_inner=0.5)}


@pytest.mark.parametrize("problem_name", list(PARITY_PROBLEMS))
@pytest.mark.parametrize("name", SOLVERS)
def test_parity_torch_jax_minibatch(name, problem_name):
    if problem_name == "quadratic_sum" and not HAS_QUAD:
        pytest.skip("hypersweep/problems/quadratic_sum.py is not available")
    params = {"batch_size": 8}
    snaps, states = {}, {}
    for backend in ("jax", "torch"):
        problem = problems.make(problem_name, backend=backend, dtype="float64", seed=3,
                                **PARITY_PROBLEMS[problem_name])
        run = SolverRun(problem, name, seed=11, params=params)
        assert run.cfg.b_train < run.cfg.n_train and run.cfg.b_val < run.cfg.n_val
        snaps[backend], states[backend] = run.advance(50), run.state
    ref, got = snaps["jax"], snaps["torch"]
    assert ref.k == got.k == 50
    assert _rel(got.lam, ref.lam) <= 1e-8 and _rel(got.w, ref.w) <= 1e-8
    if name == "f2sa":
        assert _rel(states["torch"].lower, states["jax"].lower) <= 1e-8
    start = problems.make(problem_name, backend="jax", dtype="float64", seed=3,
                          **PARITY_PROBLEMS[problem_name]).initial_hyperparams()
    assert _rel(got.lam, start) > 1e-3  # λ moved


# -- counts --------------------------------------------------------------------------------
#: cost columns of one call of each oracle method (package convention)
ORACLE_COSTS = {"inner_grad": dict(inner=1), "inner_grads": dict(inner=1, cross=1),
                "outer_grads": dict(outer=1), "inner_vjp": dict(inner=1, hvp=1, cross=1),
                "hvp": dict(hvp=1), "cross": dict(cross=1)}


class _CountingOracles:
    """The torch oracles, counting every call by method and every draw read."""

    def __init__(self, oracles):
        self._oracles = oracles
        self.calls = collections.Counter()
        self.read = set()

    def __getattr__(self, name):
        attr = getattr(self._oracles, name)
        if name not in ORACLE_COSTS:
            return attr

        def counted(w, lam, idx, *rest):
            self.calls[name] += 1
            self.read.add(id(idx))
            return attr(w, lam, idx, *rest)

        return counted


@pytest.mark.parametrize("name", SOLVERS)
def test_counts_match_the_oracle_calls(name):
    import torch

    problem = _problem("logreg", "torch")
    params = {"batch_size": 8, "n_inner_steps": 3}
    if name == "pzobo":
        params["n_directions"] = 4
    run = SolverRun(problem, name, seed=5, params=params)
    cfg, solver = run.cfg, run.solver
    samples = solver.samples(cfg)
    draws = tuple(torch.as_tensor(d[0]) for d in run.sampler.chunk(0, 1))
    assert [d.shape[0] for d in draws] == [cfg.b_train if s == "train" else cfg.b_val
                                           for s in samples]
    oracles = _CountingOracles(run.core.Oracles(problem.fns, problem.arrays, cfg.n_train,
                                                cfg.n_val))
    solver.step(oracles, run.state, draws, cfg)
    total = collections.Counter()
    for method, n in oracles.calls.items():
        for col, c in ORACLE_COSTS[method].items():
            total[col] += n * c
    expected = solver.counts(cfg, 0)
    assert expected == cost_columns(
        total["inner"], total["hvp"], total["cross"], total["outer"],
        sum(d.shape[0] for d in draws))
    assert oracles.read == {id(d) for d in draws}  # every draw is read
    T, Q = 3, 4
    formula = {"f2sa": (2 * T + 2, 0, 2, T + 1), "bome": (T + 2, 0, 2, 1),
               "pzobo": (T * (Q + 1), 0, 0, 1)}[name]
    assert (expected["n_inner_grad_evals"], expected["n_hvp_evals"],
            expected["n_cross_evals"], expected["n_outer_grad_evals"]) == formula
    snap = run.advance(4)
    assert snap.costs["n_inner_grad_evals"] == 4 * formula[0]
    assert snap.costs["n_samples_touched"] == 4 * sum(d.shape[0] for d in draws)


def test_f2sa_multiplier_schedule_is_linear():
    cfg = SolverRun(_problem("ridge", "jax"), "f2sa",
                    params={"multiplier0": 2.0, "multiplier_growth": 0.5}).cfg
    assert [plans.f2sa_multiplier(cfg, k) for k in (0, 1, 10)] == [2.0, 2.5, 7.0]


# -- PZOBO's directions --------------------------------------------------------------------
def test_counter_normals_equal_in_numpy_jax_torch():
    import jax.numpy as jnp
    import torch

    from hypersweep.algorithms.jax import solvers_first_order as fo_jax
    from hypersweep.algorithms.torch import solvers_first_order as fo_torch

    words = np.random.default_rng(0).integers(0, 2 ** 32, 4096, dtype=np.uint64)
    ref = plans.mix32(words.astype(np.uint32))
    got = fo_jax.mix32(jnp.asarray(words.astype(np.uint32)))
    assert np.array_equal(np.asarray(got), ref)
    assert np.array_equal(fo_torch.mix32(torch.as_tensor(words.astype(np.int64))).numpy(),
                          ref.astype(np.int64))
    idx = np.random.default_rng(1).integers(0, 10 ** 6, 64)
    salt = plans.draw_salt(idx)
    assert int(fo_jax.draw_salt(jnp.asarray(idx, jnp.int32))) == int(salt)
    assert int(fo_torch.draw_salt(torch.as_tensor(idx))) == int(salt)
    for k in (0, 1, 123456):
        ref = plans.counter_normals(salt, k, (10, 3))
        got_jax = fo_jax.counter_normals(jnp.uint32(salt), jnp.int32(k), (10, 3),
                                         jnp.float32)
        got_torch = fo_torch.counter_normals(torch.tensor(int(salt)), k, (10, 3),
                                             torch.float64)
        assert np.allclose(np.asarray(got_jax), ref, rtol=1e-5, atol=1e-5)
        assert np.allclose(got_torch.numpy(), ref, rtol=1e-14, atol=1e-14)
    # N(0, 1): moments of 2·10⁵ draws, and distinct counters give distinct directions
    z = plans.counter_normals(salt, 0, (200_000,))
    assert abs(z.mean()) < 0.01 and abs(z.var() - 1.0) < 0.02
    assert abs(np.mean(z ** 4) - 3.0) < 0.1
    a, b = plans.counter_normals(salt, 0, (50,)), plans.counter_normals(salt, 1, (50,))
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.5
