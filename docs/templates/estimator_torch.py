"""Template estimator, PyTorch side: the first-order estimate ∇_λ L_out(w_t, λ).

The twin of ``estimator_jax.py`` (same names, same signature, same counts); see there.
"""
from __future__ import annotations

from hypersweep.algorithms.common import Hypergrad
from hypersweep.algorithms.torch import _core


def template_estimator(problem, lam, *, t: int, K: int = 0, seed: int = 0) -> Hypergrad:
    """∇_λ L_out(w_t, λ) after t steps of Φ from w_init (the implicit term is dropped).

    t: inner steps. K, seed: unused. Cost: t inner gradients, one outer gradient.
    """
    fns, w0, arrays, eta = _core.problem_inputs(problem)
    w_t = _core.run_inner(_core.inner_grad_fn(fns, arrays), w0, lam, eta, t)
    _, grad_lam = _core.outer_grads(fns, w_t, lam, arrays)
    return Hypergrad(hypergrad=grad_lam, w_t=w_t, n_inner_grad_evals=t, n_hvp_evals=0)
