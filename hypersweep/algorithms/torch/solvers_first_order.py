"""First- and zeroth-order stochastic bilevel solvers in PyTorch (mirrors
``jax/solvers_first_order.py``): F2SA, BOME, PZOBO — no Hessian-vector or cross product
of second order.

Each solver is a :class:`~hypersweep.algorithms.solvers_common.Solver`: ``init``/``step``
here, ``samples``/``counts`` in :mod:`hypersweep.algorithms.plans_first_order`
(backend-free). The pieces and conventions (oracles, draws, cfg, counting) are in
:mod:`hypersweep.algorithms.solvers_common`. A ∇_λ L_in (from ``oracles.inner_grads``)
counts as one inner gradient and one cross product, by the package's convention.

The three are biased by design: F2SA by O(1/ν) (the penalty), BOME by its finite
barrier multiplier (see :func:`bome_step`), PZOBO by the truncated inner loop
((I − αH)^T on the implicit term) and the smoothing μ. Their deterministic limit stalls
near, not at, a stationary point of F.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from hypersweep.algorithms import plans_first_order as plans
from hypersweep.algorithms.solvers_common import Solver


def _dot(a, b):
    return torch.sum(a * b)


# --- F2SA ---------------------------------------------------------------------------------
class F2saState(NamedTuple):
    """F2SA's state: inner w (the penalized problem's iterate, y in the paper), ``lower``
    z (the lower-level iterate, z ≈ w*(λ)), outer λ, iteration count k."""

    inner: Any
    lower: Any
    outer: Any
    k: Any


def f2sa_init(oracles, w0, lam0, cfg) -> F2saState:
    """w₀, z₀ = w₀, λ₀, k = 0."""
    return F2saState(inner=w0, lower=w0, outer=lam0, k=0)


def f2sa_step(oracles, state, draws, cfg) -> F2saState:
    """One F2SA iteration (Kwon, Kwon, Wright & Nowak, ICML 2023, Algorithm 1).

    F2SA minimizes the penalty L_ν(λ, w) = L_out(w, λ) + ν (L_in(w, λ) − min_z L_in(z, λ))
    with first-order oracles only: w tracks argmin_w L_ν, z tracks w*(λ), and as ν → ∞
    ∇_λ L_ν at those points → ∇F(λ) (bias O(1/ν)). With ν = ν_k, α = ``inner_step``,
    β = ``outer_step``, T = ``n_inner_steps`` and, at inner step t, a train batch B_t and a
    validation batch B'_t (``draws``)::

        z ← z − α ∇_w L_in^{B_t}(z, λ)
        w ← w − α (∇_w L_in^{B_t}(w, λ) + ∇_w L_out^{B'_t}(w, λ) / ν)      (t < T)
        λ ← λ − β (∇_λ L_out^{B'}(w, λ) + ν (∇_λ L_in^B(w, λ) − ∇_λ L_in^B(z, λ)))

    The w step is the paper's step α_k on ∇_w L_out + ν ∇_w L_in with α_k ν_k fixed to α
    (its coupling α_k λ_k ≍ γ_k), so it stays stable as ν grows. Multiplier schedule
    (:func:`~hypersweep.algorithms.plans_first_order.f2sa_multiplier`): linear,
    ν_k = ``multiplier0`` + ``multiplier_growth``·k; the paper grows it polynomially with
    decaying α_k, β_k — here α, β are the benchmark's fixed steps. The λ step uses one
    train batch for both ∇_λ L_in, so their difference keeps its O(1/ν) size.

    Cost: 2T + 2 inner gradients, 2 cross products (the ∇_λ L_in), T + 1 outer-gradient
    pairs, no HVP.
    """
    T = cfg.get("n_inner_steps")
    alpha, beta = cfg.inner_step, cfg.outer_step
    lam = state.outer
    nu = plans.f2sa_multiplier(cfg, float(state.k))
    w, z = state.inner, state.lower
    for t in range(T):
        i_in, i_out = draws[2 * t], draws[2 * t + 1]
        gz = oracles.inner_grad(z, lam, i_in)
        gw = oracles.inner_grad(w, lam, i_in)
        fw, _ = oracles.outer_grads(w, lam, i_out)
        w, z = w - alpha * (gw + fw / nu), z - alpha * gz
    i_in, i_out = draws[2 * T], draws[2 * T + 1]
    _, f_lam = oracles.outer_grads(w, lam, i_out)
    _, g_lam_w = oracles.inner_grads(w, lam, i_in)
    _, g_lam_z = oracles.inner_grads(z, lam, i_in)
    lam_new = lam - beta * (f_lam + nu * (g_lam_w - g_lam_z))
    return F2saState(inner=w, lower=z, outer=lam_new, k=state.k + 1)


f2sa = Solver(init=f2sa_init, step=f2sa_step, samples=plans.f2sa_samples,
              counts=plans.f2sa_counts)


# --- BOME ---------------------------------------------------------------------------------
class BomeState(NamedTuple):
    """BOME's state: inner w, outer λ, iteration count k."""

    inner: Any
    outer: Any
    k: Any


def bome_init(oracles, w0, lam0, cfg) -> BomeState:
    """w₀, λ₀, k = 0."""
    return BomeState(inner=w0, outer=lam0, k=0)


def bome_step(oracles, state, draws, cfg) -> BomeState:
    """One BOME iteration (Liu, Ye, Wright, Stone & Liu, NeurIPS 2022, Algorithm 1).

    BOME solves min L_out s.t. q(w, λ) = L_in(w, λ) − min_θ L_in(θ, λ) ≤ 0 by a dynamic
    barrier. With α = ``inner_step`` (the GD steps of θ), ξ = ``outer_step`` (the joint
    step on (w, λ), as the paper's ξ), T = ``n_inner_steps``, η = ``bome_eta``, train
    batches B_1..B_T, B and a validation batch B' (``draws``)::

        θ_0 = w,  θ_{t+1} = θ_t − α ∇_w L_in^{B_{t+1}}(θ_t, λ)          (t < T)
        ∇q̂ = (∇_w L_in^B(w, λ),  ∇_λ L_in^B(w, λ) − ∇_λ L_in^B(θ_T, λ))  (θ_T held fixed)
        ∇f = (∇_w L_out^{B'}(w, λ),  ∇_λ L_out^{B'}(w, λ))
        φ = η ‖∇q̂‖²,   μ = max((φ − ⟨∇f, ∇q̂⟩) / ‖∇q̂‖², 0)   (μ = 0 when ∇q̂ = 0)
        w ← w − ξ (∇_w f + μ ∇_w q̂),   λ ← λ − ξ (∇_λ f + μ ∇_λ q̂)

    (⟨·,·⟩ and ‖·‖ over the joint (w, λ) vector, as in the paper). μ is the smallest
    multiplier that makes the step decrease q̂ at rate φ: ⟨d, ∇q̂⟩ = max(⟨∇f, ∇q̂⟩, φ) for
    the direction d. The bias: the constraint holds only as μ → ∞, and the joint step is
    stable only while ξ (L_out + μ L_in) < 2, so the deterministic limit stalls near
    μ ≈ 2/(ξ L_in) with a bias that grows with ξ (ξ = 1/L_in: ≈ 5% of ‖∇F(λ₀)‖ on the test
    instances; ξ = 1/(2 L_in): < 1% on quadratic_sum). With noisy ∇q̂ the constraint is
    enforced only up to the noise, so BOME diverges where L_out is unbounded below jointly
    in (w, λ) (benchmark_bilevel's quadratic instance: an eigenvalue −0.026).

    Cost: T + 2 inner gradients (T on θ, the (∇_w, ∇_λ) L_in pairs at w and θ_T),
    2 cross products (those ∇_λ L_in), 1 outer-gradient pair, no HVP.
    """
    T = cfg.get("n_inner_steps")
    eta = cfg.get("bome_eta")
    alpha, xi = cfg.inner_step, cfg.outer_step
    w, lam = state.inner, state.outer

    theta = w
    for t in range(T):
        theta = theta - alpha * oracles.inner_grad(theta, lam, draws[t])
    i_in, i_out = draws[T], draws[T + 1]
    f_w, f_lam = oracles.outer_grads(w, lam, i_out)
    q_w, g_lam_w = oracles.inner_grads(w, lam, i_in)
    _, g_lam_theta = oracles.inner_grads(theta, lam, i_in)
    q_lam = g_lam_w - g_lam_theta
    sq = _dot(q_w, q_w) + _dot(q_lam, q_lam)
    inner_prod = _dot(f_w, q_w) + _dot(f_lam, q_lam)
    positive = sq > 0
    safe_sq = torch.where(positive, sq, 1.0)
    mult = torch.where(positive, torch.clamp(eta - inner_prod / safe_sq, min=0.0), 0.0)
    return BomeState(inner=w - xi * (f_w + mult * q_w),
                     outer=lam - xi * (f_lam + mult * q_lam), k=state.k + 1)


bome = Solver(init=bome_init, step=bome_step, samples=plans.bome_samples,
              counts=plans.bome_counts)


# --- PZOBO --------------------------------------------------------------------------------
def _mul32(x, c):
    """x·c mod 2³² for int64 tensors x < 2³² and a constant c < 2³², without int64
    overflow: c split in 16-bit halves (each partial product < 2⁴⁸)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & plans.MASK32


def mix32(x):
    """lowbias32 (C. Wellons' 32-bit integer hash) on an int64 tensor of 32-bit words
    (torch has no wrapping uint32 product: emulated, bit-equal to JAX's uint32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, plans.MIX_MUL[0])
    x = x ^ (x >> 15)
    x = _mul32(x, plans.MIX_MUL[1])
    return x ^ (x >> 16)


def draw_salt(idx):
    """Σ_i mix32(idx_i + i·GOLDEN) mod 2³² (int64 < 2³²): entropy folded out of one
    minibatch, so the directions depend on the run's seed (O(batch))."""
    i = torch.arange(idx.shape[0], dtype=torch.int64, device=idx.device)
    words = (idx.to(torch.int64) + i * plans.GOLDEN) & plans.MASK32
    return torch.sum(mix32(words)) & plans.MASK32


def counter_normals(salt, k, shape, dtype):
    """Standard normals of ``shape`` from the counter (salt, k), identical in both backends
    (the integer words bit for bit; numpy reference and equations:
    :func:`hypersweep.algorithms.plans_first_order.counter_normals`)."""
    m = 1
    for s in shape:
        m *= int(s)
    salt = torch.as_tensor(salt, dtype=torch.int64)
    k = torch.as_tensor(k, dtype=torch.int64, device=salt.device) & plans.MASK32
    key = mix32(salt ^ mix32(k))
    ctr = (_mul32(torch.arange(2 * m, dtype=torch.int64, device=salt.device), plans.GOLDEN)
           + key) & plans.MASK32
    words = mix32(mix32(ctr) ^ key)
    u = ((words >> 8).to(dtype) + 0.5) * 2.0 ** -24
    z = torch.sqrt(-2.0 * torch.log(u[:m])) * torch.cos(2.0 * torch.pi * u[m:])
    return z.reshape(shape)


class PzoboState(NamedTuple):
    """PZOBO's state: inner w, outer λ, iteration count k."""

    inner: Any
    outer: Any
    k: Any


def pzobo_init(oracles, w0, lam0, cfg) -> PzoboState:
    """w₀, λ₀, k = 0."""
    return PzoboState(inner=w0, outer=lam0, k=0)


def pzobo_step(oracles, state, draws, cfg) -> PzoboState:
    """One PZOBO iteration (Sow, Ji & Liang 2022, Algorithm 1: partial zeroth-order
    Jacobian estimate by Gaussian smoothing).

    With α = ``inner_step``, β = ``outer_step``, T = ``n_inner_steps``,
    Q = ``n_directions``, μ = ``smoothing``, train batches B_1..B_T and a validation batch
    B' (``draws``); w_T(λ') denotes T GD steps θ ← θ − α ∇_w L_in^{B_t}(θ, λ') from the
    warm start θ_0 = w (the same batches for every λ')::

        u_1..u_Q ~ N(0, I_dim λ)
        δ_j = (w_T(λ + μ u_j) − w_T(λ)) / μ          (≈ (∂w_T/∂λ) u_j)
        D_λ = ∇_λ L_out^{B'}(w_T, λ) + (1/Q) Σ_j u_j ⟨δ_j, ∇_w L_out^{B'}(w_T, λ)⟩
        w ← w_T(λ),   λ ← λ − β D_λ

    E[u uᵀ] = I makes (1/Q) Σ u_j δ_jᵀ an estimate of (∂w_T/∂λ)ᵀ: D_λ estimates the
    hypergradient of the T-step unrolled problem, with a bias O(μ) and (I − αH)^T.

    Directions: a step may not draw randomness, and both backends must see the same u_j,
    so they come from a counter-based generator written identically in both
    (:func:`counter_normals`: a 32-bit integer hash of (salt, k, index), Box–Muller):
    salt = :func:`draw_salt` of the first train batch (so they change with the run's seed;
    in the deterministic limit that batch is the whole split and u depends on k only).

    Cost: T·(Q + 1) inner gradients, 1 outer-gradient pair; no HVP, no cross product.
    """
    T, Q, mu = cfg.get("n_inner_steps"), cfg.get("n_directions"), cfg.get("smoothing")
    alpha, beta = cfg.inner_step, cfg.outer_step
    w0, lam = state.inner, state.outer
    u = counter_normals(draw_salt(draws[0]), state.k, (Q,) + tuple(lam.shape),
                        lam.dtype).to(lam.device)

    def unroll(lam_):
        w = w0
        for t in range(T):
            w = w - alpha * oracles.inner_grad(w, lam_, draws[t])
        return w

    w_T = unroll(lam)
    w_pert = torch.stack([unroll(lam + mu * u[j]) for j in range(Q)])
    f_w, f_lam = oracles.outer_grads(w_T, lam, draws[T])
    # ⟨δ_j, ∇_w L_out⟩ for each j, then (1/Q) Σ_j u_j ⟨δ_j, ∇_w L_out⟩
    coef = torch.tensordot(w_pert - w_T[None], f_w, dims=w_T.dim()) / mu
    d_lam = f_lam + torch.tensordot(coef, u, dims=1) / Q
    return PzoboState(inner=w_T, outer=lam - beta * d_lam, k=state.k + 1)


pzobo = Solver(init=pzobo_init, step=pzobo_step, samples=plans.pzobo_samples,
               counts=plans.pzobo_counts)
