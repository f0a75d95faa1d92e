"""Backend-free pieces shared by every estimator: the result type and argument checks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Hypergrad:
    """What every hypergradient estimator returns.

    ``hypergrad``: the estimate of ∇F(λ) (backend array, λ's shape and dtype).
    ``w_t``: the inner iterate the estimate was computed at.
    ``n_inner_grad_evals``: evaluations of ∇_w L_in (one per Φ step, forward or replayed).
    ``n_hvp_evals``: Hessian-/Jacobian-vector products (one per vjp or jvp of Φ or of
    ∇_w L_in, whether w.r.t. w, λ or both at once).
    ``solver_iters``: iterations the linear solver actually used (≤ K; None if none).
    """

    hypergrad: Any
    w_t: Any
    n_inner_grad_evals: int
    n_hvp_evals: int
    solver_iters: int | None = None
    extras: dict = field(default_factory=dict)


def check_budget(t: Any, K: Any, *, uses_K: bool) -> tuple[int, int]:
    """Validate t ≥ 1 and K ≥ 0 as integers; raise ``ValueError`` naming the key."""
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ValueError(f"t must be an integer >= 1; got {t!r}")
    if K is None:
        if uses_K:
            raise ValueError("K must be an integer >= 0 for this algorithm; got None")
        K = 0
    if isinstance(K, bool) or not isinstance(K, int) or K < 0:
        raise ValueError(f"K must be an integer >= 0; got {K!r}")
    return t, K


# Relative residual at which CG / fixed-point / Neumann stop early (K is an upper bound).
DEFAULT_TOL = {"float64": 1e-12, "float32": 1e-6}
