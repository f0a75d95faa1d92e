"""PyTorch estimators: torch ↔ JAX parity, plus a torch-only sanity set on ridge.

Parity: the same (problem, λ, t, K, seed) in float64 on both backends. Both evaluate the
same formulas (problems are written once against an ``ops`` namespace) and the same
recursions, so they differ only by rounding order (BLAS vs XLA reductions, fused ops):
≈1e-16 per operation, propagated through ≤ 40 contractive inner steps and ≤ 15 solver
steps on instances with κ(H) ≲ 1e2, i.e. ≲ 1e-12. PARITY_RTOL = 1e-8 keeps ≥ 1e3 of room
for that and for the one discrete decision rounding can move — an early solver stop at
relative residual 1e-12 taken one iteration apart, which changes v by ≤ κ·1e-12 — while
any real difference (a sign, a factor η, a missing term, a step off by one: all O(1e-2)
or more here) still fails. stocbio is compared with full batches only: the two backends
draw minibatches from different RNGs.

Every module here is the project's own: one that fails to import fails its tests, it is
never skipped.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from estimator_calls import FULL_BATCH, full_batch, run

from hypersweep import algorithms, problems
from hypersweep.algorithms.torch import _core
from hypersweep.problems import base

PARITY_RTOL = 1e-8
W_PARITY_RTOL = 1e-10   # w_t: t contractive steps only, no solve — rounding ≲ 1e-14
IDENTITY_RTOL = 1e-10   # equal in exact arithmetic; float64 rounding over ≤ a few 100 steps
ORACLE_RTOL = 1e-6      # t large enough that q^t ≤ 1e-11 (checked below)
PARITY_T, PARITY_K = 40, 15

# Every problem is compared on its catalog ``small`` instance (fast on 2 cores).
# The estimators implemented once per backend (not the backend-free float64 oracle).
HYPERGRADIENT_ALGOS = [n for n in algorithms.names("estimator")
                       if len(set(algorithms.spec(n).impls.values())) > 1]


@functools.lru_cache(maxsize=None)
def _make(name: str, backend: str, dtype: str, params: tuple):
    return problems.make(name, backend=backend, seed=0, dtype=dtype, **dict(params))


def get_problem(name: str, backend: str, dtype: str = "float64", **extra):
    params = {**problems.spec(name).small, **extra}
    return _make(name, backend, dtype, tuple(sorted(params.items())))


def perturbed_lam(problem) -> np.ndarray:
    """λ₀ moved by a fixed random offset, so no test sits at a special point (λ = 0)."""
    lam = problem.initial_hyperparams()
    offset = np.random.default_rng(1234).standard_normal(lam.shape)
    return lam + 0.1 * offset


def to_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def rel_diff(a, b) -> float:
    a, b = to_np(a), to_np(b)
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else 0.0


def rel_err(a, ref) -> float:
    a, ref = to_np(a), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-300))


# -- torch ↔ JAX parity ---------------------------------------------------------------------
@pytest.mark.parametrize("problem_name", problems.names())
@pytest.mark.parametrize("algo", HYPERGRADIENT_ALGOS)
def test_torch_matches_jax(problem_name, algo):
    p_torch = get_problem(problem_name, "torch")
    p_jax = get_problem(problem_name, "jax")
    if not algorithms.applicable(algo, p_torch.capabilities):
        pytest.skip(f"{algo} does not apply to {problem_name}")
    lam = perturbed_lam(p_torch)
    kwargs = dict(t=PARITY_T, K=PARITY_K, seed=3, **full_batch(algo))
    a = run(algo, p_torch, lam, **kwargs)
    b = run(algo, p_jax, lam, **kwargs)
    assert isinstance(a.hypergrad, torch.Tensor) and not a.hypergrad.requires_grad
    assert a.hypergrad.dtype == torch.float64 and tuple(a.hypergrad.shape) == p_torch.lam_shape
    diff = rel_diff(a.hypergrad, b.hypergrad)
    assert diff <= PARITY_RTOL, f"{algo} on {problem_name}: torch vs jax rel diff {diff:.2e}"
    assert rel_diff(a.w_t, b.w_t) <= W_PARITY_RTOL
    # Same counting conventions on both backends.
    assert (a.n_inner_grad_evals, a.n_hvp_evals, a.solver_iters) == \
        (b.n_inner_grad_evals, b.n_hvp_evals, b.solver_iters)


# -- torch-only sanity set on ridge ---------------------------------------------------------
@pytest.fixture(scope="module", params=[True, False], ids=["per_feature", "scalar"])
def ridge(request):
    return get_problem("ridge", "torch", per_feature=request.param)


def _t_large(problem) -> int:
    q = problem.contraction_factor()
    t = int(np.ceil(np.log(1e-11) / np.log(q)))
    assert q < 1 and t <= 3000, f"ridge test instance too ill-conditioned (q = {q})"
    return t


@pytest.mark.parametrize("algo", HYPERGRADIENT_ALGOS)
def test_torch_matches_exact_on_ridge(ridge, algo):
    lam = perturbed_lam(ridge)
    exact = ridge.exact_hypergradient(lam)
    t = _t_large(ridge)
    out = run(algo, ridge, lam, t=t, K=1000 if algo == "aid_cg" else t, **full_batch(algo))
    err = rel_err(out.hypergrad, exact)
    if not algorithms.spec(algo).consistent:  # first_order, one_step
        # Biased by design: the estimate must be finite and *not* the hypergradient (a
        # sanity check that the implicit term is really dropped / truncated).
        assert np.all(np.isfinite(to_np(out.hypergrad))) and err > 1e-3
        return
    assert err <= ORACLE_RTOL, f"{algo}: rel error {err:.2e} at t={t}"
    assert rel_err(out.w_t, ridge.exact_inner_solution(lam)) <= ORACLE_RTOL


def _ridge_unrolled_reference(problem, lam, t: int, k: int) -> np.ndarray:
    """d/dh L_out(w_t) through the last k steps, by the forward recursion in numpy.

    Ridge: g = A w − c + e^h ⊙ w with A = (2/n)XᵀX, c = (2/n)Xᵀy, so
    Z_{s+1} = (I − η(A + diag e^h)) Z_s − η diag(e^h ⊙ w_s) [summed to one column for a
    scalar h], Z_{t−k} = 0, and the estimate is Z_tᵀ ∇_w L_out(w_t) (L_out has no h).
    """
    arr = problem.arrays_np
    X, y, Xv, yv = arr["X_train"], arr["y_train"], arr["X_val"], arr["y_val"]
    n, d = X.shape
    A, c = 2.0 / n * X.T @ X, 2.0 / n * X.T @ y
    e = np.broadcast_to(np.exp(lam), (d,))
    eta = problem.inner_lr
    w = np.zeros(d)
    Z = np.zeros((d, lam.size))
    for s in range(t):
        if s >= t - k:
            dphi_dh = -eta * np.diag(e * w)
            if lam.size == 1:
                dphi_dh = dphi_dh.sum(axis=1, keepdims=True)
            Z = Z - eta * (A @ Z + e[:, None] * Z) + dphi_dh
        w = w - eta * (A @ w - c + e * w)
    grad_out = 2.0 / Xv.shape[0] * Xv.T @ (Xv @ w - yv)
    return (Z.T @ grad_out).reshape(lam.shape)


@pytest.mark.parametrize("t,k", [(1, 1), (7, 7), (30, 5), (30, 1), (30, 0), (30, 30)])
def test_reverse_mode_matches_numpy_recursion(ridge, t, k):
    lam = perturbed_lam(ridge)
    ref = _ridge_unrolled_reference(ridge, lam, t, k)
    assert rel_err(run("tbptt", ridge, lam, t=t, K=k).hypergrad, ref) <= IDENTITY_RTOL
    if k == t:
        assert rel_err(run("itd", ridge, lam, t=t).hypergrad, ref) <= IDENTITY_RTOL
        assert rel_err(run("itd_forward", ridge, lam, t=t).hypergrad, ref) <= IDENTITY_RTOL
    if k == 1:
        assert rel_err(run("one_step", ridge, lam, t=t).hypergrad, ref) <= IDENTITY_RTOL
    if k == 0:
        assert rel_err(run("first_order", ridge, lam, t=t).hypergrad, ref) <= IDENTITY_RTOL


def test_identities_on_ridge(ridge):
    lam = perturbed_lam(ridge)
    t = 60
    itd = run("itd", ridge, lam, t=t)
    assert rel_diff(run("tbptt", ridge, lam, t=t, K=t).hypergrad, itd.hypergrad) <= 1e-12
    assert rel_diff(run("tbptt", ridge, lam, t=t, K=10 * t).hypergrad,
                    itd.hypergrad) <= 1e-12
    assert rel_diff(run("itd_forward", ridge, lam, t=t).hypergrad,
                    itd.hypergrad) <= IDENTITY_RTOL
    assert rel_diff(run("one_step", ridge, lam, t=1).hypergrad,
                    run("itd", ridge, lam, t=1).hypergrad) <= IDENTITY_RTOL
    for K in (0, 1, 4, 25):
        neumann = run("aid_neumann", ridge, lam, t=t, K=K)
        fp = run("aid_fp", ridge, lam, t=t, K=K + 1)
        assert rel_diff(neumann.hypergrad, fp.hypergrad) <= IDENTITY_RTOL
        assert neumann.solver_iters == K and fp.solver_iters == K + 1
        # K products each (aid_fp's first step from 0 is free); the cross term is separate
        assert neumann.n_hvp_evals == fp.n_hvp_evals == K
        assert neumann.n_cross_evals == fp.n_cross_evals == 1
        stoc = run("stocbio", ridge, lam, t=t, K=K, batch_size=FULL_BATCH)
        assert stoc.extras["full_batch"]
        assert rel_diff(stoc.hypergrad, neumann.hypergrad) <= IDENTITY_RTOL
        assert rel_diff(stoc.w_t, neumann.w_t) <= IDENTITY_RTOL
    assert rel_diff(run("aid_fp", ridge, lam, t=t, K=0).hypergrad,
                    run("first_order", ridge, lam, t=t).hypergrad) <= 1e-12


def test_autodiff_fallback_matches_analytic_inner_grad(ridge, monkeypatch):
    """Problems without ``inner_grad`` go through torch.func.grad: same numbers."""
    lam = perturbed_lam(ridge)
    kwargs = dict(t=25, K=8)
    analytic = {a: run(a, ridge, lam, **kwargs, **full_batch(a)) for a in HYPERGRADIENT_ALGOS}
    monkeypatch.setattr(base.ProblemFns, "has_inner_grad", property(lambda self: False))
    assert not ridge.fns.has_inner_grad
    for algo, ref in analytic.items():
        out = run(algo, ridge, lam, **kwargs, **full_batch(algo))
        assert rel_diff(out.hypergrad, ref.hypergrad) <= IDENTITY_RTOL, algo


@pytest.mark.parametrize("algo", ["aid_cg", "aid_fp", "aid_neumann"])
def test_deferred_stop_check_gives_the_same_result(ridge, algo, monkeypatch):
    """On a GPU the stop flag is read every 8 iterations; the frozen iterate must equal
    the per-iteration check exactly (simulated here on the CPU)."""
    lam = perturbed_lam(ridge)
    t = _t_large(ridge)
    every_step = run(algo, ridge, lam, t=t, K=500)
    monkeypatch.setattr(_core, "_sync_every", lambda device: 8)
    deferred = run(algo, ridge, lam, t=t, K=500)
    assert every_step.solver_iters < 500, "no early stop: the test would not test it"
    assert torch.equal(every_step.hypergrad, deferred.hypergrad)
    assert every_step.solver_iters == deferred.solver_iters
    assert deferred.extras["matvecs_computed"] >= every_step.extras["matvecs_computed"]


def test_stocbio_minibatch_uses_batches(ridge):
    lam = perturbed_lam(ridge)
    full = run("stocbio", ridge, lam, t=200, K=20, batch_size=FULL_BATCH)
    a = run("stocbio", ridge, lam, t=200, K=20, seed=5, batch_size=4)
    b = run("stocbio", ridge, lam, t=200, K=20, seed=5, batch_size=4)
    assert torch.equal(a.hypergrad, b.hypergrad) and not a.extras["full_batch"]
    assert rel_diff(a.hypergrad, full.hypergrad) > 1e-6  # batches of 4 of 30 rows are noisy
    assert np.all(np.isfinite(to_np(a.hypergrad)))


@pytest.mark.parametrize("problem_name,params", [
    # n_train ≈ n_features (XᵀX nearly singular) and penalty e^-20: κ(H) ≈ 9e5 with a
    # spread spectrum (float32 CG needs ~250 iterations, float64 ~170).
    ("ridge", dict(n_features=100, n_train=101, n_val=50, lam0=-20.0)),
    # n_train < n_features with penalty e^-8: a cluster of tiny eigenvalues.
    ("logreg", dict(n_train=20, n_val=20, n_test=10, n_features=30, lam0=-8.0)),
])
def test_cg_float32_ill_conditioned_stays_finite(problem_name, params):
    problem = get_problem(problem_name, "torch", dtype="float32", **params)
    out = run("aid_cg", problem, problem.initial_hyperparams(), t=200, K=1000)
    assert out.hypergrad.dtype == torch.float32
    assert torch.isfinite(out.hypergrad).all()
    assert 1 <= out.solver_iters < 1000


# -- the solvers on explicit matrices --------------------------------------------------------
def _spd(n: int, cond: float, dtype=torch.float64) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(0)))
    eig = torch.logspace(0, -np.log10(cond), n, dtype=torch.float64)
    return ((q * eig) @ q.T).to(dtype)


def test_solvers_match_a_direct_solve():
    A = _spd(12, 50.0)
    b = torch.linspace(-1, 2, 12, dtype=torch.float64)
    x_ref = torch.linalg.solve(A, b)
    cg = _core.cg(lambda v: A @ v, b, max_iter=200, tol=1e-12)
    assert rel_err(cg.x, x_ref) <= 1e-10 and cg.iters <= 60
    eta = 1.0 / torch.linalg.eigvalsh(A)[-1].item()  # M = I − ηA, ‖M‖ = 1 − 1/50
    M = lambda v: v - eta * (A @ v)  # noqa: E731
    fp = _core.fixed_point(M, b, max_iter=5000, tol=1e-12)
    nm = _core.neumann(M, b, n_terms=5000, tol=1e-12)
    # v solves ηA v = b; the early stop at ‖M^k b‖ ≤ 1e-12‖b‖ leaves a tail ≤ κ·1e-12.
    assert rel_err(eta * fp.x, x_ref) <= 1e-9 and fp.iters < 5000
    assert rel_err(eta * nm.x, x_ref) <= 1e-9 and nm.iters == fp.iters - 1
    assert (_core.fixed_point(M, b, max_iter=0, tol=1e-12).x == 0).all()
    # rhs = 0: zero solution, no iterations wasted.
    zero = torch.zeros_like(b)
    assert _core.cg(lambda v: A @ v, zero, max_iter=10, tol=1e-12).iters == 0
    assert (_core.neumann(M, zero, n_terms=10, tol=1e-12).x == 0).all()


@pytest.mark.parametrize("diag", [(1.0, 0.0), (1.0, -1.0), (1.0, float("inf"))],
                         ids=["singular", "indefinite", "overflow"])
def test_cg_breakdown_returns_last_finite_iterate(diag):
    """pᵀAp = 0, < 0 or ∞: CG stops before dividing by it and never returns NaN/inf."""
    A = torch.diag(torch.tensor(diag, dtype=torch.float32))
    b = torch.tensor([1.0, 1.0], dtype=torch.float32)
    res = _core.cg(lambda v: A @ v, b, max_iter=1000, tol=1e-6)
    assert torch.isfinite(res.x).all() and res.iters < 1000


@pytest.mark.parametrize("algo", HYPERGRADIENT_ALGOS)
def test_float32_close_to_float64(algo):
    p64 = get_problem("ridge", "torch")
    p32 = get_problem("ridge", "torch", dtype="float32")
    lam = perturbed_lam(p64)
    t = _t_large(p64)
    K = 1000 if algo == "aid_cg" else 50
    h64 = run(algo, p64, lam, t=t, K=K, **full_batch(algo)).hypergrad
    h32 = run(algo, p32, lam, t=t, K=K, **full_batch(algo)).hypergrad
    assert h32.dtype == torch.float32
    # float32 data and steps (rounding 6e-8) amplified by κ(H) = 1/(1 − q) ≈ 2.2 on this
    # instance (q = 0.55) and by CG's float32 stop at residual 1e-6: observed ≤ 5e-7;
    # 1e-5 leaves 20× of room and still fails for any float32-specific defect.
    assert rel_diff(h32, h64) <= 1e-5
