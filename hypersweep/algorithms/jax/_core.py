"""Shared JAX pieces of the hypergradient estimators: the inner map and the linear solvers.

Conventions (shared with the PyTorch implementation; see ``hypersweep.notation``)::

    g(w, λ)   = ∇_w L_in(w, λ)            (the problem's analytic ``inner_grad`` when it
                                           has one, else ``jax.grad`` of ``inner_loss``)
    Φ(w, λ)   = w − η g(w, λ)              (one inner gradient step, η = problem.inner_lr)
    ∂_wΦ      = I − η H,   H = ∇²_w L_in   (symmetric)
    ∂_λΦ      = −η ∂_λ g

Every public function and class here has the same name and signature as in
:mod:`hypersweep.algorithms.torch._core` (checked by ``tests/test_mirror.py``).

Everything here is a small pure function meant to be called *inside* a ``jax.jit``-ed
estimator: ``fns`` (the problem's hashable :class:`~hypersweep.problems.base.ProblemFns`)
is a static argument there, ``arrays``, ``lam``, η, t and K are traced. The solvers take a
``matvec`` closure, so CG, fixed point and Neumann share one adjoint set-up.

Loop bounds (t, K) are traced integers handed to ``lax.fori_loop`` / ``lax.while_loop``,
so changing t or K never triggers a recompilation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from hypersweep.algorithms.common import DEFAULT_TOL, SolveResult


def tolerance(dtype) -> float:
    """The relative residual at which the iterative adjoint solvers stop early."""
    return DEFAULT_TOL[jnp.dtype(dtype).name]


def vdot(a, b):
    """Σ a ⊙ b for arrays of any (equal) shape, as a scalar."""
    return jnp.sum(a * b)


def norm(a):
    """‖a‖₂ over all entries."""
    return jnp.sqrt(vdot(a, a))


def problem_inputs(problem):
    """(fns, w_init, arrays, η) with η a 0-d array in the problem's dtype (traced)."""
    return problem.fns, problem.w_init, problem.arrays, jnp.asarray(problem.inner_lr,
                                                                    problem.dtype)


# -- the inner map ----------------------------------------------------------------------
def inner_grad_fn(fns, arrays):
    """g(w, λ) = ∇_w L_in(w, λ) with the data bound: analytic when the problem has it,
    else ``jax.grad`` of ``inner_loss``."""
    if fns.has_inner_grad:
        return lambda w, lam: fns.inner_grad(w, lam, arrays)
    return lambda w, lam: jax.grad(fns.inner_loss)(w, lam, arrays)


def batch_inner_grad_fn(fns, arrays):
    """g^B(w, λ, idx) = ∇_w L_in^B(w, λ) over the training rows ``idx``."""
    return lambda w, lam, idx: jax.grad(fns.inner_loss_batch)(w, lam, arrays, idx)


def phi(grad_fn, w, lam, eta):
    """Φ(w, λ) = w − η g(w, λ) for ``grad_fn`` = g."""
    return w - eta * grad_fn(w, lam)


def run_inner(grad_fn, w0, lam, eta, t):
    """w_t = Φ^t(w0) with a traced t (t evaluations of g).

    The loop body takes two steps (plus one remainder step): with a traced trip count XLA
    cannot unroll the while loop itself, and on CPU its per-iteration overhead doubled
    the time of t = 1000 logreg steps (measured 25 ms → 11 ms; benchmarks/hypergradient.py).
    """
    step = lambda w: phi(grad_fn, w, lam, eta)  # noqa: E731
    w = lax.fori_loop(0, t // 2, lambda s, w: step(step(w)), w0)
    return lax.fori_loop(0, t % 2, lambda s, w: step(w), w)


# -- derivatives at a point --------------------------------------------------------------
def outer_grads(fns, w, lam, arrays):
    """(∇_w L_out(w, λ), ∇_λ L_out(w, λ)); zeros where L_out ignores λ."""
    return jax.grad(fns.outer_loss, argnums=(0, 1))(w, lam, arrays)


def outer_grads_batch(fns, w, lam, arrays, idx):
    """(∇_w L_out^B, ∇_λ L_out^B): the minibatch loss over the validation rows ``idx``."""
    return jax.grad(fns.outer_loss_batch, argnums=(0, 1))(w, lam, arrays, idx)


class Linearization:
    """g = ``grad_fn`` linearized once at (w, λ); every product reuses the linearization.

    ``hvp(v) = H v = (∂_w g)ᵀ v`` (H is symmetric) and ``cross(v) = (∂_λ g)ᵀ v``, each one
    vjp of g (one Hessian-vector resp. cross product in the counts). ``g`` is g(w, λ).
    """

    def __init__(self, grad_fn, w, lam):
        self.w, self.lam = w, lam
        self._grad_w = lambda w_: grad_fn(w_, lam)
        self.g, self._vjp_w = jax.vjp(self._grad_w, w)
        _, self._vjp_lam = jax.vjp(lambda lam_: grad_fn(w, lam_), lam)

    def hvp(self, v):
        return self._vjp_w(v)[0]

    def cross(self, v):
        return self._vjp_lam(v)[0]

    def dense_hessian(self):
        """∂_w g as a (dim w, dim w) matrix, by forward mode (dim w Jacobian-vector
        products)."""
        n = self.w.size
        return jax.jacfwd(self._grad_w)(self.w).reshape(n, n)


# -- linear solvers (pure; take a matvec) ------------------------------------------------
def is_nonzero(x):
    """Whether any entry of x is non-zero (a traced bool): a warm start worth a product."""
    return jnp.any(x != 0)


def cg(matvec, b, *, max_iter, tol, x0=None) -> SolveResult:
    """Conjugate gradient for A x = b, A symmetric positive definite, from x₀ (default 0).

    Runs at most ``max_iter`` (traced) iterations; stops when the recursively updated
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

    Returns a :class:`~hypersweep.algorithms.common.SolveResult`: ``iters`` = CG
    iterations (≤ max_iter; the r₀ matvec is not included, ``matvecs`` includes it),
    ``rel_residual`` = ‖r‖/‖b‖ of the returned x (recursive residual; 0 if b = 0).
    """
    dtype = b.dtype
    tiny = jnp.finfo(dtype).tiny
    b_norm = norm(b)
    stop_at = tol * b_norm
    if x0 is None:
        x0, r0, warm = jnp.zeros_like(b), b, jnp.asarray(False)
    else:
        x0 = x0.astype(dtype)
        warm = is_nonzero(x0)
        r0 = lax.cond(warm, lambda: b - matvec(x0), lambda: b)
    rr0 = vdot(r0, r0)

    def cond(state):
        k, _, _, _, rr, healthy = state
        return (k < max_iter) & healthy & (jnp.sqrt(rr) > stop_at)

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
    # the loop applies A once per iteration, the warm start once more
    return SolveResult(x, k, _relative(jnp.sqrt(rr), b), k + warm.astype(k.dtype))


def fixed_point(matvec, b, *, max_iter, tol, v0=None) -> SolveResult:
    """Fixed-point (Richardson) iteration v_{k+1} = M v_k + b from v₀ (default 0),
    ``matvec(v) = M v`` (for AID, M = ∂_wΦᵀ = I − ηH).

    At most ``max_iter`` (traced) steps; stops after the first step with
    ‖v_{k+1} − v_k‖ ≤ tol·‖b‖ (that difference is the residual b − (I − M) v_k).
    From v₀ = 0 the first step is free (v₁ = b), so the cost is max(steps − 1, 0)
    matvecs; from a ``v0`` (traced) with a non-zero entry every step costs one
    (decided at run time by ``lax.cond``: one compilation, and v₀ = 0 is the cold run).
    max_iter = 0 returns v₀.

    Returns a :class:`~hypersweep.algorithms.common.SolveResult` with ``rel_residual`` =
    ‖v_steps − v_{steps−1}‖/‖b‖.
    """
    stop_at = tol * norm(b)
    started = max_iter >= 1
    if v0 is None:
        v0, first, warm = jnp.zeros_like(b), b, jnp.asarray(False)
    else:
        v0 = v0.astype(b.dtype)
        # M is applied only if the step is taken at all and v₀ ≠ 0 (else M v₀ = 0).
        warm = started & is_nonzero(v0)
        first = lax.cond(warm, lambda: matvec(v0) + b, lambda: b)
    v1 = jnp.where(started, first, v0)
    k1 = jnp.where(started, 1, 0).astype(jnp.int32)
    delta1 = jnp.where(started, norm(first - v0), jnp.inf).astype(b.dtype)

    def cond(state):
        k, _, delta = state
        return (k < max_iter) & (delta > stop_at) & jnp.isfinite(delta)

    def body(state):
        k, v, _ = state
        v_new = matvec(v) + b
        return k + 1, v_new, norm(v_new - v)

    k, v, delta = lax.while_loop(cond, body, (k1, v1, delta1))
    # one matvec per loop step after the first, and the first one only from a warm v₀
    return SolveResult(v, k, _relative(delta, b), k - k1 + warm.astype(k.dtype))


def neumann(matvec, b, *, n_terms, tol) -> SolveResult:
    """Truncated Neumann series v = Σ_{j=0}^{K} M^j b, K = ``n_terms`` (traced),
    ``matvec(v) = M v``.

    Computed as a power series (term_{j+1} = M term_j, v += term), i.e. not by the
    fixed-point recursion, although in exact arithmetic it equals ``fixed_point`` with
    K + 1 steps: v_{K+1} = M v_K + b = Σ_{j=0}^{K} M^j b. Stops early after adding a
    term with ‖term‖ ≤ tol·‖b‖ (the same rule and index as ``fixed_point``).
    No warm start: the series has no initial point (warm-start ``fixed_point``).
    Cost: K matvecs (fewer on an early stop).

    Returns a :class:`~hypersweep.algorithms.common.SolveResult`: ``iters`` = terms
    added beyond b (= matvecs), ``rel_residual`` = ‖last term‖/‖b‖.
    """
    stop_at = tol * norm(b)

    def cond(state):
        j, _, term, term_norm = state
        return (j < n_terms) & (term_norm > stop_at) & jnp.isfinite(term_norm)

    def body(state):
        j, v, term, _ = state
        term = matvec(term)
        return j + 1, v + term, term, norm(term)

    init = (jnp.asarray(0, jnp.int32), b, b, norm(b))
    j, v, _, term_norm = lax.while_loop(cond, body, init)
    return SolveResult(v, j, _relative(term_norm, b), j)


def _relative(x, b):
    r = norm(b)
    return jnp.where(r > 0, x / jnp.where(r > 0, r, 1.0), 0.0)
