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
used (≤ K). ``extras["v"]`` is the adjoint v (a JAX array, w's shape)
of the iterative methods, to be passed back as ``v0`` at the next outer step.

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

from hypersweep.algorithms.common import Hypergrad
from hypersweep.algorithms.jax import _core


@functools.partial(jax.jit, static_argnames=("fns", "method"))
def _aid(fns, method, w0, lam, arrays, eta, t, K, v0):
    _core.note_trace(f"aid_{method}")
    tol = _core.tolerance(w0.dtype)
    w_t = _core.run_inner(fns, w0, lam, arrays, eta, t)
    rhs, grad_lam = _core.outer_grads(fns, w_t, lam, arrays)
    hvp, cross = _core.adjoint_products(fns, w_t, lam, arrays)
    warm = _core.is_nonzero(v0)  # the solvers skip the warm-start product when v0 = 0
    if method == "cg":
        v, iters, rel = _core.cg(lambda p: eta * hvp(p), rhs, K, tol, x0=v0)
        n_hvp = iters + warm.astype(iters.dtype)  # + the r₀ = rhs − ηH v₀ product
    elif method == "fp":
        v, iters, rel = _core.fixed_point(lambda p: p - eta * hvp(p), rhs, K, tol, v0=v0)
        # from v₀ = 0 the first step v₁ = rhs needs no product; from a warm v₀ it does
        n_hvp = jnp.where(warm, iters, jnp.maximum(iters - 1, 0))
    elif method == "neumann":
        v, iters, rel = _core.neumann(lambda p: p - eta * hvp(p), rhs, K, tol)
        n_hvp = iters
    else:  # pragma: no cover - internal
        raise ValueError(f"Unknown AID method {method!r}. Valid choices: cg, fp, neumann")
    hypergrad = grad_lam - eta * cross(v)
    return hypergrad, w_t, iters, n_hvp, rel, v


def _run(method: str, problem, lam, t: int, K: int, v0=None) -> Hypergrad:
    fns, w0, arrays, eta = _core.problem_inputs(problem)
    # Always an array (zeros when cold), so warm and cold calls share one compilation.
    v0 = jnp.zeros(w0.shape, w0.dtype) if v0 is None else jnp.asarray(v0, w0.dtype)
    out = _aid(fns, method, w0, lam, arrays, eta, jnp.asarray(t, jnp.int32),
               jnp.asarray(K, jnp.int32), v0)
    hypergrad, w_t, iters, n_hvp, rel, v = jax.block_until_ready(out)
    return Hypergrad(hypergrad=hypergrad, w_t=w_t, n_inner_grad_evals=t,
                     n_hvp_evals=_core.as_int(n_hvp), n_cross_evals=1,
                     solver_iters=_core.as_int(iters),
                     extras={"solver_rel_residual": _core.as_float(rel), "v": v})


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
    _core.note_trace("aid_exact")
    w_t = _core.run_inner(fns, w0, lam, arrays, eta, t)
    rhs, grad_lam = _core.outer_grads(fns, w_t, lam, arrays)
    _, cross = _core.adjoint_products(fns, w_t, lam, arrays)
    n = w_t.size
    H = jax.jacfwd(lambda w: _core.inner_grad(fns, w, lam, arrays))(w_t).reshape(n, n)
    # (I − ∂_wΦ)ᵀ = η Hᵀ; H is symmetric up to rounding, Hᵀ is the exact transpose.
    v = jnp.linalg.solve(eta * H.T, rhs.reshape(n)).reshape(w_t.shape)
    return grad_lam - eta * cross(v), w_t


def aid_exact(problem, lam, *, t: int, K: int = 0, seed: int = 0) -> Hypergrad:
    """AID with the adjoint solved exactly: dense H = ∇²_w L_in(w_t, λ), direct solve.

    t: inner steps to w_t. K is unused. The only error left is that of w_t, so at large t
    this is the exact hypergradient up to rounding. For small dim w only: builds the
    (dim w)² Hessian by forward mode (``jax.jacfwd``, dim w Jacobian-vector products,
    counted in ``n_hvp_evals``; the cross term is one ``n_cross_evals``) and an
    O((dim w)³) solve.
    ``seed`` is unused. References: Bengio 2000; Pedregosa 2016.
    """
    fns, w0, arrays, eta = _core.problem_inputs(problem)
    hypergrad, w_t = jax.block_until_ready(
        _aid_exact(fns, w0, lam, arrays, eta, jnp.asarray(t, jnp.int32)))
    n = int(w_t.size)
    return Hypergrad(hypergrad=hypergrad, w_t=w_t, n_inner_grad_evals=t,
                     n_hvp_evals=n, n_cross_evals=1, solver_iters=None, extras={})
