"""Iterative differentiation (ITD) and its truncations in JAX.

w_t = Φ^t(w_init) with Φ(w, λ) = w − η ∇_w L_in(w, λ); the target is the exact derivative
of λ ↦ L_out(w_t(λ), λ) through the t steps.

Reverse mode (``itd``, ``tbptt``, ``one_step``). Reverse-mode autodiff cannot go through a
``while_loop`` of traced length, so the pass is written by hand:

* forward: ``lax.fori_loop`` over the traced t, writing w_s into a trajectory buffer of
  static length ``bucket`` (ring buffer: slot s mod bucket);
* reverse, over the traced number n of steps to differentiate through (n = t for ITD,
  min(K, t) for TBPTT)::

      p = ∇_w L_out(w_t, λ);  h = ∇_λ L_out(w_t, λ)
      for s = t−1, …, t−n:  (p, dλ) = vjp of Φ at (w_s, λ) applied to p;  h += dλ

  and h is returned (steps before t − n are treated as constant in λ).

``bucket`` is the next power of two ≥ n, so the compilation cache key is
(problem functions, array shapes/dtypes, bucket): at most one compilation per power-of-two
bucket of n, and memory O(bucket · dim w) ≤ O(2 n · dim w).

Forward mode (``itd_forward``) propagates Z_s = dw_s/dλ and needs no buffer (t traced,
one compilation for every t), at dim λ Jacobian-vector products per step.

Counting convention (``Hypergrad``, table in ``docs/costs.md``): ``n_inner_grad_evals``
= t (the forward steps); a reverse step is one vjp of Φ at (w_s, λ), which yields both
∂_wΦᵀp and ∂_λΦᵀp: one ``n_hvp_evals`` and one ``n_cross_evals`` each; forward mode does
t · dim λ jvps of Φ, each one of both; ``n_outer_grad_evals`` = 1.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from hypersweep.algorithms.common import Hypergrad, next_pow2
from hypersweep.algorithms.jax import _core


def _record(grad_fn, lam, eta, bucket, w, trajectory, lo, hi, live=None):
    """Φ steps s = lo, …, hi − 1 from w, each writing w_s into slot s mod ``bucket`` first.

    ``live(s)`` (a traced bool; None: always): a step where it is False leaves w and the
    buffer as they are. The t-grid form (``grid.py``) runs one loop over the lanes' union of
    steps with each lane's own range as ``live``, so the loop bounds stay unbatched under
    vmap: a loop with per-lane bounds would select over the whole buffer every step.
    """
    step = lambda w: _core.phi(grad_fn, w, lam, eta)  # noqa: E731

    def body(s, carry):
        w, trajectory = carry
        slot = s % bucket
        if live is None:
            return step(w), lax.dynamic_update_index_in_dim(trajectory, w, slot, 0)
        on = live(s)
        kept = lax.dynamic_index_in_dim(trajectory, slot, 0, keepdims=False)
        trajectory = lax.dynamic_update_index_in_dim(trajectory, jnp.where(on, w, kept),
                                                     slot, 0)
        return jnp.where(on, step(w), w), trajectory

    return lax.fori_loop(lo, hi, body, (w, trajectory))


def _reverse_pass(fns, grad_fn, arrays, lam, eta, bucket, trajectory, w_t, t, n_rev):
    """h = ∇_λ L_out(w_t) + the vjps of Φ at w_{t−1}, …, w_{t−n_rev} (read from the ring
    buffer, which must hold them) applied to ∇_w L_out(w_t)."""
    p, h = _core.outer_grads(fns, w_t, lam, arrays)

    def reverse_step(j, carry):
        p, h = carry
        w_s = lax.dynamic_index_in_dim(trajectory, (t - 1 - j) % bucket, 0, keepdims=False)
        _, vjp_phi = jax.vjp(lambda w, lam_: _core.phi(grad_fn, w, lam_, eta), w_s, lam)
        p, d_lam = vjp_phi(p)
        return p, h + d_lam

    _, h = lax.fori_loop(0, n_rev, reverse_step, (p, h))
    return h


@functools.partial(jax.jit, static_argnames=("fns", "bucket"))
def _reverse(fns, bucket, w0, lam, arrays, eta, t, n_rev):
    grad_fn = _core.inner_grad_fn(fns, arrays)
    trajectory = jnp.zeros((bucket,) + w0.shape, w0.dtype)
    w_t, trajectory = _record(grad_fn, lam, eta, bucket, w0, trajectory, 0, t)
    return _reverse_pass(fns, grad_fn, arrays, lam, eta, bucket, trajectory, w_t, t,
                         n_rev), w_t


def _run_reverse(problem, lam, t: int, n_rev: int) -> Hypergrad:
    fns, w0, arrays, eta = _core.problem_inputs(problem)
    bucket = next_pow2(n_rev)
    hypergrad, w_t = jax.block_until_ready(_reverse(
        fns, bucket, w0, lam, arrays, eta, jnp.asarray(t, jnp.int32),
        jnp.asarray(n_rev, jnp.int32)))
    return Hypergrad(hypergrad=hypergrad, w_t=w_t, n_inner_grad_evals=t,
                     n_hvp_evals=n_rev, n_cross_evals=n_rev, solver_iters=None)


def itd(problem, lam, *, t: int, K: int = 0, seed: int = 0) -> Hypergrad:
    """Iterative differentiation, reverse mode: d/dλ L_out(w_t(λ), λ) exactly.

    t: inner steps, all differentiated through. K, seed: unused.
    Cost: t gradient steps forward, t vjps of Φ backward (t Hessian-vector and t cross
    products), one outer gradient; memory
    O(bucket · dim w), bucket = next power of two ≥ t (one compilation per bucket).
    References: Maclaurin et al. 2015; Franceschi et al. 2017.
    """
    return _run_reverse(problem, lam, t, t)


def tbptt(problem, lam, *, t: int, K: int, seed: int = 0) -> Hypergrad:
    """Truncated back-propagation: reverse mode through the last min(K, t) of the t steps.

    t: inner steps. K: truncation length; w_{t−K} is treated as constant in λ.
    K ≥ t gives ``itd``; K = 0 gives ``first_order``; K = 1 gives ``one_step``.
    Cost: t gradient steps, min(K, t) vjps of Φ; memory O(bucket · dim w) with bucket =
    next power of two ≥ min(K, t) (one compilation per bucket). Reference: Shaban et al. 2019.
    """
    return _run_reverse(problem, lam, t, min(K, t))


def one_step(problem, lam, *, t: int, K: int = 0, seed: int = 0) -> Hypergrad:
    """One-step: ∇_λ L_out(w_t, λ) + ∂_λΦ(w_{t−1}, λ)ᵀ ∇_w L_out(w_t, λ) (= tbptt, K = 1).

    t: inner steps. K, seed: unused. Cost: t gradient steps, 1 vjp of Φ.
    References: Luketina et al. 2016; Baydin et al. 2018.
    """
    return _run_reverse(problem, lam, t, 1)


@functools.partial(jax.jit, static_argnames=("fns",))
def _first_order(fns, w0, lam, arrays, eta, t):
    w_t = _core.run_inner(_core.inner_grad_fn(fns, arrays), w0, lam, eta, t)
    return _core.outer_grads(fns, w_t, lam, arrays)[1], w_t


def first_order(problem, lam, *, t: int, K: int = 0, seed: int = 0) -> Hypergrad:
    """First-order estimate ∇_λ L_out(w_t, λ): the dependence of w_t on λ is dropped.

    t: inner steps. K, seed: unused. Cost: t gradient steps, no Hessian products.
    References: Finn et al. 2017 (FOMAML); Nichol et al. 2018.
    """
    fns, w0, arrays, eta = _core.problem_inputs(problem)
    hypergrad, w_t = jax.block_until_ready(
        _first_order(fns, w0, lam, arrays, eta, jnp.asarray(t, jnp.int32)))
    return Hypergrad(hypergrad=hypergrad, w_t=w_t, n_inner_grad_evals=t, n_hvp_evals=0)


def _forward_start(w0, lam):
    """(directions, Z_0): the basis e_i of λ-space, one per vmapped tangent, and Z_0 = 0."""
    n_lam = lam.size
    directions = jnp.eye(n_lam, dtype=lam.dtype).reshape((n_lam,) + lam.shape)
    return directions, jnp.zeros((n_lam,) + w0.shape, w0.dtype)


def _forward_steps(grad_fn, lam, eta, directions, w, Z, n):
    """n steps of (w, Z) ↦ (Φ(w), ∂_wΦ Z + ∂_λΦ e), n traced."""
    def step(s, carry):
        w, Z = carry
        # Z_{s+1} e = ∂_wΦ(w_s) Z_s e + ∂_λΦ(w_s) e, one linearization for all directions.
        w_next, phi_jvp = jax.linearize(
            lambda w_, lam_: _core.phi(grad_fn, w_, lam_, eta), w, lam)
        return w_next, jax.vmap(phi_jvp)(Z, directions)

    return lax.fori_loop(0, n, step, (w, Z))


def _forward_readout(fns, arrays, lam, directions, w_t, Z):
    """hypergrad_i = ∇_w L_out(w_t)·Z e_i + ∂_λ L_out(w_t)·e_i, λ's shape."""
    _, out_jvp = jax.linearize(lambda w_, lam_: fns.outer_loss(w_, lam_, arrays), w_t, lam)
    return jax.vmap(out_jvp)(Z, directions).reshape(lam.shape)


@functools.partial(jax.jit, static_argnames=("fns",))
def _forward(fns, w0, lam, arrays, eta, t):
    grad_fn = _core.inner_grad_fn(fns, arrays)
    directions, Z = _forward_start(w0, lam)
    w_t, Z = _forward_steps(grad_fn, lam, eta, directions, w0, Z, t)
    return _forward_readout(fns, arrays, lam, directions, w_t, Z), w_t


def itd_forward(problem, lam, *, t: int, K: int = 0, seed: int = 0) -> Hypergrad:
    """Iterative differentiation in forward mode; equals ``itd`` up to rounding.

    Propagates Z_s = dw_s/dλ (one tangent per basis direction of λ, vmapped) through the t
    steps, then hypergrad_i = ∇_w L_out(w_t)·Z_t e_i + ∂_λ L_out(w_t)·e_i.
    t: inner steps. K, seed: unused.
    Cost: t gradient steps and t · dim λ Jacobian-vector products (``n_hvp_evals``);
    memory O(dim λ · dim w), independent of t; one compilation for every t.
    Reference: Franceschi et al. 2017 (forward-mode / RTHO).
    """
    fns, w0, arrays, eta = _core.problem_inputs(problem)
    hypergrad, w_t = jax.block_until_ready(
        _forward(fns, w0, lam, arrays, eta, jnp.asarray(t, jnp.int32)))
    n_lam = int(hypergrad.size)
    return Hypergrad(hypergrad=hypergrad, w_t=w_t, n_inner_grad_evals=t,
                     n_hvp_evals=t * n_lam, n_cross_evals=t * n_lam)
