"""Hypergradient estimators against float64 oracles, identities, rates, dtypes, bad input.

Backend-generic: every test runs for "jax" and "torch" through the public API only
(``problems.make``, ``algorithms.get``, ``problem.exact_hypergradient``, ``ops.to_numpy``).
Every module is the project's own, so one that fails to import fails its tests (it is
never a skip). The JAX compile-count tests at the end are JAX-only.

Tolerances (float64 unless stated):
* oracle match 1e-6 (relative, ‖·‖₂): t is chosen per problem so that q^t ≤ 1e-10
  (q = contraction factor), which leaves ≥ 1e3 of room for the constants in the
  O(t q^t) / O(q^t) bounds and the κ·1e-12 solver tolerance;
* algebraic identities 1e-10: the two sides are the same number in exact arithmetic and
  differ only by float64 rounding accumulated over ≤ a few hundred steps.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import itertools
import math

import jax_traces
import numpy as np
import pytest
from estimator_calls import FULL_BATCH, full_batch, run

from hypersweep import algorithms, problems
from hypersweep.problems import base

BACKENDS = ("jax", "torch")

# Every problem is tested on its catalog ``small`` instance, whose inner map contracts with
# q ≲ 0.9, so t = log(1e-10)/log(q) ≲ 220.
T_CAP = 3000          # more inner steps than this means the test instance is too ill-posed
Q_POWER_TARGET = 1e-10  # t is chosen so that q^t ≤ this
ORACLE_RTOL = 1e-6
IDENTITY_RTOL = 1e-10
BIG_W = 200            # aid_exact (dense Hessian) is skipped above this dim w
# the estimators that must reach the oracle at large t and K (the catalog's flag)
CONSISTENT = [n for n in algorithms.names("estimator") if algorithms.spec(n).consistent]


# -- helpers --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _make(name: str, backend: str, dtype: str, params: tuple):
    return problems.make(name, backend=backend, seed=0, dtype=dtype, **dict(params))


ORACLE_BACKEND = "jax"  # the oracles are float64 numpy: any backend builds the same ones


def small(name: str) -> dict:
    """The catalog's small instance of ``name``."""
    return dict(problems.spec(name).small)


def get_problem(name: str, backend: str, dtype: str = "float64", **extra):
    """The small instance of ``name`` (updated by ``extra``)."""
    return _make(name, backend, dtype, tuple(sorted({**small(name), **extra}.items())))


def _params_key(problem) -> tuple:
    return tuple(sorted(problem.params.items()))


@functools.lru_cache(maxsize=None)
def _oracle(name: str, params: tuple):
    """(λ₀, ∇F(λ₀), w*(λ₀)) in float64 numpy: backend-free, computed once per instance."""
    problem = _make(name, ORACLE_BACKEND, "float64", params)
    lam = problem.initial_hyperparams()
    return lam, problem.exact_hypergradient(lam), problem.exact_inner_solution(lam)


def oracle_and_lam(problem):
    lam, exact, _ = _oracle(problem.name, _params_key(problem))
    return exact, lam.copy()


def exact_w(problem):
    return _oracle(problem.name, _params_key(problem))[2]


@functools.lru_cache(maxsize=None)
def _t_large(name: str) -> int:
    q = _make(name, ORACLE_BACKEND, "float64",
              tuple(sorted(small(name).items()))).contraction_factor()
    if not q < 1:
        raise AssertionError(f"{name}: Φ is not a contraction (q = {q}); fix its catalog "
                             f"small instance")
    t = math.ceil(math.log(Q_POWER_TARGET) / math.log(q))
    if t > T_CAP:
        raise AssertionError(f"{name} with {small(name)} has q = {q:.5f}: t = {t} > {T_CAP} "
                             f"steps needed; choose better-conditioned test parameters")
    return max(t, 8)


def t_large(problem) -> int:
    return _t_large(problem.name)


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
    K = 1000 if algo == "aid_cg" else t  # CG stops at its tolerance long before 1000
    out = run(algo, problem, lam, t=t, K=K, **full_batch(algo))
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
# rel_diff(float32 estimate, float64 estimate) at t = t_large, K as in the test; measured
# (JAX 0.10.2, torch 2.13 CPU) as the max over both backends:
#
#                 ridge   logreg              ridge   logreg
#   itd          1.3e-7   4.1e-7   aid_fp    4.0e-7   5.1e-7
#   itd_forward  1.4e-7   1.7e-7   aid_neum  5.8e-7   1.9e-7
#   tbptt        1.3e-7   4.1e-7   aid_exact 7.5e-8   4.1e-7
#   one_step     1.8e-7   3.1e-7   stocbio   1.3e-7   4.5e-8
#   aid_cg       2.6e-7   3.3e-7   exact     6.2e-9   1.7e-8
#   first_order  0        0        (∇_λ L_out ≡ 0 on both: the estimate is 0 in any dtype)
#
# i.e. float32 rounding (2⁻²⁴ ≈ 6e-8 per operation) times a small κ(H) ≲ 5. Each limit is
# ~2-3× the largest observed value (room for another CPU's float32 reduction order), far
# below what a float32-specific defect gives: a solver tolerance loosened 100×
# (DEFAULT_TOL["float32"] = 1e-4) makes aid_fp / aid_neumann stop early at ≈ 2e-5-3e-5.
FLOAT32_RTOL = {
    "itd": 1e-6, "itd_forward": 5e-7, "tbptt": 1e-6, "one_step": 7e-7, "first_order": 1e-7,
    "aid_cg": 1e-6, "aid_fp": 1.5e-6, "aid_neumann": 1.5e-6, "aid_exact": 1e-6,
    "stocbio": 5e-7,
    # the float64 oracle rounded once to float32: ≤ 2⁻²⁴ relative
    "exact": 1e-7,
}
# An estimator not measured above gets the table's loosest limit until it is measured.
FLOAT32_RTOL_UNMEASURED = max(FLOAT32_RTOL.values())
# One backend-free function for both backends ("exact") is the float64 numpy oracle by
# definition (only its result is cast); every other estimator must do all of its
# arithmetic in the problem's dtype.
FLOAT64_BY_DESIGN = [n for n in algorithms.names("estimator")
                     if len(set(algorithms.spec(n).impls.values())) == 1]

_CALLS: dict[int, list] = {}
_TOKENS = itertools.count()


def _float_dtypes(*values) -> set:
    """Float dtype names ("float32", ...) of the arrays among ``values`` (dicts opened)."""
    out = set()
    for value in values:
        leaves = value.values() if isinstance(value, dict) else (value,)
        for leaf in leaves:
            name = str(getattr(leaf, "dtype", "")).removeprefix("torch.")
            if name.startswith(("float", "bfloat", "complex")):
                out.add(name)
    return out


@dataclasses.dataclass(frozen=True)
class _RecordingFns(base.ProblemFns):
    """The problem's functions, logging the float dtypes of every call's inputs and result.

    ``token`` is unique per use, so this is a new static argument for ``jax.jit``: JAX
    traces afresh and the log is written at trace time, where the tracers carry the
    dtypes the compiled code works in. Torch calls are logged as they run.
    """

    token: int = 0

    def _log(self, name, result, *inputs):
        _CALLS[self.token].append((name, frozenset(_float_dtypes(result, *inputs))))
        return result

    def inner_loss(self, w, lam, arrays):
        return self._log("inner_loss", super().inner_loss(w, lam, arrays), w, lam, arrays)

    def outer_loss(self, w, lam, arrays):
        return self._log("outer_loss", super().outer_loss(w, lam, arrays), w, lam, arrays)

    def inner_grad(self, w, lam, arrays):
        return self._log("inner_grad", super().inner_grad(w, lam, arrays), w, lam, arrays)

    def inner_loss_batch(self, w, lam, arrays, idx):
        return self._log("inner_loss_batch", super().inner_loss_batch(w, lam, arrays, idx),
                         w, lam, arrays)

    def outer_loss_batch(self, w, lam, arrays, idx):
        return self._log("outer_loss_batch", super().outer_loss_batch(w, lam, arrays, idx),
                         w, lam, arrays)


def recording(problem):
    """(a shallow copy of ``problem`` whose ``fns`` log their dtypes, the log)."""
    token = next(_TOKENS)
    _CALLS[token] = []
    clone = copy.copy(problem)
    fns = problem.fns
    clone.fns = _RecordingFns(fns.module_name, fns.static_items, fns.backend, token)
    return clone, _CALLS[token]


def _torch_float64_op_log():
    """A TorchDispatchMode collecting every aten op (forward and autograd backward) that
    returns a float64 tensor: none may run in a float32 estimator."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Float64Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # Not arithmetic: lift_fresh wraps host data as it is (the caller's float64
            # numpy λ, before its cast to the problem's dtype); forward AD gives a Python
            # scalar (a float64 "wrapped number", which never promotes) a zero tangent by
            # _efficientzerotensor, shape-checked on the meta device.
            if func in (torch.ops.aten.lift_fresh.default,
                        torch.ops.aten._efficientzerotensor.default):
                return out
            if any(isinstance(x, torch.Tensor) and x.dtype == torch.float64
                   and x.device.type != "meta" for x in tree_leaves(out)):
                self.ops.append(str(func))
            return out

    return Float64Ops()


@backend_param
@pytest.mark.parametrize("problem_name", ("ridge", "logreg"))
@pytest.mark.parametrize("algo", algorithms.names("estimator"))
def test_float32_works_in_float32_and_is_close_to_float64(backend, problem_name, algo):
    p64 = get_problem(problem_name, backend)
    if not applies(algo, p64):
        pytest.skip(f"{algo} does not apply to {problem_name}")
    p32, calls = recording(get_problem(problem_name, backend, dtype="float32"))
    _, lam = oracle_and_lam(p64)
    t = t_large(p64)
    extra = full_batch(algo)
    K = 1000 if algo == "aid_cg" else t
    h64 = hg(run(algo, p64, lam, t=t, K=K, **extra))
    if backend == "torch":
        with _torch_float64_op_log() as float64_ops:
            out32 = run(algo, p32, lam, t=t, K=K, **extra)
    else:
        out32 = run(algo, p32, lam, t=t, K=K, **extra)
    # The working dtype, not only the result's: a float64 computation cast back to float32
    # at the end has the right result dtype and passes any tolerance a float32 run passes.
    assert str(out32.hypergrad.dtype).endswith("float32")
    assert str(out32.w_t.dtype).endswith("float32")
    if "v" in out32.extras:  # the adjoint (AID): the solver's own iterate
        assert str(out32.extras["v"].dtype).endswith("float32")
    if algo not in FLOAT64_BY_DESIGN:
        assert calls, "the estimator never called the problem's functions"
        wrong = sorted({(name, tuple(sorted(d))) for name, d in calls if d != {"float32"}})
        assert not wrong, f"{algo}: problem functions called with/returning {wrong}"
        if backend == "torch":
            assert not float64_ops.ops, f"{algo}: float64 ops {sorted(set(float64_ops.ops))}"
    h32 = hg(out32)
    assert np.all(np.isfinite(h32))
    diff = rel_diff(h32, h64)
    limit = FLOAT32_RTOL.get(algo, FLOAT32_RTOL_UNMEASURED)
    assert diff <= limit, f"{algo} on {problem_name}: float32 off by {diff:.2e}"


@pytest.mark.parametrize("problem_name", ALL_PROBLEMS)
def test_jax_problem_math_in_float32_has_no_float64_in_its_jaxpr(problem_name):
    """Every intermediate of the losses, the analytic gradient and their derivatives, as
    traced by ``jax.make_jaxpr`` at float32 inputs, is float32 (ints aside)."""
    import jax
    import jax.numpy as jnp

    problem = get_problem(problem_name, "jax", dtype="float32")
    fns, arrays = problem.fns, problem.arrays
    w = problem.w_init
    lam = jnp.asarray(problem.initial_hyperparams(), jnp.float32)
    programs = {"inner_loss": fns.inner_loss, "outer_loss": fns.outer_loss,
                "grad inner_loss": jax.grad(fns.inner_loss, argnums=(0, 1)),
                "grad outer_loss": jax.grad(fns.outer_loss, argnums=(0, 1))}
    if fns.has_inner_grad:
        programs["inner_grad"] = fns.inner_grad
        programs["vjp inner_grad"] = lambda w_, lam_, arr: jax.vjp(
            lambda a, b: fns.inner_grad(a, b, arr), w_, lam_)[1](w_)
    for name, fn in programs.items():
        dtypes = _jaxpr_float_dtypes(jax.make_jaxpr(fn)(w, lam, arrays).jaxpr)
        assert dtypes == {"float32"}, f"{problem_name} {name}: {dtypes}"


def _jaxpr_float_dtypes(jaxpr) -> set:
    """Float dtype names of every variable and literal in ``jaxpr`` and its sub-jaxprs."""
    out = set()
    for var in (*jaxpr.invars, *jaxpr.constvars, *jaxpr.outvars):
        out |= _float_dtypes(getattr(var, "aval", None))
    for eqn in jaxpr.eqns:
        for var in (*eqn.invars, *eqn.outvars):
            out |= _float_dtypes(getattr(var, "aval", None))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    out |= _jaxpr_float_dtypes(inner)
    return out


def test_jax_cg_guards_keep_float32_finite():
    """The CG primitive itself: budget honoured, no NaN, sane stops (JAX only)."""
    core = _jax_core()
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    solve = jax.jit(lambda d, b, k: core.cg(lambda p: d * p, b, max_iter=k, tol=1e-6)[:3])
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
    return importlib.import_module("hypersweep.algorithms.jax._core")


@pytest.mark.parametrize("algo", ("aid_cg", "aid_fp", "aid_neumann"))
def test_jax_aid_does_not_recompile_for_new_t_or_K(algo):
    traces = jax_traces.counts()
    # Shapes used by no other test, so the first call must compile (the counter works).
    problem = get_problem("ridge", "jax", n_features=7, n_train=11)
    lam = problem.initial_hyperparams()
    estimator = algorithms.get(algo, backend="jax")
    key = "_aid"  # the jitted body of the three AID solvers
    before = traces[key]
    first = hg(estimator(problem, lam, t=5, K=2))
    assert traces[key] == before + 1
    second = hg(estimator(problem, lam, t=40, K=9, seed=3))
    third = hg(estimator(problem, lam, t=1, K=0))
    assert traces[key] == before + 1, "a new t or K recompiled"
    assert rel_diff(first, second) > 1e-6 and rel_diff(second, third) > 1e-6  # t, K used


def test_jax_itd_compiles_once_per_power_of_two_bucket():
    traces = jax_traces.counts()
    problem = get_problem("ridge", "jax", n_features=6, n_train=13)
    lam = problem.initial_hyperparams()
    itd = algorithms.get("itd", backend="jax")
    for bucket, ts in ((8, (5, 8, 6, 7)), (16, (9, 16, 12))):
        key = "_reverse"  # ITD's jitted reverse pass, traced once per bucket
        before = traces[key]
        results = [hg(itd(problem, lam, t=t)) for t in ts]
        assert traces[key] == before + 1, f"t in {ts} compiled more than once"
        assert all(rel_diff(a, b) > 1e-8 for a, b in zip(results, results[1:]))
    forward = algorithms.get("itd_forward", backend="jax")
    before = traces["_forward"]
    for t in (3, 17, 100):
        forward(problem, lam, t=t)
    assert traces["_forward"] == before + 1
