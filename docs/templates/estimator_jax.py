"""Template estimator, JAX side: the first-order estimate ∇_λ L_out(w_t, λ).

Copy to ``hypersweep/algorithms/jax/<name>.py`` (its torch twin, ``estimator_torch.py``,
to ``hypersweep/algorithms/torch/<name>.py``) and register one ``AlgorithmSpec`` naming
both (``docs/extending.md``). The two files keep the same function names and signatures.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hypersweep.algorithms.common import Hypergrad
from hypersweep.algorithms.jax import _core


@functools.partial(jax.jit, static_argnames=("fns",))
def _estimate(fns, w0, lam, arrays, eta, t):
    # t is traced (lax.fori_loop inside run_inner): a new t does not recompile
    w_t = _core.run_inner(_core.inner_grad_fn(fns, arrays), w0, lam, eta, t)
    _, grad_lam = _core.outer_grads(fns, w_t, lam, arrays)
    return grad_lam, w_t


def template_estimator(problem, lam, *, t: int, K: int = 0, seed: int = 0) -> Hypergrad:
    """∇_λ L_out(w_t, λ) after t steps of Φ from w_init (the implicit term is dropped).

    t: inner steps. K, seed: unused. Cost: t inner gradients, one outer gradient.
    """
    fns, w0, arrays, eta = _core.problem_inputs(problem)
    grad_lam, w_t = _estimate(fns, w0, lam, arrays, eta, jnp.asarray(t, jnp.int32))
    return Hypergrad(hypergrad=grad_lam, w_t=w_t, n_inner_grad_evals=t, n_hvp_evals=0)
