"""Approximate implicit differentiation in PyTorch: aid_cg, aid_fp, aid_neumann, aid_exact.

Every method runs t steps of Φ to get ``w_t`` (no graph, analytic ``inner_grad`` when the
problem has one), then solves the adjoint system

    (I − ∂_wΦ(w_t))ᵀ v = ∇_w L_out(w_t, λ)      i.e.   η H v = rhs,  H = ∇²_w L_in(w_t, λ)

and returns ``∇_λ L_out(w_t, λ) + ∂_λΦ(w_t, λ)ᵀ v = ∇_λ L_out − η (∂_λ g(w_t, λ))ᵀ v``.
The graph of ``g`` at ``(w_t, λ)`` is built once and every Hessian-vector product reuses
it (:class:`~hypersweep.algorithms.torch._core.Linearization`).

K is the solver budget (an upper bound: every solver stops early at the relative tolerance
``common.DEFAULT_TOL[dtype]``). Counts (``docs/costs.md``): ``n_inner_grad_evals = t``;
``n_hvp_evals`` = the HVPs the solver used (a warm start's extra product included);
``n_cross_evals = 1`` (the final cross term ``(∂_λ g)ᵀ v``); ``n_outer_grad_evals = 1``;
``solver_iters`` as documented per method. The iterative methods' ``extras`` (the same
keys in both backends): ``"v"``, the adjoint v (a detached tensor, w's shape) to be passed
back as ``v0``; ``"solver_rel_residual"``, the solver's stopping quantity relative to
‖rhs‖; ``"matvecs_computed"``, the HVPs the solver ran (on a GPU up to 7 discarded ones
after convergence, see ``_core``).

Adjoint warm start (``aid_cg`` and ``aid_fp``): ``v0`` starts the solver at v₀ instead of
0. A Neumann series has no initial point, so ``aid_neumann`` takes no ``v0`` (warm-starting
it *is* ``aid_fp`` from v₀).
"""
from __future__ import annotations

import torch

from hypersweep.algorithms.common import Hypergrad, adjoint_hvps
from hypersweep.algorithms.torch import _core


def _adjoint_setup(problem, lam, t: int):
    fns, w0, arrays, eta = _core.problem_inputs(problem)
    w_t = _core.run_inner(_core.inner_grad_fn(fns, arrays), w0, lam, eta, t)
    return (w_t, *_adjoint_at(problem, lam, w_t))


def _adjoint_at(problem, lam, w_t):
    """(Linearization of g at (w_t, λ), rhs = ∇_w L_out(w_t), ∇_λ L_out(w_t))."""
    fns, _, arrays, _ = _core.problem_inputs(problem)
    lin = _core.Linearization(_core.inner_grad_fn(fns, arrays), w_t, lam)
    rhs, grad_lam = _core.outer_grads(fns, w_t, lam, arrays)
    return lin, rhs, grad_lam


def _iterative(method: str, problem, lam, t: int, K: int, v0=None) -> Hypergrad:
    """Solve the adjoint with ``method`` ("cg", "fp", "neumann") from ``v0``."""
    fns, w0, arrays, eta = _core.problem_inputs(problem)
    w_t = _core.run_inner(_core.inner_grad_fn(fns, arrays), w0, lam, eta, t)
    return _solve_at(method, problem, lam, w_t, t, K, v0)


def _solve_at(method: str, problem, lam, w_t, t: int, K: int, v0=None) -> Hypergrad:
    """The AID estimate at a given w_t, costs counted as the t-step estimator's (shared
    with the t-grid form)."""
    lin, rhs, grad_lam = _adjoint_at(problem, lam, w_t)
    eta, tol = problem.inner_lr, _core.tolerance(problem.dtype)
    if method == "cg":
        res = _core.cg(lambda p: eta * lin.hvp(p), rhs, max_iter=K, tol=tol, x0=v0)
    elif method == "fp":
        res = _core.fixed_point(lambda v: v - eta * lin.hvp(v), rhs, max_iter=K, tol=tol,
                                v0=v0)
    else:
        res = _core.neumann(lambda v: v - eta * lin.hvp(v), rhs, n_terms=K, tol=tol)
    hypergrad = grad_lam - eta * lin.cross(res.x)
    return Hypergrad(hypergrad=hypergrad.detach(), w_t=w_t.detach(), n_inner_grad_evals=t,
                     n_hvp_evals=adjoint_hvps(method, res.iters, _core.is_nonzero(v0)),
                     n_cross_evals=1, solver_iters=res.iters,
                     extras={"solver_rel_residual": res.rel_residual,
                             "matvecs_computed": res.matvecs, "v": res.x.detach()})


def aid_cg(problem, lam, *, t: int, K: int, seed: int = 0, v0=None) -> Hypergrad:
    """AID with at most K conjugate-gradient steps on ``η H v = rhs`` from ``v0``.

    ``v0``: the warm start (w's shape, e.g. the previous outer step's ``extras["v"]``;
    None: 0). Stops when ``‖r‖ ≤ tol·‖rhs‖`` (relative to rhs, so an accurate v0 stops
    after 0 steps) or when ``pᵀAp`` is not positive and finite (then the last finite
    iterate is used: no NaN even in float32 with a large K). K = 0 returns v = v0.
    ``solver_iters`` = CG steps used; ``extras["matvecs_computed"]`` counts HVPs actually
    run (on a GPU up to 7 discarded ones after convergence, see ``_core``).

    Cost: t inner gradients, ≤ K HVPs (+ 1 for ``r₀ = rhs − ηH v0`` when v0 ≠ 0) + 1
    cross VJP; memory O(dim w). References: Pedregosa 2016; Grazzi et al. 2020.
    """
    return _iterative("cg", problem, lam, t, K, v0)


def aid_fp(problem, lam, *, t: int, K: int, seed: int = 0, v0=None) -> Hypergrad:
    """AID with at most K fixed-point steps ``v_{k+1} = ∂_wΦ(w_t)ᵀ v_k + rhs`` from ``v0``.

    ``v0``: the start (w's shape, e.g. the previous outer step's ``extras["v"]``; None: 0).
    Stops after the first step with ``‖v_{k+1} − v_k‖ ≤ tol·‖rhs‖``. ``solver_iters`` =
    steps taken; from 0 the first (``v_1 = rhs``) needs no HVP, so ``n_hvp_evals =
    solver_iters`` (``solver_iters − 1`` HVPs + the cross term); from a warm v0 every step
    costs one HVP. K = 0 gives v = v0 (from 0: :func:`first_order`). Converges when Φ is
    a contraction (η < 2/L).

    Cost: t inner gradients, ≤ K − 1 HVPs (≤ K when v0 ≠ 0) + 1 cross VJP; memory
    O(dim w). References: Grazzi et al. 2020; Liao et al. 2018.
    """
    return _iterative("fp", problem, lam, t, K, v0)


def aid_neumann(problem, lam, *, t: int, K: int, seed: int = 0) -> Hypergrad:
    """AID with the truncated Neumann series ``v = Σ_{j=0}^{K} (∂_wΦ(w_t)ᵀ)^j rhs``.

    The partial sums are the fixed-point iterates, so ``aid_neumann(K) == aid_fp(K + 1)``
    (same early stop: after the first term with ``‖(∂_wΦᵀ)^j rhs‖ ≤ tol·‖rhs‖``).
    No ``v0``: the series has no initial point (warm-start :func:`aid_fp` instead).
    ``solver_iters`` = terms added beyond ``rhs`` (≤ K), one HVP each.

    Cost: t inner gradients, ≤ K HVPs + 1 cross VJP; memory O(dim w).
    Reference: Lorraine et al. 2020.
    """
    return _iterative("neumann", problem, lam, t, K)


def aid_exact(problem, lam, *, t: int, K: int = 0, seed: int = 0) -> Hypergrad:
    """Implicit differentiation at ``w_t`` with a dense direct solve (small dim w only).

    Forms ``H = ∂_w g(w_t, λ)`` (dim w batched VJPs through one graph), symmetrizes it and
    solves ``η ½(H + Hᵀ) v = rhs`` by LU. At ``t → ∞`` this is the exact hypergradient
    ∇F(λ). K is unused; ``solver_iters`` is None. Both backends symmetrize H: it is a
    Hessian, so its asymmetric part is rounding of the autodiff route (reverse-mode rows
    here, forward-mode columns in JAX); dropping it makes both solve the same symmetric
    system whichever transpose their autodiff yields, the one the iterative solvers (CG)
    assume.

    Cost: t inner gradients, dim w HVPs + 1 cross VJP, O(dim w³) solve, O(dim w²) memory.
    References: Bengio 2000; Pedregosa 2016.
    """
    w_t, lin, rhs, grad_lam = _adjoint_setup(problem, lam, t)
    H = lin.dense_hessian()
    H = 0.5 * (H + H.T)
    eta = problem.inner_lr
    v = torch.linalg.solve(eta * H, rhs.reshape(-1, 1)).reshape(rhs.shape)
    hypergrad = grad_lam - eta * lin.cross(v)
    return Hypergrad(hypergrad=hypergrad.detach(), w_t=w_t.detach(), n_inner_grad_evals=t,
                     n_hvp_evals=H.shape[0], n_cross_evals=1, solver_iters=None, extras={})
