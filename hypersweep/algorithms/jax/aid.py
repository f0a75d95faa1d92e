"""Approximate implicit differentiation (AID) in JAX: CG, fixed point, Neumann, exact.

All four run t steps of Φ(w, λ) = w − η ∇_w L_in(w, λ) from ``problem.w_init`` to get w_t,
then solve the adjoint system at w_t

    (I − ∂_wΦ(w_t, λ))ᵀ v = ∇_w L_out(w_t, λ),   i.e.   η H v = rhs,  H = ∇²_w L_in(w_t, λ),

and return

    hypergrad = ∇_λ L_out(w_t, λ) + ∂_λΦ(w_t, λ)ᵀ v = ∇_λ L_out(w_t, λ) − η (∂_λ g)ᵀ v.

They differ only in how v is approximated with a budget of K (the linear-system budget).

Counting convention (``Hypergrad``, table in ``docs/costs.md``): ``n_inner_grad_evals``
= t (the forward steps); ``n_hvp_evals`` = Hessian-vector products the solver actually
used (a warm start's extra product included); ``n_cross_evals`` = 1 (the final cross term
(∂_λ g)ᵀ v); ``n_outer_grad_evals`` = 1; ``solver_iters`` = solver iterations actually
used (≤ K). The iterative methods' ``extras`` (the same keys in both backends):
``"v"``, the adjoint v (a JAX array, w's shape) to be passed back as ``v0`` at the next
outer step; ``"solver_rel_residual"``, the solver's stopping quantity relative to ‖rhs‖;
``"matvecs_computed"``, the products the solver ran (= ``n_hvp_evals`` in JAX, whose
loops stop exactly; torch on a GPU may run a few more it discards).

Adjoint warm start (``aid_cg`` and ``aid_fp``): ``v0`` starts the solver at v₀ instead of
0. A Neumann series has no initial point (it sums J^j rhs from j = 0), so ``aid_neumann``
takes no ``v0``: warm-starting it *is* ``aid_fp`` from v₀.

Compilation: one compiled function per (problem functions, array shapes/dtypes, method);
t, K and v0 are traced (v0 = zeros when not given), so a call with another t, K or v0,
warm or cold, reuses it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hypersweep.algorithms.common import Hypergrad, adjoint_hvps
from hypersweep.algorithms.jax import _core


def _adjoint(fns, method, grad_fn, w_t, lam, arrays, eta, K, v0=None):
    """(hypergrad, SolveResult) at w_t: the adjoint solved by ``method`` with budget K
    from v0 (None: cold, no warm-start product at all)."""
    tol = _core.tolerance(w_t.dtype)
    rhs, grad_lam = _core.outer_grads(fns, w_t, lam, arrays)
    lin = _core.Linearization(grad_fn, w_t, lam)
    if method == "cg":
        res = _core.cg(lambda p: eta * lin.hvp(p), rhs, max_iter=K, tol=tol, x0=v0)
    elif method == "fp":
        res = _core.fixed_point(lambda p: p - eta * lin.hvp(p), rhs, max_iter=K, tol=tol,
                                v0=v0)
    elif method == "neumann":
        res = _core.neumann(lambda p: p - eta * lin.hvp(p), rhs, n_terms=K, tol=tol)
    else:  # pragma: no cover - internal
        raise ValueError(f"Unknown AID method {method!r}. Valid choices: cg, fp, neumann")
    return grad_lam - eta * lin.cross(res.x), res


@functools.partial(jax.jit, static_argnames=("fns", "method"))
def _aid(fns, method, w0, lam, arrays, eta, t, K, v0):
    grad_fn = _core.inner_grad_fn(fns, arrays)
    w_t = _core.run_inner(grad_fn, w0, lam, eta, t)
    warm = _core.is_nonzero(v0)  # the solvers skip the warm-start product when v0 = 0
    hypergrad, res = _adjoint(fns, method, grad_fn, w_t, lam, arrays, eta, K, v0)
    return hypergrad, w_t, res, warm


def _result(method: str, hypergrad, w_t, t: int, iters: int, warm: bool,
            rel_residual: float, matvecs: int, v) -> Hypergrad:
    """The per-point ``Hypergrad`` of an AID solve (shared with the t-grid form)."""
    return Hypergrad(hypergrad=hypergrad, w_t=w_t, n_inner_grad_evals=t,
                     n_hvp_evals=adjoint_hvps(method, iters, warm), n_cross_evals=1,
                     solver_iters=iters,
                     extras={"solver_rel_residual": rel_residual,
                             "matvecs_computed": matvecs, "v": v})


def _run(method: str, problem, lam, t: int, K: int, v0=None) -> Hypergrad:
    fns, w0, arrays, eta = _core.problem_inputs(problem)
    # Always an array (zeros when cold), so warm and cold calls share one compilation.
    v0 = jnp.zeros(w0.shape, w0.dtype) if v0 is None else jnp.asarray(v0, w0.dtype)
    out = _aid(fns, method, w0, lam, arrays, eta, jnp.asarray(t, jnp.int32),
               jnp.asarray(K, jnp.int32), v0)
    hypergrad, w_t, res, warm = jax.block_until_ready(out)
    return _result(method, hypergrad, w_t, t, int(res.iters), bool(warm),
                   float(res.rel_residual), int(res.matvecs), res.x)


def aid_cg(problem, lam, *, t: int, K: int, seed: int = 0, v0=None) -> Hypergrad:
    """AID with conjugate gradient on η H v = rhs (Pedregosa 2016; Grazzi et al. 2020).

    t: inner steps to w_t. K: upper bound on CG iterations; CG starts at ``v0`` (a warm
    start, w's shape, e.g. the previous outer step's ``extras["v"]``; None: 0) and stops
    early once ‖r‖ ≤ tol·‖rhs‖ (tol = ``common.DEFAULT_TOL[dtype]``; relative to rhs, so
    an accurate v0 stops after 0 iterations), or when a step would break down in finite
    precision (pᵀAp ≤ 0 / underflow / non-finite), so a large K on an ill-conditioned
    float32 problem still returns a finite estimate. K = 0 returns v = v0.
    ``solver_iters`` = CG iterations used. ``seed`` is unused (deterministic).

    Cost: t gradient steps, ≤ K + 1 Hessian-vector products (+ 1 for r₀ = rhs − ηH v0
    when v0 ≠ 0), O(dim w) memory.
    """
    return _run("cg", problem, lam, t, K, v0)


def aid_fp(problem, lam, *, t: int, K: int, seed: int = 0, v0=None) -> Hypergrad:
    """AID with the fixed-point iteration v_{k+1} = ∂_wΦ(w_t)ᵀ v_k + rhs from ``v0``.

    t: inner steps to w_t. K: at most K fixed-point steps; stops early after the first
    step with ‖v_{k+1} − v_k‖ ≤ tol·‖rhs‖. ``v0``: the start (a warm start, w's shape,
    e.g. the previous outer step's ``extras["v"]``; None: 0). K = 0 gives v = v0 (from 0:
    the first-order estimate). Converges when Φ is a contraction (rate q = ‖∂_wΦ‖).
    ``seed`` is unused.

    Cost: t gradient steps, ≤ K Hessian-vector products (from 0, v₁ = rhs is free: ≤ K − 1;
    + 1 for the cross term), O(dim w) memory. References: Grazzi et al. 2020; Liao et al.
    2018.
    """
    return _run("fp", problem, lam, t, K, v0)


def aid_neumann(problem, lam, *, t: int, K: int, seed: int = 0) -> Hypergrad:
    """AID with the truncated Neumann series v = Σ_{j=0}^{K} (∂_wΦ(w_t)ᵀ)^j rhs.

    t: inner steps to w_t. K: number of Neumann terms after the first (K = 0: v = rhs).
    Identity: aid_neumann(K) == aid_fp(K + 1), since the fixed-point iterate from v₀ = 0
    is v_{k} = Σ_{j<k} (∂_wΦᵀ)^j rhs; here it is computed as a power series instead.
    Stops early once a term has ‖·‖ ≤ tol·‖rhs‖ (the same rule as ``aid_fp``).
    No ``v0``: the series has no initial point (warm-start ``aid_fp`` instead).
    ``seed`` is unused. Reference: Lorraine, Vicol & Duvenaud 2020.

    Cost: t gradient steps, ≤ K + 1 Hessian-vector products, O(dim w) memory.
    """
    return _run("neumann", problem, lam, t, K)


@functools.partial(jax.jit, static_argnames=("fns",))
def _aid_exact(fns, w0, lam, arrays, eta, t):
    grad_fn = _core.inner_grad_fn(fns, arrays)
    w_t = _core.run_inner(grad_fn, w0, lam, eta, t)
    rhs, grad_lam = _core.outer_grads(fns, w_t, lam, arrays)
    lin = _core.Linearization(grad_fn, w_t, lam)
    H = lin.dense_hessian()
    # H is a Hessian: its asymmetric part is rounding only (both backends symmetrize).
    H = 0.5 * (H + H.T)
    v = jnp.linalg.solve(eta * H, rhs.reshape(-1)).reshape(w_t.shape)
    return grad_lam - eta * lin.cross(v), w_t


def aid_exact(problem, lam, *, t: int, K: int = 0, seed: int = 0) -> Hypergrad:
    """AID with the adjoint solved exactly: dense H = ∇²_w L_in(w_t, λ), direct solve.

    t: inner steps to w_t. K is unused. The only error left is that of w_t, so at large t
    this is the exact hypergradient up to rounding. For small dim w only: builds the
    (dim w)² Hessian by forward mode (``jax.jacfwd``, dim w Jacobian-vector products,
    counted in ``n_hvp_evals``; the cross term is one ``n_cross_evals``) and an
    O((dim w)³) solve of η ½(H + Hᵀ) v = rhs. Both backends symmetrize H: it is a
    Hessian, so its asymmetric part is rounding of the autodiff route (forward-mode
    columns here, reverse-mode rows in torch); dropping it makes both solve the same
    symmetric system whichever transpose their autodiff yields, the one the iterative
    solvers (CG) assume.
    ``seed`` is unused. References: Bengio 2000; Pedregosa 2016.
    """
    fns, w0, arrays, eta = _core.problem_inputs(problem)
    hypergrad, w_t = jax.block_until_ready(
        _aid_exact(fns, w0, lam, arrays, eta, jnp.asarray(t, jnp.int32)))
    n = int(w_t.size)
    return Hypergrad(hypergrad=hypergrad, w_t=w_t, n_inner_grad_evals=t,
                     n_hvp_evals=n, n_cross_evals=1, solver_iters=None, extras={})
