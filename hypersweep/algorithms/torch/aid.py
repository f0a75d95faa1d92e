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
``solver_iters`` as documented per method. ``extras["v"]`` is the adjoint v (a detached
tensor, w's shape) of the iterative methods, to be passed back as ``v0``.

Adjoint warm start (``aid_cg`` and ``aid_fp``): ``v0`` starts the solver at v₀ instead of
0. A Neumann series has no initial point, so ``aid_neumann`` takes no ``v0`` (warm-starting
it *is* ``aid_fp`` from v₀).
"""
from __future__ import annotations

import torch

from hypersweep.algorithms.common import DEFAULT_TOL, Hypergrad
from hypersweep.algorithms.torch import _core


def _adjoint_setup(problem, lam, t: int):
    g = _core.inner_grad_fn(problem)
    w_t = _core.run_inner(g, problem.w_init, lam, problem.inner_lr, t)
    lin = _core.Linearization(g, w_t, lam)
    rhs, grad_lam = _core.outer_grads(problem, w_t, lam)
    return w_t, lin, rhs, grad_lam


def _finish(problem, w_t, lin, grad_lam, v, t, n_hvp, iters, extras) -> Hypergrad:
    hypergrad = grad_lam - problem.inner_lr * lin.cross(v)
    if iters is not None:  # the iterative solvers: hand v back for a warm start
        extras = {**extras, "v": v.detach()}
    return Hypergrad(hypergrad.detach(), w_t.detach(), t, n_hvp, iters, extras,
                     n_cross_evals=1)


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
    w_t, lin, rhs, grad_lam = _adjoint_setup(problem, lam, t)
    eta = problem.inner_lr
    res = _core.conjugate_gradient(lambda p: eta * lin.hvp(p), rhs, max_iter=K,
                                   tol=DEFAULT_TOL[problem.dtype], x0=v0)
    warm = int(_core.is_nonzero(v0))  # the r₀ product
    return _finish(problem, w_t, lin, grad_lam, res.x, t, res.iters + warm, res.iters,
                   {"matvecs_computed": res.matvecs})


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
    w_t, lin, rhs, grad_lam = _adjoint_setup(problem, lam, t)
    eta = problem.inner_lr
    res = _core.fixed_point(lambda v: v - eta * lin.hvp(v), rhs, max_iter=K,
                            tol=DEFAULT_TOL[problem.dtype], v0=v0)
    n_hvp = res.iters if _core.is_nonzero(v0) else max(res.iters - 1, 0)
    return _finish(problem, w_t, lin, grad_lam, res.x, t, n_hvp,
                   res.iters, {"matvecs_computed": res.matvecs})


def aid_neumann(problem, lam, *, t: int, K: int, seed: int = 0) -> Hypergrad:
    """AID with the truncated Neumann series ``v = Σ_{j=0}^{K} (∂_wΦ(w_t)ᵀ)^j rhs``.

    The partial sums are the fixed-point iterates, so ``aid_neumann(K) == aid_fp(K + 1)``
    (same early stop: after the first term with ``‖(∂_wΦᵀ)^j rhs‖ ≤ tol·‖rhs‖``).
    No ``v0``: the series has no initial point (warm-start :func:`aid_fp` instead).
    ``solver_iters`` = terms added beyond ``rhs`` (≤ K), one HVP each.

    Cost: t inner gradients, ≤ K HVPs + 1 cross VJP; memory O(dim w).
    Reference: Lorraine et al. 2020.
    """
    w_t, lin, rhs, grad_lam = _adjoint_setup(problem, lam, t)
    eta = problem.inner_lr
    res = _core.neumann_series(lambda v: v - eta * lin.hvp(v), rhs, n_terms=K,
                               tol=DEFAULT_TOL[problem.dtype])
    return _finish(problem, w_t, lin, grad_lam, res.x, t, res.iters, res.iters,
                   {"matvecs_computed": res.matvecs})


def aid_exact(problem, lam, *, t: int, K: int = 0, seed: int = 0) -> Hypergrad:
    """Implicit differentiation at ``w_t`` with a dense direct solve (small dim w only).

    Forms ``H = ∂_w g(w_t, λ)`` (dim w batched VJPs through one graph), symmetrizes it and
    solves ``η H v = rhs`` by LU. At ``t → ∞`` this is the exact hypergradient ∇F(λ).
    K is unused; ``solver_iters`` is None.

    Cost: t inner gradients, dim w HVPs + 1 cross VJP, O(dim w³) solve, O(dim w²) memory.
    References: Bengio 2000; Pedregosa 2016.
    """
    w_t, lin, rhs, grad_lam = _adjoint_setup(problem, lam, t)
    H = lin.dense_hessian()
    H = 0.5 * (H + H.T)
    v = torch.linalg.solve(problem.inner_lr * H, rhs.reshape(-1, 1)).reshape(rhs.shape)
    return _finish(problem, w_t, lin, grad_lam, v, t, H.shape[0], None, {})
