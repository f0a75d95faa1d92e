"""Two-loop stochastic bilevel solvers in JAX (mirrors ``torch/solvers_double.py``).

Each outer iteration runs inner loops — steps on w, a linear-system solve for v — then
one step on λ. Each solver is a :class:`~hypersweep.algorithms.solvers_common.Solver`:
``init``/``step`` here, ``samples``/``counts`` and the draw layouts in
:mod:`hypersweep.algorithms.plans_double` (backend-free). The pieces and conventions
(oracles, draws, cfg, counting) are in :mod:`hypersweep.algorithms.solvers_common`.

Notation: α = ``cfg.inner_step``, γ = ``cfg.adjoint_step`` (the Neumann / linear-system
step), β = ``cfg.outer_step``; g^B = ∇_w L_in^B, H^B its Hessian, J^B v = (∂_λ g^B)ᵀ v;
v ≈ −H⁻¹ ∇_w L_out, so the hypergradient estimate is ∇_λ L_out + J v.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax

from hypersweep.algorithms import plans_double
from hypersweep.algorithms.solvers_common import Solver


def _sgd(oracles, w, lam, batches, step):
    """One step w ← w − step · g^B(w, λ) per batch B of ``batches`` (λ fixed)."""
    if not batches:
        return w

    def body(w_, idx):
        return w_ - step * oracles.inner_grad(w_, lam, idx), None

    return lax.scan(body, w, jnp.stack(batches))[0]


def _neumann(oracles, w, lam, batches, rhs, step):
    """γ Σ_{q=0}^{Q} Π_{j≤q} (I − γ H^{B_j}) rhs ≈ H⁻¹ rhs, one factor per batch (Q HVPs)."""
    if not batches:
        return step * rhs

    def body(carry, idx):
        p, acc = carry
        p = p - step * oracles.hvp(w, lam, idx, p)
        return (p, acc + p), None

    (_, acc), _ = lax.scan(body, (rhs, rhs), jnp.stack(batches))
    return step * acc


def _decay(k, exponent, dtype):
    """(k + 1)^(−exponent) in ``dtype``."""
    return jnp.power((k + 1).astype(dtype), -exponent)


def _calls(*, hvp=0, inner=0, train_batches=0):
    """An increase of a state's ``calls`` (:data:`plans_double.CALLS` order)."""
    return jnp.stack([jnp.asarray(x, jnp.int32) for x in
                      (inner, hvp, 0, 0, train_batches, 0)])


# --- stocBiO ------------------------------------------------------------------------------
class StocbioSolverState(NamedTuple):
    """stocBiO's state: inner w, the last Neumann estimate v, outer λ, iteration count k."""

    inner: Any
    adjoint: Any
    outer: Any
    k: Any


def stocbio_solver_init(oracles, w0, lam0, cfg) -> StocbioSolverState:
    """w₀, v₀ = 0, λ₀, k = 0."""
    return StocbioSolverState(inner=w0, adjoint=jnp.zeros_like(w0), outer=lam0,
                              k=jnp.asarray(0, jnp.int32))


def stocbio_solver_step(oracles, state, draws, cfg) -> StocbioSolverState:
    """One stocBiO iteration (Ji, Yang & Liang, ICML 2021, Algorithm 2).

    With T = ``n_inner_steps`` train batches B_t, Q = ``n_neumann_steps`` train batches
    H_j, one train batch C and one validation batch V (``draws``, see
    :func:`~hypersweep.algorithms.plans_double.stocbio_solver_layout`)::

        w ← w − α g^{B_t}(w, λ),  t = 1..T          (warm start: w of the last iteration)
        v = −γ Σ_{q=0}^{Q} Π_{j=1}^{q} (I − γ H^{H_j}(w, λ)) ∇_w L_out^V(w, λ)
        λ ← λ − β (∇_λ L_out^V(w, λ) + J^C(w, λ) v)

    Constant steps α, β, γ (the paper's). Cost: T inner gradients, Q HVPs, 1 cross
    product, 1 outer-gradient pair, each on its own batch.
    """
    groups = plans_double.split_draws(plans_double.stocbio_solver_layout(cfg), draws)
    lam = state.outer
    w = _sgd(oracles, state.inner, lam, groups["inner"], cfg.inner_step)
    gw_out, glam_out = oracles.outer_grads(w, lam, groups["val"][0])
    v = -_neumann(oracles, w, lam, groups["neumann"], gw_out, cfg.adjoint_step)
    d_lam = glam_out + oracles.cross(w, lam, groups["cross"][0], v)
    return StocbioSolverState(inner=w, adjoint=v, outer=lam - cfg.outer_step * d_lam,
                              k=state.k + 1)


stocbio_solver = Solver(init=stocbio_solver_init, step=stocbio_solver_step,
                        samples=plans_double.stocbio_solver_samples,
                        counts=plans_double.stocbio_solver_counts)


# --- BSA ----------------------------------------------------------------------------------
class BsaState(NamedTuple):
    """BSA's state: inner w, the last HIA estimate v, outer λ, iteration count k, and
    ``calls``: the HIA's HVPs so far (random in number; :data:`plans_double.CALLS`)."""

    inner: Any
    adjoint: Any
    outer: Any
    k: Any
    calls: Any


def bsa_init(oracles, w0, lam0, cfg) -> BsaState:
    """w₀, v₀ = 0, λ₀, k = 0, no calls."""
    return BsaState(inner=w0, adjoint=jnp.zeros_like(w0), outer=lam0,
                    k=jnp.asarray(0, jnp.int32), calls=jnp.zeros(6, jnp.int32))


def bsa_step(oracles, state, draws, cfg) -> BsaState:
    """One BSA iteration (Ghadimi & Wang 2018, Algorithm 2 with the HIA of Algorithm 3).

    With T = ``n_inner_steps``, N = ``n_hia_steps``, e = ``decay_exponent`` and the
    batches of :func:`~hypersweep.algorithms.plans_double.bsa_layout`::

        α_k = α/(k+1)^e,  β_k = β/(k+1)^e
        w ← w − α_k g^{B_t}(w, λ),  t = 1..T        (warm start)
        p = (Σ_i idx_i) mod N   (idx: the "truncation" draw: p uniform on {0..N−1})
        v = −N γ Π_{j=1}^{p} (I − γ H^{H_j}(w, λ)) ∇_w L_out^V(w, λ)
        λ ← λ − β_k (∇_λ L_out^V(w, λ) + J^C(w, λ) v)

    E_p[v] is the N-term Neumann sum −γ Σ_{j<N} (I − γH)^j ∇_w L_out. The paper's outer
    steps decrease (∝ 1/√K for a nonconvex F): e = 0.5 by default, as benchmark_bilevel
    (inner steps too; γ constant). When the train split is read whole (the deterministic
    limit: the sampler draws nothing, so p would be constant) v is that expectation, with
    N − 1 HVPs. Cost: T inner gradients, p HVPs (counted in ``calls``), 1 cross product,
    1 outer-gradient pair.
    """
    layout = plans_double.bsa_layout(cfg)
    groups = plans_double.split_draws(layout, draws)
    n = cfg.get("n_hia_steps")
    lam = state.outer
    decay = _decay(state.k, cfg.get("decay_exponent"), lam.dtype)
    w = _sgd(oracles, state.inner, lam, groups["inner"], cfg.inner_step * decay)
    gw_out, glam_out = oracles.outer_grads(w, lam, groups["val"][0])
    gamma = cfg.adjoint_step
    if cfg.b_train >= cfg.n_train:
        v = -_neumann(oracles, w, lam, groups["hia"], gw_out, gamma)
        n_hvp = jnp.asarray(n - 1, jnp.int32)
    else:
        n_hvp = jnp.sum(groups["truncation"][0] % n) % n
        if n > 1:
            hia = jnp.stack(groups["hia"])
            x = lax.fori_loop(0, n_hvp, lambda j, x_: x_ - gamma * oracles.hvp(
                w, lam, hia[j], x_), gw_out)
        else:
            x = gw_out
        v = -(n * gamma) * x
    d_lam = glam_out + oracles.cross(w, lam, groups["cross"][0], v)
    return BsaState(inner=w, adjoint=v, outer=lam - cfg.outer_step * decay * d_lam,
                    k=state.k + 1,
                    calls=state.calls + _calls(hvp=n_hvp, train_batches=n_hvp))


bsa = Solver(init=bsa_init, step=bsa_step, samples=plans_double.bsa_samples,
             counts=plans_double.bsa_counts)


# --- AmIGO --------------------------------------------------------------------------------
class AmigoState(NamedTuple):
    """AmIGO's state: inner w, linear-system v (warm started), outer λ, iteration count k."""

    inner: Any
    adjoint: Any
    outer: Any
    k: Any


def amigo_init(oracles, w0, lam0, cfg) -> AmigoState:
    """w₀, v₀ = 0, λ₀, k = 0."""
    return AmigoState(inner=w0, adjoint=jnp.zeros_like(w0), outer=lam0,
                      k=jnp.asarray(0, jnp.int32))


def amigo_step(oracles, state, draws, cfg) -> AmigoState:
    """One AmIGO iteration (Arbel & Mairal, ICLR 2022, Algorithm 1 with SGD solvers).

    With T = ``n_inner_steps`` train batches B_t, N = ``n_adjoint_steps`` train batches
    A_j, one train batch C and one validation batch V::

        w ← w − α g^{B_t}(w, λ),  t = 1..T                       (warm start)
        v ← v − γ (H^{A_j}(w, λ) v + ∇_w L_out^V(w, λ)),  j = 1..N  (warm start)
        λ ← λ − β (∇_λ L_out^V(w, λ) + J^C(w, λ) v)

    The v steps are SGD on ½ vᵀHv + vᵀ∇_w L_out with one outer-gradient estimate per
    iteration (the paper's amortization: both loops start where the last ones ended).
    Constant steps. Cost: T inner gradients, N HVPs, 1 cross product, 1 outer pair.
    """
    groups = plans_double.split_draws(plans_double.amigo_layout(cfg), draws)
    lam = state.outer
    w = _sgd(oracles, state.inner, lam, groups["inner"], cfg.inner_step)
    gw_out, glam_out = oracles.outer_grads(w, lam, groups["val"][0])

    def body(v_, idx):
        return v_ - cfg.adjoint_step * (oracles.hvp(w, lam, idx, v_) + gw_out), None

    v = lax.scan(body, state.adjoint, jnp.stack(groups["adjoint"]))[0]
    d_lam = glam_out + oracles.cross(w, lam, groups["cross"][0], v)
    return AmigoState(inner=w, adjoint=v, outer=lam - cfg.outer_step * d_lam, k=state.k + 1)


amigo = Solver(init=amigo_init, step=amigo_step, samples=plans_double.amigo_samples,
               counts=plans_double.amigo_counts)


# --- VRBO ---------------------------------------------------------------------------------
class VrboState(NamedTuple):
    """VRBO's state: inner w, the last Neumann estimate v, outer λ, iteration count k, and
    the recursive directions d_inner ≈ ∇_w L_in(w, λ), d_outer ≈ ∇F at (w, λ)."""

    inner: Any
    adjoint: Any
    outer: Any
    k: Any
    d_inner: Any
    d_outer: Any


def vrbo_init(oracles, w0, lam0, cfg) -> VrboState:
    """w₀, v₀ = 0, λ₀, k = 0, zero directions (iteration 0 refreshes them)."""
    return VrboState(inner=w0, adjoint=jnp.zeros_like(w0), outer=lam0,
                     k=jnp.asarray(0, jnp.int32), d_inner=jnp.zeros_like(w0),
                     d_outer=jnp.zeros_like(lam0))


def _hypergrad(oracles, w, lam, idx_grad, neumann, idx_val, gamma):
    """(∇_λ L_out^V + J^B v, v) with v the Q-term Neumann estimate (stocBiO's)."""
    gw_out, glam_out = oracles.outer_grads(w, lam, idx_val)
    v = -_neumann(oracles, w, lam, neumann, gw_out, gamma)
    return glam_out + oracles.cross(w, lam, idx_grad, v), v


def vrbo_step(oracles, state, draws, cfg) -> VrboState:
    """One VRBO iteration (Yang, Ji & Liang, NeurIPS 2021, Algorithm 2).

    Directions d_w ≈ ∇_w L_in and d_λ ≈ ĥ (the stocBiO estimate ∇_λ L_out + J v, v from
    Q = ``n_neumann_steps`` Neumann factors) at the state's (w, λ). With m =
    ``n_inner_steps`` and, for inner step t, the batches (B_t, Q Neumann batches, V_t) of
    :func:`~hypersweep.algorithms.plans_double.vrbo_layout`::

        if k mod period = 0:  d_w = g(w, λ), d_λ = ĥ(w, λ)    (full batch: the refresh)
        λ' = λ − β d_λ
        (w₀, λ₀) = (w, λ);  for t = 1..m:   (SARAH/SPIDER recursion, same batches)
            w_t = w_{t−1} − α d_w
            d_w += g^{B_t}(w_t, λ') − g^{B_t}(w_{t−1}, λ_{t−1})
            d_λ += ĥ^{t}(w_t, λ') − ĥ^{t}(w_{t−1}, λ_{t−1})          (λ_{t−1} = λ' for t > 1)
        w ← w_m,  λ ← λ'

    ``period`` None: ⌈n_train / b_train⌉ (:func:`plans_double.vrbo_period`). Constant
    steps. Cost per iteration: 2m × (1 inner gradient, Q HVPs, 1 cross, 1 outer pair),
    plus (1, Q, 1, 1) full-batch calls on refresh iterations.
    """
    groups = plans_double.split_draws(plans_double.vrbo_layout(cfg), draws)
    m, q = cfg.get("n_inner_steps"), cfg.get("n_neumann_steps")
    gamma = cfg.adjoint_step
    w, lam = state.inner, state.outer

    def refresh(_):
        full = [oracles.all_train] * q
        d_l, v_ = _hypergrad(oracles, w, lam, oracles.all_train, full, oracles.all_val,
                             gamma)
        return oracles.inner_grad(w, lam, oracles.all_train), d_l, v_

    def keep(_):
        return state.d_inner, state.d_outer, state.adjoint

    period = plans_double.vrbo_period(cfg)
    d_w, d_l, v = lax.cond(state.k % period == 0, refresh, keep, None)
    lam_new = lam - cfg.outer_step * d_l
    batches = jnp.stack(groups["batch"])
    vals = jnp.stack(groups["val"])
    neumann = (jnp.stack(groups["neumann"]).reshape(m, q, -1) if q > 0
               else jnp.zeros((m, 0, batches.shape[-1]), batches.dtype))

    def body(carry, batch):
        w_old, lam_old, d_w_, d_l_, _ = carry
        idx, neu, idx_val = batch
        neu = [neu[j] for j in range(q)]
        w_new = w_old - cfg.inner_step * d_w_
        h_new, v_new = _hypergrad(oracles, w_new, lam_new, idx, neu, idx_val, gamma)
        h_old, _ = _hypergrad(oracles, w_old, lam_old, idx, neu, idx_val, gamma)
        d_w_ = d_w_ + (oracles.inner_grad(w_new, lam_new, idx)
                       - oracles.inner_grad(w_old, lam_old, idx))
        return (w_new, lam_new, d_w_, d_l_ + (h_new - h_old), v_new), None

    (w, _, d_w, d_l, v), _ = lax.scan(body, (w, lam, d_w, d_l, v),
                                      (batches, neumann, vals))
    return VrboState(inner=w, adjoint=v, outer=lam_new, k=state.k + 1, d_inner=d_w,
                     d_outer=d_l)


vrbo = Solver(init=vrbo_init, step=vrbo_step, samples=plans_double.vrbo_samples,
              counts=plans_double.vrbo_counts)


# --- HOAG ---------------------------------------------------------------------------------
class HoagState(NamedTuple):
    """HOAG's state: inner w, linear-system v (CG warm start), outer λ, iteration count k,
    the tolerance ε_k, and ``calls``: the inner gradients and HVPs of the tolerance-driven
    loops so far (:data:`plans_double.CALLS`)."""

    inner: Any
    adjoint: Any
    outer: Any
    k: Any
    tol: Any
    calls: Any


def hoag_init(oracles, w0, lam0, cfg) -> HoagState:
    """w₀, v₀ = 0, λ₀, k = 0, ε₀ = ``tol0``, no calls."""
    return HoagState(inner=w0, adjoint=jnp.zeros_like(w0), outer=lam0,
                     k=jnp.asarray(0, jnp.int32), tol=jnp.asarray(cfg.get("tol0"), w0.dtype),
                     calls=jnp.zeros(6, jnp.int32))


def hoag_step(oracles, state, draws, cfg) -> HoagState:
    """One HOAG iteration (Pedregosa, ICML 2016, Algorithm 1), full batch.

    With ε = ε_k (``tol``), α = ``inner_step``, β = ``outer_step``::

        w ← w − α ∇_w L_in(w, λ)  from the last w, until ‖∇_w L_in(w, λ)‖ ≤ ε
                                   (at most ``max_inner_steps``)
        v: conjugate gradient on H(w, λ) v = −∇_w L_out(w, λ) from the last v, until the
           residual is ≤ max(ε, 10u‖∇_w L_out‖) (u: the dtype's rounding unit; at most
           ``max_cg_steps``)
        λ ← λ − β (∇_λ L_out(w, λ) + J(w, λ) v)
        ε_{k+1} = tol_decay · ε_k

    The paper's summable tolerances (here geometric, ε₀ = ``tol0``); a constant outer
    step (the paper also adapts it with a line search on F, not done here). Cost: 1 + i
    inner gradients and 1 + c HVPs (i, c the loop lengths; in ``calls``), 1 outer pair,
    1 cross product, each on the whole split.
    """
    all_train, lam = oracles.all_train, state.outer
    eps2 = state.tol * state.tol
    max_inner, max_cg = cfg.get("max_inner_steps"), cfg.get("max_cg_steps")

    def inner_cond(c):
        _, g, i = c
        return (jnp.vdot(g, g) > eps2) & (i < max_inner)

    def inner_body(c):
        w_, g, i = c
        w_ = w_ - cfg.inner_step * g
        return w_, oracles.inner_grad(w_, lam, all_train), i + 1

    g0 = oracles.inner_grad(state.inner, lam, all_train)
    w, _, n_inner = lax.while_loop(inner_cond, inner_body,
                                   (state.inner, g0, jnp.asarray(0, jnp.int32)))
    gw_out, glam_out = oracles.outer_grads(w, lam, oracles.all_val)

    # CG cannot resolve a residual below ~ rounding × ‖rhs‖ (float32 reaches that within a
    # few hundred iterations of ε_k = 0.1·0.9^k); past it, p·Hp is rounding noise and the
    # step length rr / p·Hp can be anything: stop at that floor
    floor2 = (10 * jnp.finfo(gw_out.dtype).eps) ** 2 * jnp.vdot(gw_out, gw_out)

    def cg_cond(c):
        _, _, _, rr, j, curved = c
        return (rr > jnp.maximum(eps2, floor2)) & (j < max_cg) & curved

    def cg_body(c):
        v_, r, p, rr, j, _ = c
        hp = oracles.hvp(w, lam, all_train, p)
        php = jnp.vdot(p, hp)
        curved = php > 0  # ≤ 0 only from rounding: stop there
        a = jnp.where(curved, rr / jnp.where(curved, php, 1), 0)
        v_, r = v_ + a * p, r - a * hp
        rr_new = jnp.vdot(r, r)
        return v_, r, r + (rr_new / rr) * p, rr_new, j + 1, curved

    r0 = -gw_out - oracles.hvp(w, lam, all_train, state.adjoint)
    v, _, _, _, n_cg, _ = lax.while_loop(cg_cond, cg_body, (
        state.adjoint, r0, r0, jnp.vdot(r0, r0), jnp.asarray(0, jnp.int32),
        jnp.asarray(True)))
    d_lam = glam_out + oracles.cross(w, lam, all_train, v)
    calls = _calls(inner=1 + n_inner, hvp=1 + n_cg, train_batches=2 + n_inner + n_cg)
    return HoagState(inner=w, adjoint=v, outer=lam - cfg.outer_step * d_lam,
                     k=state.k + 1, tol=state.tol * cfg.get("tol_decay"),
                     calls=state.calls + calls)


hoag = Solver(init=hoag_init, step=hoag_step, samples=plans_double.hoag_samples,
              counts=plans_double.hoag_counts)
