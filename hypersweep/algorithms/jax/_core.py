"""Shared JAX pieces of the hypergradient estimators: the inner map and the linear solvers.

Conventions (shared with the PyTorch implementation; see ``hypersweep.notation``)::

    g(w, λ)   = ∇_w L_in(w, λ)            (the problem's analytic ``inner_grad`` when it
                                           has one, else ``jax.grad`` of ``inner_loss``)
    Φ(w, λ)   = w − η g(w, λ)              (one inner gradient step, η = problem.inner_lr)
    ∂_wΦ      = I − η H,   H = ∇²_w L_in   (symmetric)
    ∂_λΦ      = −η ∂_λ g

Everything here is a small pure function meant to be called *inside* a ``jax.jit``-ed
estimator: ``fns`` (the problem's hashable :class:`~hypersweep.problems.base.ProblemFns`)
is a static argument there, ``arrays``, ``lam``, η, t and K are traced. The solvers take a
``matvec`` / ``apply_J`` closure, so CG, fixed point and Neumann share one adjoint set-up.

Loop bounds (t, K) are traced integers handed to ``lax.fori_loop`` / ``lax.while_loop``,
so changing t or K never triggers a recompilation.
"""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
from jax import lax

import hypersweep.problems.jax.ops  # noqa: F401  (enables float64 before any array exists)
from hypersweep.algorithms.common import DEFAULT_TOL

# Python-side count of how often each jitted estimator body was *traced* (== compiled for
# a new cache key). Tests read it to check that changing t or K does not recompile.
trace_counts: collections.Counter = collections.Counter()


def note_trace(name: str) -> None:
    """Call at the top of a jitted body: runs once per trace, never at run time."""
    trace_counts[name] += 1


def tolerance(dtype) -> float:
    """The relative residual at which the iterative adjoint solvers stop early."""
    return DEFAULT_TOL[jnp.dtype(dtype).name]


def next_pow2(n: int) -> int:
    """Smallest power of two ≥ max(n, 1): the static trajectory-buffer length for n steps."""
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()


def vdot(a, b):
    """Σ a ⊙ b for arrays of any (equal) shape, as a scalar."""
    return jnp.sum(a * b)


def norm(a):
    return jnp.sqrt(vdot(a, a))


# -- the inner map ----------------------------------------------------------------------
def inner_grad(fns, w, lam, arrays):
    """g(w, λ) = ∇_w L_in(w, λ): analytic when the problem has it, else autodiff."""
    if fns.has_inner_grad:
        return fns.inner_grad(w, lam, arrays)
    return jax.grad(fns.inner_loss)(w, lam, arrays)


def phi(fns, w, lam, arrays, eta):
    """Φ(w, λ) = w − η g(w, λ)."""
    return w - eta * inner_grad(fns, w, lam, arrays)


def run_inner(fns, w0, lam, arrays, eta, t):
    """w_t = Φ^t(w0) with a traced t (t evaluations of g).

    The loop body takes two steps (plus one remainder step): with a traced trip count XLA
    cannot unroll the while loop itself, and on CPU its per-iteration overhead doubled
    the time of t = 1000 logreg steps (measured 25 ms → 11 ms; benchmarks/hypergradient.py).
    """
    step = lambda w: phi(fns, w, lam, arrays, eta)  # noqa: E731
    w = lax.fori_loop(0, t // 2, lambda s, w: step(step(w)), w0)
    return lax.fori_loop(0, t % 2, lambda s, w: step(w), w)


def outer_grads(fns, w, lam, arrays):
    """(∇_w L_out(w, λ), ∇_λ L_out(w, λ))."""
    return jax.grad(fns.outer_loss, argnums=(0, 1))(w, lam, arrays)


def adjoint_products(fns, w, lam, arrays):
    """Closures at (w, λ): ``hvp(v) = H v`` and ``cross(v) = (∂_λ g)ᵀ v``.

    Both are vjps of g (``hvp`` is Hᵀv, equal to Hv since H is a Hessian), linearized
    once here and applied many times inside the solver loops.
    """
    _, vjp_w = jax.vjp(lambda w_: inner_grad(fns, w_, lam, arrays), w)
    _, vjp_lam = jax.vjp(lambda lam_: inner_grad(fns, w, lam_, arrays), lam)
    return (lambda v: vjp_w(v)[0]), (lambda v: vjp_lam(v)[0])


# -- linear solvers (pure; take a matvec) ------------------------------------------------
def is_nonzero(x):
    """Whether any entry of x is non-zero (a traced bool): a warm start worth a product."""
    return jnp.any(x != 0)


def cg(matvec, b, max_iters, tol, x0=None):
    """Conjugate gradient for A x = b, A symmetric positive definite, from x₀ (default 0).

    Runs at most ``max_iters`` (traced) iterations; stops when the recursively updated
    residual satisfies ‖r‖ ≤ tol·‖b‖ (relative to b, not to r₀, so a warm start that is
    already accurate stops after 0 iterations). Guards for finite precision: it also
    stops, without applying the step, when pᵀAp is non-positive, subnormal or non-finite
    (A numerically indefinite, or p underflowed), and when the updated residual is
    non-finite. So an ill-conditioned float32 system with a huge budget returns a finite
    x, never NaN.

    ``x0`` (traced, b's shape; None = 0): the warm start. r₀ = b − A x₀ costs one extra
    matvec, taken only when x₀ has a non-zero entry (``is_nonzero``, decided at run time
    by ``lax.cond``, so warm and cold calls share one compilation and x₀ = 0 gives
    exactly the cold result).

    Returns ``(x, iters, rel_residual)``: ``iters`` = CG iterations (≤ max_iters; the
    r₀ matvec is not included), ``rel_residual`` = ‖r‖/‖b‖ of the returned x (recursive
    residual; 0 if b = 0).
    """
    dtype = b.dtype
    tiny = jnp.finfo(dtype).tiny
    b_norm = norm(b)
    stop_at = tol * b_norm
    if x0 is None:
        x0, r0 = jnp.zeros_like(b), b
    else:
        x0 = x0.astype(dtype)
        r0 = lax.cond(is_nonzero(x0), lambda: b - matvec(x0), lambda: b)
    rr0 = vdot(r0, r0)

    def cond(state):
        k, _, _, _, rr, healthy = state
        return (k < max_iters) & healthy & (jnp.sqrt(rr) > stop_at)

    def body(state):
        k, x, r, p, rr, _ = state
        Ap = matvec(p)
        pAp = vdot(p, Ap)
        curvature_ok = jnp.isfinite(pAp) & (pAp > tiny)
        alpha = jnp.where(curvature_ok, rr / jnp.where(curvature_ok, pAp, 1.0), 0.0)
        x_new = x + alpha * p
        r_new = r - alpha * Ap
        rr_new = vdot(r_new, r_new)
        healthy = curvature_ok & jnp.isfinite(rr_new)
        # rr > 0 here (the loop condition needs √rr > tol·‖b‖ ≥ 0).
        beta = rr_new / rr
        p_new = r_new + beta * p
        keep = lambda new, old: jnp.where(healthy, new, old)  # noqa: E731
        return (k + 1, keep(x_new, x), keep(r_new, r), keep(p_new, p), keep(rr_new, rr),
                healthy)

    init = (jnp.asarray(0, jnp.int32), x0, r0, r0, rr0, jnp.asarray(True))
    k, x, _, _, rr, _ = lax.while_loop(cond, body, init)
    rel = jnp.where(b_norm > 0, jnp.sqrt(rr) / jnp.where(b_norm > 0, b_norm, 1.0), 0.0)
    return x, k, rel


def fixed_point(apply_J, rhs, max_steps, tol, v0=None):
    """Fixed-point (Richardson) iteration v_{k+1} = J v_k + rhs from v₀ (default 0).

    At most ``max_steps`` (traced) steps; stops after the first step with
    ‖v_{k+1} − v_k‖ ≤ tol·‖rhs‖ (that difference is the residual rhs − (I − J) v_k).
    From v₀ = 0 the first step is free (v₁ = rhs), so the cost is max(steps − 1, 0)
    applications of J; from a ``v0`` (traced) with a non-zero entry every step costs one
    (decided at run time by ``lax.cond``: one compilation, and v₀ = 0 is the cold run).
    max_steps = 0 returns v₀.

    Returns ``(v, steps, rel_residual)`` with rel_residual = ‖v_steps − v_{steps−1}‖/‖rhs‖.
    """
    stop_at = tol * norm(rhs)
    started = max_steps >= 1
    if v0 is None:
        v0 = jnp.zeros_like(rhs)
        first = rhs
    else:
        v0 = v0.astype(rhs.dtype)
        # J is applied only if the step is taken at all and v₀ ≠ 0 (else J v₀ = 0).
        first = lax.cond(started & is_nonzero(v0), lambda: apply_J(v0) + rhs, lambda: rhs)
    v1 = jnp.where(started, first, v0)
    k1 = jnp.where(started, 1, 0).astype(jnp.int32)
    delta1 = jnp.where(started, norm(first - v0), jnp.inf).astype(rhs.dtype)

    def cond(state):
        k, _, delta = state
        return (k < max_steps) & (delta > stop_at) & jnp.isfinite(delta)

    def body(state):
        k, v, _ = state
        v_new = apply_J(v) + rhs
        return k + 1, v_new, norm(v_new - v)

    k, v, delta = lax.while_loop(cond, body, (k1, v1, delta1))
    return v, k, _relative(delta, rhs)


def neumann(apply_J, rhs, n_terms, tol):
    """Truncated Neumann series v = Σ_{j=0}^{K} J^j rhs, K = ``n_terms`` (traced).

    Computed as a power series (term_{j+1} = J term_j, v += term), i.e. not by the
    fixed-point recursion, although in exact arithmetic it equals ``fixed_point`` with
    K + 1 steps: v_{K+1} = J v_K + rhs = Σ_{j=0}^{K} J^j rhs. Stops early after adding a
    term with ‖term‖ ≤ tol·‖rhs‖ (the same rule and index as ``fixed_point``).
    Cost: K applications of J (fewer on an early stop).

    Returns ``(v, j, rel_term)``: j = applications of J, rel_term = ‖last term‖/‖rhs‖.
    """
    stop_at = tol * norm(rhs)

    def cond(state):
        j, _, term, term_norm = state
        return (j < n_terms) & (term_norm > stop_at) & jnp.isfinite(term_norm)

    def body(state):
        j, v, term, _ = state
        term = apply_J(term)
        return j + 1, v + term, term, norm(term)

    init = (jnp.asarray(0, jnp.int32), rhs, rhs, norm(rhs))
    j, v, _, term_norm = lax.while_loop(cond, body, init)
    return v, j, _relative(term_norm, rhs)


def _relative(x, rhs):
    r = norm(rhs)
    return jnp.where(r > 0, x / jnp.where(r > 0, r, 1.0), 0.0)


# -- host-side helpers ------------------------------------------------------------------
def problem_inputs(problem):
    """(fns, w_init, arrays, η) with η a 0-d array in the problem's dtype (traced)."""
    return problem.fns, problem.w_init, problem.arrays, jnp.asarray(problem.inner_lr,
                                                                    problem.dtype)


def as_int(x) -> int:
    return int(jax.device_get(x))


def as_float(x) -> float:
    return float(jax.device_get(x))
