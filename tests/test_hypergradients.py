"""Hypergradient estimators against float64 oracles, identities, rates, dtypes, bad input.

Backend-generic: every test runs for "jax" and "torch" through the public API only
(``problems.make``, ``algorithms.get``, ``problem.exact_hypergradient``, ``ops.to_numpy``).
A backend whose algorithm module does not exist yet, or a problem whose module does not
import yet, is skipped (work in progress elsewhere), so these tests start running as the
pieces land. The JAX compile-count tests at the end are JAX-only.

Tolerances (float64 unless stated):
* oracle match 1e-6 (relative, ‖·‖₂): t is chosen per problem so that q^t ≤ 1e-10
  (q = contraction factor), which leaves ≥ 1e3 of room for the constants in the
  O(t q^t) / O(q^t) bounds and the κ·1e-12 solver tolerance;
* algebraic identities 1e-10: the two sides are the same number in exact arithmetic and
  differ only by float64 rounding accumulated over ≤ a few hundred steps.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math

import numpy as np
import pytest

from hypersweep import algorithms, problems

BACKENDS = ("jax", "torch")

# Small instances whose inner map contracts with q ≲ 0.9, so t = log(1e-10)/log(q) ≲ 220.
SMALL = {
    "ridge": dict(n_features=5, n_train=30, n_val=20, per_feature=True),
    "logreg": dict(n_train=40, n_val=40, n_test=10, n_features=5),
    # penalty e^0 (default e^-1) brings q from 0.965 to 0.85.
    "kernel_ridge": dict(n_train=20, n_val=20, n_test=10, n_features=3, lam0=(-1.0, 0.0)),
    "biased_reg": dict(n_tasks=3, n_features=4, n_train=8, n_val=8),
    "hyper_rep": dict(n_tasks=3, n_features=4, n_hidden=2, n_train=8, n_val=8),
    # reg 0.5 (default 1e-2) brings q from 0.996 to 0.85; λ has one entry per train row.
    "data_cleaning": dict(n_train=20, n_val=20, n_test=20, reg=0.5),
    "quadratic": dict(dim_inner=8, dim_outer=3),
}
T_CAP = 3000          # more inner steps than this means the test instance is too ill-posed
Q_POWER_TARGET = 1e-10  # t is chosen so that q^t ≤ this
ORACLE_RTOL = 1e-6
IDENTITY_RTOL = 1e-10
BIG_W = 200            # aid_exact (dense Hessian) is skipped above this dim w
FULL_BATCH = 10 ** 6   # a stocbio batch_size larger than every split: no sampling
CONSISTENT = ("itd", "itd_forward", "tbptt", "aid_cg", "aid_fp", "aid_neumann",
              "aid_exact", "stocbio")


# -- helpers --------------------------------------------------------------------------------
def _module_exists(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except ImportError:
        return False


def need_algorithm(name: str, backend: str) -> None:
    """Skip when ``backend``'s module for ``name`` is not written yet."""
    module = algorithms.spec(name).impls[backend].partition(":")[0]
    if not _module_exists(module):
        pytest.skip(f"{module} does not exist yet")


@functools.lru_cache(maxsize=None)
def _make(name: str, backend: str, dtype: str, params: tuple):
    return problems.make(name, backend=backend, seed=0, dtype=dtype, **dict(params))


def _any_backend() -> str:
    return "jax" if _module_exists("hypersweep.problems.jax.ops") else "torch"


def get_problem(name: str, backend: str, dtype: str = "float64", **extra):
    """The small instance of ``name`` (SMALL updated by ``extra``); skip if not importable."""
    try:
        importlib.import_module(problems.spec(name).impl)
    except Exception as exc:  # a problem being written elsewhere
        pytest.skip(f"problem {name!r} does not import yet: {exc!r}")
    if not _module_exists(f"hypersweep.problems.{backend}.ops"):
        pytest.skip(f"backend {backend!r} has no ops module yet")
    return _make(name, backend, dtype, tuple(sorted({**SMALL[name], **extra}.items())))


def _params_key(problem) -> tuple:
    return tuple(sorted(problem.params.items()))


@functools.lru_cache(maxsize=None)
def _oracle(name: str, params: tuple):
    """(λ₀, ∇F(λ₀), w*(λ₀)) in float64 numpy: backend-free, computed once per instance."""
    problem = _make(name, _any_backend(), "float64", params)
    lam = problem.initial_hyperparams()
    return lam, problem.exact_hypergradient(lam), problem.exact_inner_solution(lam)


def oracle_and_lam(problem):
    lam, exact, _ = _oracle(problem.name, _params_key(problem))
    return exact, lam.copy()


def exact_w(problem):
    return _oracle(problem.name, _params_key(problem))[2]


@functools.lru_cache(maxsize=None)
def _t_large(name: str) -> int:
    q = _make(name, _any_backend(), "float64",
              tuple(sorted(SMALL[name].items()))).contraction_factor()
    if not q < 1:
        raise AssertionError(f"{name}: Φ is not a contraction (q = {q}); fix SMALL params")
    t = math.ceil(math.log(Q_POWER_TARGET) / math.log(q))
    if t > T_CAP:
        raise AssertionError(f"{name} with {SMALL[name]} has q = {q:.5f}: t = {t} > {T_CAP} "
                             f"steps needed; choose better-conditioned test parameters")
    return max(t, 8)


def t_large(problem) -> int:
    return _t_large(problem.name)


def run(name: str, problem, lam, **kwargs):
    need_algorithm(name, problem.backend)
    if not algorithms.spec(name).uses_K:
        kwargs.pop("K", None)
    return algorithms.get(name, backend=problem.backend)(problem, lam, **kwargs)


def hg(result) -> np.ndarray:
    """The estimate as float64 numpy."""
    return _to_numpy(result.hypergrad)


def _to_numpy(x) -> np.ndarray:
    """A backend array as float64 numpy, through that backend's ``ops.to_numpy``."""
    backend = "torch" if type(x).__module__.startswith("torch") else "jax"
    return np.asarray(problems.base.load_ops(backend).to_numpy(x), dtype=np.float64)


def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖ (b the reference); absolute when b = 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (scale if scale > 0 else 1.0))


def rel_diff(a, b) -> float:
    """Symmetric relative difference ‖a − b‖ / max(‖a‖, ‖b‖) (0 when both are 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else 0.0


def applies(name: str, problem) -> bool:
    if not algorithms.applicable(name, problem.capabilities):
        return False
    return not (name == "aid_exact" and int(np.prod(problem.w_shape)) > BIG_W)


ALL_PROBLEMS = problems.names()
backend_param = pytest.mark.parametrize("backend", BACKENDS)
problem_param = pytest.mark.parametrize("problem_name", ALL_PROBLEMS)


# -- accuracy at large t and K --------------------------------------------------------------
@backend_param
@problem_param
@pytest.mark.parametrize("algo", CONSISTENT)
def test_matches_oracle_at_large_t(backend, problem_name, algo):
    problem = get_problem(problem_name, backend)
    if not applies(algo, problem):
        pytest.skip(f"{algo} does not apply to {problem_name}")
    exact, lam = oracle_and_lam(problem)
    t = t_large(problem)
    extra = {"batch_size": FULL_BATCH} if algo == "stocbio" else {}
    K = 1000 if algo == "aid_cg" else t  # CG stops at its tolerance long before 1000
    out = run(algo, problem, lam, t=t, K=K, **extra)
    got = hg(out)
    assert got.shape == problem.lam_shape
    assert np.all(np.isfinite(got))
    err = rel_err(got, exact)
    assert err <= ORACLE_RTOL, f"{algo} on {problem_name}: rel error {err:.2e} at t={t}"
    w_err = rel_err(_to_numpy(out.w_t), exact_w(problem))
    assert w_err <= ORACLE_RTOL, f"{algo} on {problem_name}: w_t rel error {w_err:.2e}"
    assert out.n_inner_grad_evals >= t
    if algo.startswith("aid_") and algo != "aid_exact":
        assert 0 <= out.solver_iters <= K


@backend_param
@problem_param
@pytest.mark.parametrize("algo", ("itd", "aid_fp", "aid_cg"))
def test_error_non_increasing_in_t(backend, problem_name, algo):
    problem = get_problem(problem_name, backend)
    exact, lam = oracle_and_lam(problem)
    t_max = t_large(problem)
    grid = sorted({max(1, t_max >> k) for k in range(4)})  # t_max/8, t_max/4, t_max/2, t_max
    errors = [rel_err(hg(run(algo, problem, lam, t=t, K=t)), exact) for t in grid]
    # Slack 1e-12: once the error reaches float64 rounding it may wobble at that level.
    for (t0, e0), (t1, e1) in zip(zip(grid, errors), zip(grid[1:], errors[1:])):
        assert e1 <= e0 + 1e-12, (f"{algo} on {problem_name}: error rose from {e0:.3e} "
                                  f"(t={t0}) to {e1:.3e} (t={t1}); grid {grid}: {errors}")
    assert errors[-1] < errors[0] or errors[0] <= 1e-12


# -- identities -----------------------------------------------------------------------------
@backend_param
@problem_param
def test_tbptt_with_K_ge_t_is_itd(backend, problem_name):
    problem = get_problem(problem_name, backend)
    _, lam = oracle_and_lam(problem)
    t = t_large(problem)
    b = hg(run("itd", problem, lam, t=t))
    for K in (t, t + 7):
        assert rel_diff(hg(run("tbptt", problem, lam, t=t, K=K)), b) <= IDENTITY_RTOL, K


@backend_param
@problem_param
@pytest.mark.parametrize("K", (0, 3, 10))
def test_neumann_K_is_fixed_point_K_plus_1(backend, problem_name, K):
    problem = get_problem(problem_name, backend)
    _, lam = oracle_and_lam(problem)
    t = t_large(problem)
    neumann = run("aid_neumann", problem, lam, t=t, K=K)
    fp = run("aid_fp", problem, lam, t=t, K=K + 1)
    assert rel_diff(hg(neumann), hg(fp)) <= IDENTITY_RTOL


@backend_param
@problem_param
def test_one_step_is_itd_at_t1_and_tbptt_K1(backend, problem_name):
    problem = get_problem(problem_name, backend)
    _, lam = oracle_and_lam(problem)
    assert rel_diff(hg(run("one_step", problem, lam, t=1)),
                    hg(run("itd", problem, lam, t=1))) <= IDENTITY_RTOL
    t = t_large(problem)
    assert rel_diff(hg(run("one_step", problem, lam, t=t)),
                    hg(run("tbptt", problem, lam, t=t, K=1))) <= IDENTITY_RTOL


@backend_param
@problem_param
def test_first_order_is_tbptt_K0(backend, problem_name):
    problem = get_problem(problem_name, backend)
    _, lam = oracle_and_lam(problem)
    t = t_large(problem)
    a = hg(run("first_order", problem, lam, t=t))
    b = hg(run("tbptt", problem, lam, t=t, K=0))
    assert rel_diff(a, b) <= IDENTITY_RTOL


@backend_param
@problem_param
def test_forward_mode_is_reverse_mode(backend, problem_name):
    problem = get_problem(problem_name, backend)
    _, lam = oracle_and_lam(problem)
    for t in (3, t_large(problem)):  # short: far from w*, where the two differ most
        a = hg(run("itd_forward", problem, lam, t=t))
        b = hg(run("itd", problem, lam, t=t))
        assert rel_diff(a, b) <= IDENTITY_RTOL, f"t={t}"


@backend_param
@problem_param
def test_cg_at_large_K_is_exact_solve(backend, problem_name):
    problem = get_problem(problem_name, backend)
    if not applies("aid_exact", problem):
        pytest.skip("dim w too large for the dense solve")
    _, lam = oracle_and_lam(problem)
    t = t_large(problem)
    cg = run("aid_cg", problem, lam, t=t, K=1000)
    exact = run("aid_exact", problem, lam, t=t)
    # CG stops at relative residual 1e-12; the adjoint error is ≤ κ(H)·1e-12 with
    # κ(H) ≈ 1/(1 − q) ≲ 10 for these instances, so 1e-9 has ≥ 10× room.
    assert rel_diff(hg(cg), hg(exact)) <= 1e-9
    assert cg.solver_iters < 1000


@backend_param
@pytest.mark.parametrize("problem_name", [n for n in ALL_PROBLEMS
                                          if "minibatch" in problems.spec(n).capabilities])
@pytest.mark.parametrize("K", (0, 10))
def test_stocbio_full_batch_is_aid_neumann(backend, problem_name, K):
    problem = get_problem(problem_name, backend)
    _, lam = oracle_and_lam(problem)
    t = t_large(problem)
    stoc = run("stocbio", problem, lam, t=t, K=K, batch_size=FULL_BATCH)
    neumann = run("aid_neumann", problem, lam, t=t, K=K)
    assert neumann.solver_iters == K, "aid_neumann stopped early; pick a smaller K"
    assert rel_diff(hg(stoc), hg(neumann)) <= IDENTITY_RTOL


@backend_param
def test_stocbio_minibatch_is_seeded(backend):
    problem = get_problem("ridge", backend)
    _, lam = oracle_and_lam(problem)
    t = t_large(problem)
    a = hg(run("stocbio", problem, lam, t=t, K=20, seed=1, batch_size=8))
    b = hg(run("stocbio", problem, lam, t=t, K=20, seed=1, batch_size=8))
    c = hg(run("stocbio", problem, lam, t=t, K=20, seed=2, batch_size=8))
    np.testing.assert_array_equal(a, b)  # same seed, same batches, same number
    assert rel_diff(a, c) > 1e-8, "different seeds gave the same batches"
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(c))


# -- linear rate ----------------------------------------------------------------------------
@backend_param
@pytest.mark.parametrize("algo", ("itd", "aid_fp"))
def test_linear_rate_on_quadratic(backend, algo):
    problem = get_problem("quadratic", backend)
    exact, lam = oracle_and_lam(problem)
    q = problem.contraction_factor()
    # Fit where errors lie in [~1e-11, ~1e-3]: above the float64 floor, past the transient.
    t_lo = math.ceil(math.log(1e-3) / math.log(q))
    t_hi = math.floor(math.log(1e-10) / math.log(q))
    ts = np.linspace(t_lo, t_hi, 8).round().astype(int)
    errors = np.array([rel_err(hg(run(algo, problem, lam, t=int(t), K=int(t))), exact)
                       for t in ts])
    assert errors.min() > 1e-12, f"fit range reaches the float64 floor: {errors}"
    slope = np.polyfit(ts, np.log(errors), 1)[0]
    # Theory: error = O(q^t) (the map is affine, so no polynomial factor). Allow 2 % of
    # |log q| for the mixture of slower-decaying modes in a finite window; and the rate
    # must not be implausibly fast either (the slowest mode, rate q, is always excited).
    assert slope <= math.log(q) + 0.02 * abs(math.log(q)), (slope, math.log(q), errors)
    assert slope >= 2.0 * math.log(q) - 0.02, (slope, math.log(q), errors)


# -- float32 --------------------------------------------------------------------------------
@backend_param
@pytest.mark.parametrize("problem_name", ("ridge", "logreg"))
@pytest.mark.parametrize("algo", algorithms.names("hypergradient"))
def test_float32_close_to_float64(backend, problem_name, algo):
    p64 = get_problem(problem_name, backend)
    p32 = get_problem(problem_name, backend, dtype="float32")
    if not applies(algo, p64):
        pytest.skip(f"{algo} does not apply to {problem_name}")
    _, lam = oracle_and_lam(p64)
    t = t_large(p64)
    extra = {"batch_size": FULL_BATCH} if algo == "stocbio" else {}
    K = 1000 if algo == "aid_cg" else t
    h64 = hg(run(algo, p64, lam, t=t, K=K, **extra))
    out32 = run(algo, p32, lam, t=t, K=K, **extra)
    assert str(out32.hypergrad.dtype).endswith("float32")
    h32 = hg(out32)
    assert np.all(np.isfinite(h32))
    # float32 rounding (6e-8) of the data and of every step, amplified by κ(H) ≲ 5 for
    # these instances and by CG's float32 stopping tolerance 1e-6: 1e-4 leaves ≥ 10×.
    assert rel_diff(h32, h64) <= 1e-4


def test_jax_cg_guards_keep_float32_finite():
    """The CG primitive itself: budget honoured, no NaN, sane stops (JAX only)."""
    core = _jax_core()
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    solve = jax.jit(lambda diag, b, budget: core.cg(lambda p: diag * p, b, budget, 1e-6))
    b = jnp.asarray(rng.standard_normal(400), jnp.float32)
    # κ = 1e8 in float32: CG cannot reach 1e-6; it must spend the budget and stay finite.
    x, iters, rel = solve(jnp.asarray(np.logspace(-8, 0, 400), jnp.float32), b, 1000)
    assert int(iters) == 1000 and bool(jnp.all(jnp.isfinite(x))) and np.isfinite(float(rel))
    # κ = 1e2: converges, and the recursive residual it reports is the true one (≈ 1e-6).
    diag = jnp.asarray(np.logspace(-2, 0, 400), jnp.float32)
    x, iters, rel = solve(diag, b, 1000)
    assert int(iters) < 1000 and float(rel) <= 1e-6
    assert float(jnp.linalg.norm(diag * x - b) / jnp.linalg.norm(b)) <= 1e-5
    # Indefinite operator: pᵀAp = Σ diag = 0 at the first step → stop, x = 0, no NaN.
    x, iters, _ = solve(jnp.asarray(np.repeat([-1.0, 1.0], 200), jnp.float32),
                        jnp.ones(400, jnp.float32), 1000)
    assert int(iters) == 1 and float(jnp.abs(x).max()) == 0.0
    # Zero right-hand side: zero iterations, zero solution.
    x, iters, rel = solve(diag, jnp.zeros(400, jnp.float32), 1000)
    assert int(iters) == 0 and float(jnp.abs(x).max()) == 0.0 and float(rel) == 0.0


@backend_param
@pytest.mark.parametrize("problem_name,params", [
    # n_train < n_features and penalty e^-8: H has eigenvalues from ~3e-4 to ~O(1).
    ("logreg", dict(n_train=20, n_val=20, n_test=10, n_features=30, lam0=-8.0)),
    ("ridge", dict(n_features=30, n_train=10, n_val=20, lam0=-10.0)),
])
def test_cg_stops_on_ill_conditioned_float32(backend, problem_name, params):
    problem = get_problem(problem_name, backend, dtype="float32", **params)
    lam = problem.initial_hyperparams()
    out = run("aid_cg", problem, lam, t=200, K=1000)
    assert np.all(np.isfinite(hg(out)))
    assert 1 <= out.solver_iters < 1000


# -- bad input ------------------------------------------------------------------------------
@backend_param
def test_bad_input_raises_value_error(backend):
    problem = get_problem("ridge", backend)
    lam = problem.initial_hyperparams()
    with pytest.raises(ValueError, match=r"aid_cgg.*Valid choices:.*aid_cg"):
        algorithms.get("aid_cgg", backend=backend)
    with pytest.raises(ValueError, match=r"backend 'jaxx'.*Valid choices: jax, torch"):
        algorithms.get("itd", backend="jaxx")
    need_algorithm("aid_cg", backend)
    estimator = algorithms.get("aid_cg", backend=backend)
    with pytest.raises(ValueError, match=r"\bt must be an integer >= 1; got 0"):
        estimator(problem, lam, t=0, K=3)
    with pytest.raises(ValueError, match=r"\bt must be an integer >= 1; got 2.5"):
        estimator(problem, lam, t=2.5, K=3)
    with pytest.raises(ValueError, match=r"\bK must be an integer >= 0; got -1"):
        estimator(problem, lam, t=3, K=-1)
    with pytest.raises(ValueError, match=r"\bK must be an integer >= 0.*None"):
        estimator(problem, lam, t=3)
    with pytest.raises(ValueError, match=r"lam .*must have shape \(5,\).*got shape \(4,\)"):
        estimator(problem, np.zeros(4), t=3, K=3)
    with pytest.raises(ValueError, match=r"Unknown parameter 'tol'.*Valid choices: \(none\)"):
        estimator(problem, lam, t=3, K=3, tol=1e-3)
    need_algorithm("stocbio", backend)
    stoc = algorithms.get("stocbio", backend=backend)
    with pytest.raises(ValueError, match=r"batch_size.*got 0"):
        stoc(problem, lam, t=3, K=3, batch_size=0)
    with pytest.raises(ValueError, match=r"neumann_lr.*got -1"):
        stoc(problem, lam, t=3, K=3, neumann_lr=-1.0)
    with pytest.raises(ValueError, match=r"Unknown parameter 'batchsize'.*batch_size"):
        stoc(problem, lam, t=3, K=3, batchsize=8)
    other = get_problem("ridge", "torch" if backend == "jax" else "jax")
    with pytest.raises(ValueError, match=r"problem is on backend"):
        estimator(other, lam, t=3, K=3)


# -- JAX compilation ------------------------------------------------------------------------
def _jax_core():
    need_algorithm("aid_cg", "jax")
    return importlib.import_module("hypersweep.algorithms.jax._core")


@pytest.mark.parametrize("algo", ("aid_cg", "aid_fp", "aid_neumann"))
def test_jax_aid_does_not_recompile_for_new_t_or_K(algo):
    core = _jax_core()
    # Shapes used by no other test, so the first call must compile (the counter works).
    problem = get_problem("ridge", "jax", n_features=7, n_train=11)
    lam = problem.initial_hyperparams()
    estimator = algorithms.get(algo, backend="jax")
    key = algo
    before = core.trace_counts[key]
    first = hg(estimator(problem, lam, t=5, K=2))
    assert core.trace_counts[key] == before + 1
    second = hg(estimator(problem, lam, t=40, K=9, seed=3))
    third = hg(estimator(problem, lam, t=1, K=0))
    assert core.trace_counts[key] == before + 1, "a new t or K recompiled"
    assert rel_diff(first, second) > 1e-6 and rel_diff(second, third) > 1e-6  # t, K used


def test_jax_itd_compiles_once_per_power_of_two_bucket():
    core = _jax_core()
    problem = get_problem("ridge", "jax", n_features=6, n_train=13)
    lam = problem.initial_hyperparams()
    itd = algorithms.get("itd", backend="jax")
    for bucket, ts in ((8, (5, 8, 6, 7)), (16, (9, 16, 12))):
        key = f"itd_reverse[bucket={bucket}]"
        before = core.trace_counts[key]
        results = [hg(itd(problem, lam, t=t)) for t in ts]
        assert core.trace_counts[key] == before + 1, f"t in {ts} compiled more than once"
        assert all(rel_diff(a, b) > 1e-8 for a, b in zip(results, results[1:]))
    forward = algorithms.get("itd_forward", backend="jax")
    before = core.trace_counts["itd_forward"]
    for t in (3, 17, 100):
        forward(problem, lam, t=t)
    assert core.trace_counts["itd_forward"] == before + 1
