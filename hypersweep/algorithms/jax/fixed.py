"""The ``fixed`` baseline in JAX: the inner problem solved as the estimators solve it, λ
left where it is (see :mod:`hypersweep.algorithms.torch.fixed`, its mirror)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hypersweep.algorithms.common import Hypergrad
from hypersweep.algorithms.jax import _core


@functools.partial(jax.jit, static_argnames=("fns",))
def _inner(fns, w0, lam, arrays, eta, t):
    return _core.run_inner(_core.inner_grad_fn(fns, arrays), w0, lam, eta, t)


def fixed(problem, lam, *, t: int, K: int = 0, seed: int = 0) -> Hypergrad:
    """No tuning: w_t = Φ^t(w_init) at λ, and a hypergradient of exactly zero.

    The reference for a tuning method: run by the hpo pipeline, λ stays λ₀ (the pipeline
    makes no outer update for a ``baseline``), and each outer step trains w as the
    estimators do (t steps of Φ, from w_init or, with ``warm_start_w``, from the previous
    w_t), so the table shows what tuning bought over training at λ₀.

    t: inner steps. K, seed: unused.
    Cost: t inner gradients; no outer gradient, no Hessian or cross product.
    """
    fns, w0, arrays, eta = _core.problem_inputs(problem)
    w_t = jax.block_until_ready(_inner(fns, w0, lam, arrays, eta, jnp.asarray(t, jnp.int32)))
    return Hypergrad(hypergrad=jnp.zeros_like(lam), w_t=w_t, n_inner_grad_evals=t,
                     n_hvp_evals=0, n_outer_grad_evals=0)
