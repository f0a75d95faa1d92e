"""Single-loop stochastic bilevel solvers in JAX (mirrors ``torch/solvers_single.py``).

Each solver is a :class:`~hypersweep.algorithms.solvers_common.Solver`: ``init``/``step``
here, ``samples``/``counts`` in :mod:`hypersweep.algorithms.plans_single` (backend-free).
The pieces and conventions (oracles, draws, cfg, counting) are in
:mod:`hypersweep.algorithms.solvers_common`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from hypersweep.algorithms import plans_single
from hypersweep.algorithms.solvers_common import Solver


class SobaState(NamedTuple):
    """SOBA's state: inner w, linear-system v, outer λ, iteration count k."""

    inner: Any
    adjoint: Any
    outer: Any
    k: Any


def soba_init(oracles, w0, lam0, cfg) -> SobaState:
    """w₀, v₀ = 0, λ₀, k = 0."""
    return SobaState(inner=w0, adjoint=jnp.zeros_like(w0), outer=lam0,
                     k=jnp.asarray(0, jnp.int32))


def soba_step(oracles, state, draws, cfg) -> SobaState:
    """One SOBA iteration (Dagréou et al. 2022, Algorithm 1).

    With one train batch B and one validation batch B' (``draws``), α = ``inner_step``,
    γ = ``adjoint_step``, β = ``outer_step``, all three directions at the current point::

        D_w = ∇_w L_in^B(w, λ)
        D_v = H^B(w, λ) v + ∇_w L_out^{B'}(w, λ)
        D_λ = ∇_λ L_out^{B'}(w, λ) + (∂_λ ∇_w L_in^B(w, λ))ᵀ v
        w ← w − α D_w,  v ← v − γ D_v,  λ ← λ − β D_λ

    v tracks −[H]⁻¹ ∇_w L_out, so D_λ estimates ∇F(λ) at w. Cost: 1 inner gradient,
    1 HVP, 1 cross product (one linearization of ∇_w L_in^B), 1 outer-gradient pair.
    """
    idx_in, idx_out = draws
    w, v, lam = state.inner, state.adjoint, state.outer
    g, hv, cv = oracles.inner_vjp(w, lam, idx_in, v)
    gw_out, glam_out = oracles.outer_grads(w, lam, idx_out)
    return SobaState(inner=w - cfg.inner_step * g,
                     adjoint=v - cfg.adjoint_step * (hv + gw_out),
                     outer=lam - cfg.outer_step * (glam_out + cv),
                     k=state.k + 1)


soba = Solver(init=soba_init, step=soba_step, samples=plans_single.soba_samples,
              counts=plans_single.soba_counts)
