"""The minibatch oracles of the bilevel solvers in JAX (mirrors ``torch/_solver_core.py``).

``Oracles(fns, arrays)`` binds a problem's pure functions (``fns``, static) to its data
(``arrays``, traced) and gives every first- and second-order quantity a solver step needs
over a minibatch of row indices ``idx`` (train rows for L_in, validation rows for L_out);
``all_train``/``all_val`` are the whole splits. Built *inside* the jitted chunk runner
(:func:`run_chunk`), so one compilation serves every instance of equal shapes.

Notation (``hypersweep.notation``): w inner, λ outer, v the linear-system (adjoint)
variable; g^B = ∇_w L_in^B, H^B = ∇²_ww L_in^B, (∂_λ g^B)ᵀ v the cross product.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


class Oracles:
    """Minibatch oracles of one problem instance (see the module docstring)."""

    def __init__(self, fns, arrays, n_train, n_val):
        self.fns, self.arrays = fns, arrays
        self.all_train = jnp.arange(n_train)
        self.all_val = jnp.arange(n_val)

    # -- values ---------------------------------------------------------------------------
    def inner_value(self, w, lam, idx):
        """L_in^B(w, λ)."""
        return self.fns.inner_loss_batch(w, lam, self.arrays, idx)

    def outer_value(self, w, lam, idx):
        """L_out^B(w, λ)."""
        return self.fns.outer_loss_batch(w, lam, self.arrays, idx)

    # -- first order ----------------------------------------------------------------------
    def inner_grad(self, w, lam, idx):
        """g^B(w, λ) = ∇_w L_in^B (one inner gradient)."""
        return jax.grad(self.fns.inner_loss_batch)(w, lam, self.arrays, idx)

    def inner_grads(self, w, lam, idx):
        """(∇_w L_in^B, ∇_λ L_in^B) (one inner gradient and, in the counts, one cross)."""
        return jax.grad(self.fns.inner_loss_batch, argnums=(0, 1))(w, lam, self.arrays, idx)

    def outer_grads(self, w, lam, idx):
        """(∇_w L_out^B, ∇_λ L_out^B) (one outer-gradient pair)."""
        return jax.grad(self.fns.outer_loss_batch, argnums=(0, 1))(w, lam, self.arrays, idx)

    # -- second order ---------------------------------------------------------------------
    def inner_vjp(self, w, lam, idx, v):
        """(g^B, H^B v, (∂_λ g^B)ᵀ v) from one linearization of g^B at (w, λ)."""
        g, vjp = jax.vjp(lambda w_, lam_: self.inner_grad(w_, lam_, idx), w, lam)
        hv, cv = vjp(v)
        return g, hv, cv

    def hvp(self, w, lam, idx, v):
        """H^B v (one Hessian-vector product)."""
        _, vjp = jax.vjp(lambda w_: self.inner_grad(w_, lam, idx), w)
        return vjp(v)[0]

    def cross(self, w, lam, idx, v):
        """(∂_λ g^B)ᵀ v (one cross product)."""
        _, vjp = jax.vjp(lambda lam_: self.inner_grad(w, lam_, idx), lam)
        return vjp(v)[0]



def scatter_rows(memory, idx, rows):
    """``memory`` with rows ``idx`` set to ``rows`` (a repeated index keeps one of its equal
    values: the rows of one batch are computed at one point)."""
    return memory.at[idx].set(rows)


@functools.partial(jax.jit, static_argnames=("step", "fns", "cfg", "n_steps"))
def run_chunk(step, fns, cfg, n_steps, arrays, state, draws):
    """``n_steps`` outer iterations of ``step`` in one compiled call (``lax.scan`` inside
    ``jit``: compiled once per (step, problem functions, config, chunk length, shapes);
    an eager ``lax.scan`` would trace and compile its body again on every call).

    ``draws``: one (n_steps, b) index array per minibatch of a step; ``step(oracles,
    state, draws_k, cfg)``. Returns the state after the last iteration."""
    oracles = Oracles(fns, arrays, cfg.n_train, cfg.n_val)

    def body(carry, draws_k):
        return step(oracles, carry, tuple(draws_k), cfg), None

    out, _ = lax.scan(body, state, tuple(draws), length=n_steps)
    return out


@functools.partial(jax.jit, static_argnames=("init", "fns", "cfg"))
def run_init(init, fns, cfg, arrays, w0, lam0):
    """``init(oracles, w0, lam0, cfg)`` compiled (its full-batch evaluations, if any)."""
    return init(Oracles(fns, arrays, cfg.n_train, cfg.n_val), w0, lam0, cfg)
