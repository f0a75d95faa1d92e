"""Momentum (STORM-type) stochastic bilevel solvers in PyTorch: FSLA, MRBO, SUSTAIN (mirrors
``jax/solvers_momentum.py``).

Each solver is a :class:`~hypersweep.algorithms.solvers_common.Solver`: ``init``/``step``
here, ``samples``/``counts`` in :mod:`hypersweep.algorithms.plans_momentum` (backend-free,
with the STORM recursion they share). The pieces and conventions (oracles, draws, cfg,
counting) are in :mod:`hypersweep.algorithms.solvers_common`.

A STORM recursion evaluates its estimator at the current and at the previous iterate on
the same minibatches, so the states keep the previous iterate (``prev_*``) and the last
direction. At k = 0 the weight of the fresh estimate is 1 (the recursion starts from the
plain estimator, as the papers initialize it), so nothing is read from the zero memories.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from hypersweep.algorithms import plans_momentum as plans
from hypersweep.algorithms.solvers_common import Solver


def _storm(fresh, fresh_prev, memory, rho):
    """d = D(x_k) + (1 − ρ)(d_{k−1} − D(x_{k−1})), both D on the same minibatches."""
    return fresh + (1.0 - rho) * (memory - fresh_prev)


# -- FSLA --------------------------------------------------------------------------------------
class FslaState(NamedTuple):
    """FSLA's state: w, v, λ, the previous (w, v, λ), the outer direction d, k."""

    inner: Any
    adjoint: Any
    outer: Any
    prev_inner: Any
    prev_adjoint: Any
    prev_outer: Any
    direction: Any
    k: Any


def fsla_init(oracles, w0, lam0, cfg) -> FslaState:
    """w₀, v₀ = 0, λ₀; previous point = current; d = 0 (unread: ρ₀ = 1); k = 0."""
    v0 = torch.zeros_like(w0)
    return FslaState(inner=w0, adjoint=v0, outer=lam0, prev_inner=w0, prev_adjoint=v0,
                     prev_outer=lam0, direction=torch.zeros_like(lam0), k=0)


def fsla_step(oracles, state, draws, cfg) -> FslaState:
    """One FSLA iteration (Li, Gu & Huang, AAAI 2022, Algorithm 1 with its STORM outer
    direction).

    With one train batch B and one validation batch B' (``draws``), α = ``inner_step``,
    γ = ``adjoint_step``, β = ``outer_step``, ρ = ``momentum`` (the weight of the fresh
    estimate; ρ₀ = 1), and D_λ(w, v, λ) = ∇_λ L_out^{B'}(w, λ) + (∂_λ ∇_w L_in^B(w, λ))ᵀ v::

        w_{k+1} = w_k − α ∇_w L_in^B(w_k, λ_k)
        v_{k+1} = v_k − γ (H^B(w_k, λ_k) v_k + ∇_w L_out^{B'}(w_k, λ_k))
        d_k     = D_λ(w_k, v_k, λ_k) + (1 − ρ)(d_{k−1} − D_λ(w_{k−1}, v_{k−1}, λ_{k−1}))
        λ_{k+1} = λ_k − β d_k

    v is the paper's hypergradient state (one SGD step per iteration on the linear system
    H v = −∇_w L_out, no Hessian inverse, no inner loop); all directions are taken at the
    current point as in SOBA (one linearization of ∇_w L_in there). ρ = 1 gives SOBA.
    Constant step sizes and momentum (the paper's setting). Cost: 1 inner gradient,
    1 HVP, 2 cross products, 2 outer-gradient pairs (B and B' read at both points).
    """
    idx_in, idx_out = draws
    w, v, lam = state.inner, state.adjoint, state.outer
    g, hv, cv = oracles.inner_vjp(w, lam, idx_in, v)
    gw_out, glam_out = oracles.outer_grads(w, lam, idx_out)
    cv_prev = oracles.cross(state.prev_inner, state.prev_outer, idx_in, state.prev_adjoint)
    _, glam_prev = oracles.outer_grads(state.prev_inner, state.prev_outer, idx_out)
    rho = 1.0 if state.k == 0 else float(cfg.get("momentum"))
    d = _storm(glam_out + cv, glam_prev + cv_prev, state.direction, rho)
    return FslaState(inner=w - cfg.inner_step * g,
                     adjoint=v - cfg.adjoint_step * (hv + gw_out),
                     outer=lam - cfg.outer_step * d,
                     prev_inner=w, prev_adjoint=v, prev_outer=lam, direction=d,
                     k=state.k + 1)


fsla = Solver(init=fsla_init, step=fsla_step, samples=plans.fsla_samples,
              counts=plans.fsla_counts)


# -- MRBO and SUSTAIN: double momentum ------------------------------------------------------------
class DoubleMomentumState(NamedTuple):
    """MRBO's and SUSTAIN's state: w, λ, the previous (w, λ), the inner direction u, the
    outer direction d, k. No linear-system variable: the Neumann series is recomputed at
    every iterate."""

    inner: Any
    outer: Any
    prev_inner: Any
    prev_outer: Any
    inner_direction: Any
    direction: Any
    k: Any


def _double_momentum_init(w0, lam0) -> DoubleMomentumState:
    return DoubleMomentumState(inner=w0, outer=lam0, prev_inner=w0, prev_outer=lam0,
                               inner_direction=torch.zeros_like(w0),
                               direction=torch.zeros_like(lam0), k=0)


def _schedule(cfg, k, dtype):
    """(s_k, ρ_k): s_k = (m/(m+k))^{1/3} scales both steps, ρ_k = ``momentum``·s_{k−1}²
    (ρ₀ = 1); m = ``decay_offset`` (None: s = 1, ρ = ``momentum``)."""
    c = float(cfg.get("momentum"))
    m = plans.decay_offset(cfg)
    if m is None:
        return 1.0, 1.0 if k == 0 else c
    s = (m / (m + float(k))) ** (1.0 / 3.0)
    s_prev = (m / (m + max(float(k) - 1.0, 0.0))) ** (1.0 / 3.0)
    return s, 1.0 if k == 0 else c * s_prev ** 2


def _neumann_adjoint(oracles, w, lam, hess_idx, r, cfg, trunc):
    """v ≈ −H⁻¹ r from the Hessian minibatches ``hess_idx`` (a tuple of n ≥ 0), step
    η = ``adjoint_step``, p₀ = r, p_j = (I − η H^{B_j}) p_{j−1}:

    * ``trunc`` None: v = −η Σ_{j=0}^{n} p_j (MRBO; SUSTAIN's mean in the full-batch
      limit);
    * ``trunc`` = t (int): v = −(n+1) η p_t (SUSTAIN: Ghadimi & Wang's estimator;
      every p_j is computed, those past t are masked, so the cost is fixed)."""
    eta = cfg.adjoint_step
    n = len(hess_idx)
    p, s = r, r
    for j in range(n):
        p_new = p - eta * oracles.hvp(w, lam, hess_idx[j], p)
        if trunc is not None:
            p_new = p_new if j < trunc else p
        p, s = p_new, s + p_new
    return -eta * s if trunc is None else -(n + 1) * eta * p


def _hypergradient(oracles, w, lam, idx_cross, hess_idx, idx_out, cfg, trunc):
    """∇_λ L_out^{B'} + (∂_λ ∇_w L_in^{ζ₀})ᵀ v with v the Neumann estimate."""
    gw_out, glam_out = oracles.outer_grads(w, lam, idx_out)
    v = _neumann_adjoint(oracles, w, lam, hess_idx, gw_out, cfg, trunc)
    return glam_out + oracles.cross(w, lam, idx_cross, v)


def _double_momentum_step(oracles, state, draws, cfg, trunc) -> DoubleMomentumState:
    n_h = plans.n_neumann_batches(cfg)
    idx_g, idx_cross = draws[0], draws[1]
    hess_idx = draws[2:2 + n_h]
    idx_out = draws[2 + n_h]
    w, lam, w_prev, lam_prev = state.inner, state.outer, state.prev_inner, state.prev_outer
    s, rho = _schedule(cfg, state.k, lam.dtype)
    u = _storm(oracles.inner_grad(w, lam, idx_g), oracles.inner_grad(w_prev, lam_prev, idx_g),
               state.inner_direction, rho)
    d = _storm(_hypergradient(oracles, w, lam, idx_cross, hess_idx, idx_out, cfg, trunc),
               _hypergradient(oracles, w_prev, lam_prev, idx_cross, hess_idx, idx_out, cfg,
                              trunc),
               state.direction, rho)
    return DoubleMomentumState(inner=w - (cfg.inner_step * s) * u,
                               outer=lam - (cfg.outer_step * s) * d,
                               prev_inner=w, prev_outer=lam, inner_direction=u, direction=d,
                               k=state.k + 1)


def mrbo_init(oracles, w0, lam0, cfg) -> DoubleMomentumState:
    """w₀, λ₀; previous point = current; u = d = 0 (unread: ρ₀ = 1); k = 0."""
    return _double_momentum_init(w0, lam0)


def mrbo_step(oracles, state, draws, cfg) -> DoubleMomentumState:
    """One MRBO iteration (Yang, Ji & Liang, NeurIPS 2021, Algorithm 1).

    Draws: ζ (train), ζ₀ (train), B_1…B_Q (train, Q = ``n_hia_steps``), B' (val). With
    α = ``inner_step``, β = ``outer_step``, η = ``adjoint_step`` (the Neumann step, = α),
    the hypergradient estimate (the paper's eq. (3), a Q-term stochastic Neumann sum)::

        p_0 = ∇_w L_out^{B'}(w, λ),  p_j = (I − η H^{B_j}(w, λ)) p_{j−1},  v = −η Σ_{j=0}^{Q} p_j
        D(w, λ) = ∇_λ L_out^{B'}(w, λ) + (∂_λ ∇_w L_in^{ζ₀}(w, λ))ᵀ v

    and the two STORM recursions (same draws at the current and the previous iterate)::

        u_k = ∇_w L_in^ζ(w_k, λ_k) + (1 − ρ_k)(u_{k−1} − ∇_w L_in^ζ(w_{k−1}, λ_{k−1}))
        d_k = D(w_k, λ_k) + (1 − ρ_k)(d_{k−1} − D(w_{k−1}, λ_{k−1}))
        w_{k+1} = w_k − α s_k u_k,   λ_{k+1} = λ_k − β s_k d_k

    Schedule (the paper's η_k = t/(m+k)^{1/3}, α_{k+1} = c η_k², normalized so s₀ = 1):
    s_k = (m/(m+k))^{1/3}, ρ_k = c·s_{k−1}² (ρ₀ = 1), c = ``momentum``, m =
    ``decay_offset`` (None: constant s = 1, ρ = c). One c for both recursions (the paper
    has c₁, c₂). Cost: at each of the two points 1 inner gradient, Q HVPs, 1 cross
    product, 1 outer-gradient pair.
    """
    return _double_momentum_step(oracles, state, draws, cfg, None)


mrbo = Solver(init=mrbo_init, step=mrbo_step, samples=plans.mrbo_samples,
              counts=plans.mrbo_counts)


def sustain_init(oracles, w0, lam0, cfg) -> DoubleMomentumState:
    """w₀, λ₀; previous point = current; u = d = 0 (unread: ρ₀ = 1); k = 0."""
    return _double_momentum_init(w0, lam0)


def sustain_step(oracles, state, draws, cfg) -> DoubleMomentumState:
    """One SUSTAIN iteration (Khanduri et al., NeurIPS 2021, Algorithm 1).

    As :func:`mrbo_step` (same STORM recursions on u and d, same schedule, the paper's
    α_t ∝ (w+t)^{-1/3} and η_{t+1} = c α_t²), with Q − 1 Hessian draws and Ghadimi &
    Wang's randomly truncated Neumann estimate (Q = ``n_hia_steps``)::

        t ~ U{0, …, Q−1},   v = −Q η Π_{j=1}^{t} (I − η H^{B_j}(w, λ)) ∇_w L_out^{B'}(w, λ)

    t comes from the host: the last draw (train rows, no data read) mixed into an integer
    (:func:`~hypersweep.algorithms.plans_momentum.truncation_weights`); the same t serves
    both points. Where that draw is the whole split (the deterministic limit) v is the
    estimator's mean −η Σ_{j=0}^{Q−1} Π_{i≤j}(I − η H) ∇_w L_out. Cost: at each of the two
    points 1 inner gradient, Q − 1 HVPs (masked past t), 1 cross, 1 outer pair.
    """
    trunc = None
    if plans.random_truncation(cfg):
        q = int(cfg.get("n_hia_steps"))
        weights = torch.as_tensor(plans.truncation_weights(cfg), dtype=draws[-1].dtype,
                                  device=draws[-1].device)
        trunc = int(torch.sum((draws[-1] % q) * weights) % q)
    return _double_momentum_step(oracles, state, draws, cfg, trunc)


sustain = Solver(init=sustain_init, step=sustain_step, samples=plans.sustain_samples,
                 counts=plans.sustain_counts)
