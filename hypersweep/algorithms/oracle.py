"""The ``exact`` "estimator": the problem's float64 oracle ∇F(λ), as a backend array.

Backend-free: it goes through ``problem.ops``, so one function serves JAX and PyTorch and
this module imports neither. Used by the HPO pipeline for "gradient descent on the exact
value function" (the ridge tutorial's reference method).
"""
from __future__ import annotations

from hypersweep.algorithms.common import Hypergrad


def exact(problem, lam, *, t: int = 1, K: int = 0, seed: int = 0) -> Hypergrad:
    """∇F(λ) from ``problem.exact_hypergradient`` and w_t = w*(λ), cast to the problem's dtype.

    t, K, seed: unused (no inner iterations are run). The oracle is computed in float64
    numpy: a closed form where the problem has one (ridge: two dense solves, O(d³)),
    else Newton on L_in to ‖∇‖ ≤ 1e-12 plus a direct adjoint solve. Counts are 0: no
    gradient or Hessian-vector product of the backend is evaluated.
    """
    lam_np = problem.lam_numpy(lam)
    hypergrad = problem.ops.asarray(problem.exact_hypergradient(lam_np), problem.dtype)
    w_star = problem.ops.asarray(problem.exact_inner_solution(lam_np), problem.dtype)
    return Hypergrad(hypergrad=hypergrad, w_t=w_star, n_inner_grad_evals=0, n_hvp_evals=0,
                     n_outer_grad_evals=0, solver_iters=None, extras={"oracle": True})
