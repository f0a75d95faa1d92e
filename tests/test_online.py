"""Online methods (hyperdistill, t1t2, greedy): identities, documented biases, parity.

Reference values are independent of the code under test: ``itd``/``one_step`` estimators
(another module), and float64 numpy linear solves for the optimal λ and for the biased
fixed points of the quadratic problem

    L_in = ½ wᵀAw − wᵀ(Bλ + c),  L_out = ½‖w − w_target‖² + (ρ/2)‖λ‖²,  Φ = w − η∇_w L_in,

where w*(λ) = A⁻¹(Bλ + c), ∂_λΦ = ηB and ∂_wΦ = I − ηA. At a stationary point of the
online dynamics (w = w*(λ) between λ updates), each method's estimate is
ρλ + c_method · ηBᵀ(w*(λ) − w_target), with c = 1 for one-step / t1t2 and c = Z_γ(T) =
Σ_{j<T} γ^j for greedy, while the exact ∇F uses BᵀA⁻¹(w* − w_target). So the λ each
method converges to is the root of a linear equation, solved here with numpy.
"""
from __future__ import annotations

import jax_traces
import numpy as np
import pytest

from hypersweep import algorithms, problems
from hypersweep.algorithms.online_common import decay_sum, make_config

ONLINE = ("hyperdistill", "t1t2", "greedy")


def _quadratic(backend="jax", **params):
    return problems.make("quadratic", backend=backend, seed=0, dtype="float64", **params)


def _np(problem, x):
    return problem.ops.to_numpy(x)


def _solve_fixed_point(problem, c: float | None) -> np.ndarray:
    """Root of ρλ + c·ηBᵀ(w*(λ) − w_t) (c given) or of ∇F(λ) = ρλ + BᵀA⁻¹(w* − w_t)."""
    a = problem.arrays_np
    A, B, cv, wt = a["A"], a["B"], a["c"], a["w_target"]
    rho, eta = problem.static["rho"], problem.inner_lr
    Ainv = np.linalg.inv(A)
    left = B.T @ Ainv @ Ainv if c is None else c * eta * B.T @ Ainv
    M = rho * np.eye(B.shape[1]) + left @ B
    return np.linalg.solve(M, -left @ (cv - A @ wt))


def _run(problem, name, *, steps, t, K=0, lr=0.1, **params):
    method = algorithms.get(name, problem.backend)
    state = method.init(problem, problem.initial_hyperparams(), optimizer="sgd",
                        outer_lr=lr, **params)
    for _ in range(steps):
        state, info = method.step(problem, state, t=t, K=K)
    return state, info


def _one(problem, name, *, t, K=0, **params):
    """The hypergradient of one online step from problem.w_init at λ₀."""
    method = algorithms.get(name, problem.backend)
    state = method.init(problem, problem.initial_hyperparams(), **params)
    _, info = method.step(problem, state, t=t, K=K)
    return _np(problem, info.hypergrad)


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


# -- identities with the one-step / ITD estimators -----------------------------------------
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_short_horizon_methods_equal_one_step(backend):
    """γ = 0 (or window 1) reduces every method to one_step at the same t; one_step at
    t = 1 is itd(t=1). Ridge: ∂_λΦ depends on w, so the evaluation point is checked too."""
    p = problems.make("ridge", backend=backend, seed=0, dtype="float64", n_features=8,
                      n_train=30, n_val=20)
    lam = p.initial_hyperparams()
    t = 4
    ref = _np(p, algorithms.get("one_step", backend)(p, lam, t=t).hypergrad)
    assert np.linalg.norm(ref) > 0
    # float64: greedy/hyperdistill are the same products in another order (rtol 1e-12);
    # t1t2 replaces the mixed derivative by a central difference, exact for ridge's
    # ∇_λ L_in (quadratic in w) up to cancellation ~ 1e-16·‖∇_λL_in‖/ε (rtol 1e-8).
    np.testing.assert_allclose(_one(p, "greedy", t=t, gamma=0.0), ref, rtol=1e-12)
    np.testing.assert_allclose(_one(p, "hyperdistill", t=t, gamma=0.0), ref, rtol=1e-12)
    np.testing.assert_allclose(_one(p, "t1t2", t=t), ref, rtol=1e-8)
    # a window of one step is one_step whatever γ; and itd(t=1) == one_step(t=1)
    p1 = p.with_w_init(p.ops.asarray(np.linspace(-1, 1, 8), "float64"))
    itd1 = _np(p1, algorithms.get("itd", backend)(p1, lam, t=1).hypergrad)
    np.testing.assert_allclose(_one(p1, "greedy", t=1, gamma=0.7), itd1, rtol=1e-12)
    np.testing.assert_allclose(_one(p1, "t1t2", t=1), itd1, rtol=1e-8)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_isotropic_quadratic_at_fixed_point_matches_itd(backend):
    """A = μI, q = 1 − ημ = 0.5, started at w*(λ): all iterates stay at w*, so
    ITD(T) = g_FO + α Σ_{j<T} q^j ηB. Greedy with γ = q gives exactly that; HyperDistill
    with θ = 1, γ = q too; and its DrMAD fit (K ≥ T) makes θ Z_γ(T) = Z_q(T) for any γ."""
    p = _quadratic(backend, cond=1.0, inner_lr=0.5, rho=1.0)
    q = p.contraction_factor()
    assert abs(q - 0.5) < 1e-12
    lam = np.linspace(-0.5, 0.5, p.lam_shape[0])
    w_star = p.ops.asarray(p.exact_inner_solution(lam), "float64")
    ps = p.with_w_init(w_star)
    T = 7
    itd = _np(ps, algorithms.get("itd", backend)(ps, lam, t=T).hypergrad)
    g_fo = _np(ps, algorithms.get("first_order", backend)(ps, lam, t=T).hypergrad)
    one = _np(ps, algorithms.get("one_step", backend)(ps, lam, t=T).hypergrad)

    def one_online(name, **kw):
        method = algorithms.get(name, backend)
        _, info = method.step(ps, method.init(ps, lam, **{k: v for k, v in kw.items()
                                                           if k != "K"}),
                              t=T, K=kw.get("K", 0))
        return _np(ps, info.hypergrad), info

    # rtol 1e-10: same sums, rounding only (w* itself is a solve with cond(A) = 1).
    np.testing.assert_allclose(one_online("greedy", gamma=q)[0], itd, rtol=1e-10)
    np.testing.assert_allclose(one_online("hyperdistill", gamma=q, theta0=1.0)[0], itd,
                               rtol=1e-10)
    g, info = one_online("hyperdistill", gamma=0.9, theta0=123.0, K=T)
    assert info.extras["theta_refit"]
    np.testing.assert_allclose(info.extras["theta"], decay_sum(q, T) / decay_sum(0.9, T),
                               rtol=1e-10)
    np.testing.assert_allclose(g, itd, rtol=1e-10)
    # Documented behaviour, not ITD: greedy with γ = 1 sums T undamped one-step terms, so
    # its implicit part grows linearly in T instead of converging (ITD's tends to ∇F).
    g1 = one_online("greedy", gamma=1.0)[0]
    np.testing.assert_allclose(g1 - g_fo, T * (one - g_fo), rtol=1e-10)
    assert _rel(itd, p.exact_hypergradient(lam)) < 2 * q ** T


# -- where the online dynamics go ----------------------------------------------------------
def test_online_methods_converge_on_isotropic_quadratic():
    """A = μI, q = 0.5: HyperDistill (θ fitted) and greedy with γ = q are unbiased at
    stationarity up to q^K resp. q^T, so they reach λ_opt; T1-T2 (= one-step) converges to
    its own, biased, fixed point (c = 1), which is far from λ_opt here (ρ = 1)."""
    p = _quadratic("jax", cond=1.0, inner_lr=0.5, rho=1.0)
    lam_opt = _solve_fixed_point(p, None)
    np.testing.assert_allclose(p.exact_hypergradient(lam_opt), 0.0, atol=1e-10)
    lam_os = _solve_fixed_point(p, 1.0)
    assert _rel(lam_os, lam_opt) > 0.2  # the bias the one-step methods carry
    # tolerance 1e-6: SGD (lr 0.1) contracts the λ error geometrically; the remaining
    # bias is ≤ q^30 ≈ 1e-9 (window/DrMAD truncation).
    state, _ = _run(p, "hyperdistill", steps=250, t=1, K=30, gamma=0.9)
    assert _rel(_np(p, state.lam), lam_opt) < 1e-6
    state, _ = _run(p, "greedy", steps=150, t=30, gamma=0.5)
    assert _rel(_np(p, state.lam), lam_opt) < 1e-6
    state, _ = _run(p, "t1t2", steps=250, t=1)
    assert _rel(_np(p, state.lam), lam_os) < 1e-6


def test_online_biased_fixed_points_on_ill_conditioned_quadratic():
    """cond(A) = 10 (q = 0.9): T1-T2 converges to the one-step fixed point (c = 1), greedy
    to c = Z_γ(T); both differ from λ_opt (short-horizon bias, Wu et al. 2018)."""
    p = _quadratic("jax", rho=1.0)
    lam_opt = _solve_fixed_point(p, None)
    targets = {"t1t2": (_solve_fixed_point(p, 1.0), dict(t=1)),
               "greedy": (_solve_fixed_point(p, decay_sum(0.9, 10)), dict(t=10, gamma=0.9))}
    for name, (target, kw) in targets.items():
        assert _rel(target, lam_opt) > 0.1, name
        state, _ = _run(p, name, steps=200, **kw)
        assert _rel(_np(p, state.lam), target) < 1e-6, name


# -- parity, states, errors ----------------------------------------------------------------
@pytest.mark.parametrize("name", ONLINE)
@pytest.mark.parametrize("problem_name", ["quadratic", "ridge"])
def test_torch_jax_parity(name, problem_name):
    """Two steps (the first refits HyperDistill's θ with K = 5), Adam, float64."""
    out = {}
    for backend in ("jax", "torch"):
        p = problems.make(problem_name, backend=backend, seed=1, dtype="float64")
        method = algorithms.get(name, backend)
        state = method.init(p, p.initial_hyperparams() + 0.3, optimizer="adam",
                            outer_lr=0.05)
        gs = []
        for _ in range(2):
            state, info = method.step(p, state, t=3, K=5)
            gs.append(_np(p, info.hypergrad))
        out[backend] = (np.concatenate(gs), _np(p, state.lam), _np(p, state.w), info)
    (gj, lj, wj, ij), (gt, lt, wt, it) = out["jax"], out["torch"]
    # rel 1e-8: same float64 math, different summation order (t1t2's finite difference
    # amplifies rounding by ~1/ε, still far below 1e-8 here).
    assert _rel(gt, gj) <= 1e-8
    assert _rel(lt, lj) <= 1e-8 or np.allclose(lt, lj, rtol=0, atol=1e-12)
    assert _rel(wt, wj) <= 1e-8
    assert (ij.n_inner_grad_evals, ij.n_hvp_evals) == (it.n_inner_grad_evals,
                                                       it.n_hvp_evals)
    if name == "hyperdistill":
        assert abs(ij.extras["theta"] - it.extras["theta"]) <= 1e-8 * abs(ij.extras["theta"])


def test_outer_optimizers_match_reference():
    """Functional torch Adam/SGD and optax equal torch.optim on the same gradients."""
    import torch

    from hypersweep.algorithms.jax import online as jo
    from hypersweep.algorithms.torch import online as to
    rng = np.random.default_rng(0)
    grads = rng.standard_normal((5, 3))
    for name in ("adam", "sgd"):
        x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        opt = (torch.optim.Adam if name == "adam" else torch.optim.SGD)([x], lr=0.1)
        ft, fj = to.outer_optimizer(name, 0.1), jo.outer_optimizer(name, 0.1)
        lt = torch.zeros(3, dtype=torch.float64)
        lj = jo.jnp.zeros(3, dtype="float64")
        st_t, st_j = ft.init(lt), fj.init(lj)
        for g in grads:
            x.grad = torch.as_tensor(g)
            opt.step()
            lt, st_t = ft.apply(lt, torch.as_tensor(g), st_t)
            lj, st_j = fj.apply(lj, jo.jnp.asarray(g), st_j)
        np.testing.assert_allclose(lt.numpy(), x.detach().numpy(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(np.asarray(lj), x.detach().numpy(), rtol=1e-12,
                                   atol=1e-15)


def test_steps_are_pure_and_count():
    p = _quadratic("torch")
    method = algorithms.get("greedy", "torch")
    state = method.init(p, p.initial_hyperparams(), gamma=0.5)
    new, info = method.step(p, state, t=4)
    again, _ = method.step(p, state, t=4)
    assert state.n_updates == 0 and new.n_updates == 1 and new.n_inner == 4
    np.testing.assert_array_equal(_np(p, new.lam), _np(p, again.lam))
    # 4 λ-vjps of Φ (cross products) and 4 + 1 outer gradients, no ∇²_ww product
    assert (info.n_inner_grad_evals, info.n_hvp_evals, info.n_cross_evals,
            info.n_outer_grad_evals) == (4, 0, 4, 5)


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="gamma"):
        make_config("greedy", gamma=1.5)
    with pytest.raises(ValueError, match="Valid choices: fd_eps"):
        make_config("t1t2", gamma=0.5)
    with pytest.raises(ValueError, match="optimizer"):
        make_config("greedy", optimizer="rmsprop")
    with pytest.raises(ValueError, match="theta_every"):
        make_config("hyperdistill", theta_every=0)
    p = _quadratic("jax")
    method = algorithms.get("t1t2", "jax")
    with pytest.raises(ValueError, match="t must be"):
        method.step(p, method.init(p, p.initial_hyperparams()), t=0)


def test_jax_steps_do_not_recompile_when_t_or_K_change():
    p = _quadratic("jax", dim_inner=7)  # a shape no other test uses: a fresh compilation
    traces = jax_traces.counts()
    for name in ONLINE:
        method = algorithms.get(name, "jax")
        state = method.init(p, p.initial_hyperparams(), theta_every=1) \
            if name == "hyperdistill" else method.init(p, p.initial_hyperparams())
        before = traces[f"_{name}_step"]  # the jitted step of each method
        for t, K in ((1, 2), (4, 3), (9, 0)):
            state, _ = method.step(p, state, t=t, K=K)
        assert traces[f"_{name}_step"] - before == 1, name
