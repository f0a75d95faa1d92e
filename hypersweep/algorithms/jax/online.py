"""Online hypergradient methods in JAX: HyperDistill, T1-T2 (DARTS), Greedy.

Each is an optax-style pair ``OnlineMethod(init, step)`` with an explicit NamedTuple
state (:class:`~hypersweep.algorithms.online_common.OnlineState`); see
:mod:`hypersweep.algorithms.online_common` for what t and K mean per method and for the
backend-free parts (state, settings, ``init``, counts); this module holds the JAX math. Notation (``hypersweep.notation``): Φ(w, λ) = w − η ∇_w L_in(w, λ),
α_s = ∇_w L_out(w_s, λ), B_s = ∂_λΦ(w_{s−1}, λ) (step s maps w_{s−1} to w_s),
A_s = ∂_wΦ(w_{s−1}, λ), g_FO = ∇_λ L_out(w, λ).

The exact hypergradient of L_out(w_τ) after τ steps is g_FO + Σ_s α_τ (Π_{i>s} A_i) B_s.
The methods replace the products Π A_i by cheap surrogates:

* **hyperdistill** (Lee et al., ICLR 2022): Π_{i>s} A_i ≈ θ γ^{τ−s} and B_s evaluated at
  the γ-weighted mean w*_τ of the past iterates (an EMA, p_τ = (γ − γ^τ)/(1 − γ^τ)):
  g = g_FO + θ Z_τ α_τ ∂_λΦ(w*_τ, λ), Z_τ = (1 − γ^τ)/(1 − γ). θ is refit every
  ``theta_every`` λ-updates by least squares against a DrMAD reverse pass (below).
* **t1t2** (Luketina et al. 2016) with DARTS finite differences (Liu et al. 2019):
  g = g_FO − η [∇_λ L_in(w⁺, λ) − ∇_λ L_in(w⁻, λ)] / (2ε), w± = w_{t−1} ± ε α_t,
  ε = fd_eps/‖α_t‖: the one-step (tbptt K = 1) hypergradient with the mixed second
  derivative ∂_λ∇_w L_in · α replaced by a central difference of λ-gradients.
* **greedy** (generalized greedy, ICLR 2025 submission): over a window of T = t steps,
  g = g_FO(w_T) + Σ_{s=1}^{T} γ^{T−s} α_s B_s, carried through ``lax.fori_loop``.

All three use only first-order information about Φ along w except HyperDistill's θ fit.
Compilation: one per (problem functions, shapes, config); t, K and the step counters are
traced, so changing them never recompiles.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax import lax

from hypersweep.algorithms.common import check_budget
from hypersweep.algorithms.jax import _core
from hypersweep.algorithms.online_common import (
    ADAM_B1, ADAM_B2, ADAM_EPS, OUTER_OPTIMIZERS, OnlineInfo, OnlineState, OuterOptimizer,
    online_method, step_counts)
from hypersweep.registry import check_choice


# -- the outer optimizer ------------------------------------------------------------------
def _transform(name: str, lr: float) -> optax.GradientTransformation:
    check_choice("optimizer", name, OUTER_OPTIMIZERS)
    if name == "adam":
        return optax.adam(lr, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS)
    return optax.sgd(lr)


@functools.lru_cache(maxsize=None)
def outer_optimizer(name: str, lr: float) -> OuterOptimizer:
    """The outer optimizer on λ ("adam" or "sgd", no momentum) as optax, jitted once."""
    tx = _transform(name, float(lr))

    @jax.jit
    def apply(lam, grad, state):
        updates, state = tx.update(grad, state, lam)
        return optax.apply_updates(lam, updates), state

    return OuterOptimizer(init=tx.init, apply=apply)


def _decay_sum(gamma: float, n, dtype):
    """Z_n = Σ_{j<n} γ^j with a traced n."""
    n = jnp.asarray(n, dtype)
    if gamma == 1.0:
        return n
    return (1.0 - jnp.power(jnp.asarray(gamma, dtype), n)) / (1.0 - gamma)


def _outer_update(config, lam, grad, opt_state):
    tx = _transform(config.optimizer, config.outer_lr)
    updates, opt_state = tx.update(grad, opt_state, lam)
    return optax.apply_updates(lam, updates), opt_state


# -- HyperDistill ------------------------------------------------------------------------
def _drmad_second_order(grad_fn, w_start, w_end, lam, alpha, eta, tau, n):
    """Σ_{s=τ−n+1}^{τ} α_τ (Π_{i>s} A_i) B_s along the DrMAD path ŵ_s = w_0 + (s/τ)(w_τ − w_0).

    DrMAD (Fu et al. 2016) replaces the stored trajectory by this straight line; the
    reverse pass runs over its last n steps (n vjps of Φ, each w.r.t. (w, λ) at once).
    """
    dtype = w_end.dtype

    def body(j, carry):
        p, acc = carry
        frac = (jnp.asarray(tau - j, dtype) - 1.0) / jnp.asarray(tau, dtype)
        w_prev = w_start + frac * (w_end - w_start)
        _, vjp = jax.vjp(lambda w_, l_: _core.phi(grad_fn, w_, l_, eta), w_prev, lam)
        p_w, p_lam = vjp(p)
        return p_w, acc + p_lam

    _, acc = lax.fori_loop(0, n, body, (alpha, jnp.zeros_like(lam)))
    return acc


@functools.partial(jax.jit, static_argnames=("fns", "config"))
def _hyperdistill_step(fns, config, w, lam, opt_state, w_ema, w_start, theta, arrays, eta,
                       t, tau0, n_drmad, refit):
    grad_fn = _core.inner_grad_fn(fns, arrays)
    gamma, dtype = config.gamma, w.dtype

    def inner(i, carry):
        w, w_ema = carry
        tau = tau0 + i + 1  # the step about to be taken, 1-based over the whole run
        # w*_τ = p_τ w*_{τ−1} + (1 − p_τ) w_{τ−1}, p_τ = γ Z_{τ−1}/Z_τ = (γ − γ^τ)/(1 − γ^τ)
        p = gamma * _decay_sum(gamma, tau - 1, dtype) / _decay_sum(gamma, tau, dtype)
        w_ema = p * w_ema + (1.0 - p) * w
        return _core.phi(grad_fn, w, lam, eta), w_ema

    w_new, w_ema = lax.fori_loop(0, t, inner, (w, w_ema))
    tau = tau0 + t
    alpha, g_fo = _core.outer_grads(fns, w_new, lam, arrays)
    _, vjp_lam = jax.vjp(lambda l_: _core.phi(grad_fn, w_ema, l_, eta), lam)
    distilled = _decay_sum(gamma, tau, dtype) * vjp_lam(alpha)[0]  # Z_τ α_τ ∂_λΦ(w*_τ)

    def fit_theta(_):
        target = _drmad_second_order(grad_fn, w_start, w_new, lam, alpha, eta, tau, n_drmad)
        xx = _core.vdot(distilled, distilled)
        ok = xx > jnp.finfo(dtype).tiny
        return jnp.where(ok, _core.vdot(distilled, target) / jnp.where(ok, xx, 1.0), theta)

    theta = lax.cond(refit, fit_theta, lambda _: theta, None)
    g = g_fo + theta * distilled
    lam_new, opt_state = _outer_update(config, lam, g, opt_state)
    return w_new, w_ema, lam_new, opt_state, theta, g


def hyperdistill_step(problem, state: OnlineState, *, t: int = 1, K: int = 0):
    """t inner steps (updating the EMA point w*), then one λ update with HyperDistill.

    θ is refit (least squares, one scalar) when ``n_updates % theta_every == 0`` and
    K > 0: target = DrMAD's second-order term over the last n = min(τ, K) steps of the
    straight path from w_0 to w_τ; θ = ⟨x, y⟩/⟨x, x⟩ with x = Z_τ α_τ ∂_λΦ(w*_τ).
    Cost: t gradient steps + 1 λ-vjp of Φ; + n vjps of Φ on a refit (``step_counts``).
    """
    t, K = check_budget(t, K, uses_K=False)
    c = state.config
    fns, _, arrays, eta = _core.problem_inputs(problem)
    tau = state.n_inner + t
    refit = K > 0 and state.n_updates % c.theta_every == 0
    n_drmad = min(tau, K) if refit else 0
    w, w_ema, lam, opt_state, theta, g = _hyperdistill_step(
        fns, c, state.w, state.lam, state.opt_state, state.w_ema, state.w_start,
        jnp.asarray(state.theta, problem.dtype), arrays, eta, jnp.asarray(t, jnp.int32),
        jnp.asarray(state.n_inner, jnp.int32), jnp.asarray(n_drmad, jnp.int32),
        jnp.asarray(refit))
    new = state._replace(w=w, lam=lam, opt_state=opt_state, n_updates=state.n_updates + 1,
                         n_inner=tau, w_ema=w_ema, theta=float(theta))
    info = OnlineInfo(lam=state.lam, w=w, hypergrad=g,
                      extras={"theta": new.theta, "theta_refit": bool(refit)},
                      **step_counts("hyperdistill", t=t, n_drmad=n_drmad))
    return new, info


# -- T1-T2 with DARTS finite differences ---------------------------------------------------
@functools.partial(jax.jit, static_argnames=("fns", "config"))
def _t1t2_step(fns, config, w, lam, opt_state, arrays, eta, t):
    grad_fn = _core.inner_grad_fn(fns, arrays)
    w_prev = _core.run_inner(grad_fn, w, lam, eta, t - 1)
    w_new = _core.phi(grad_fn, w_prev, lam, eta)
    alpha, g_fo = _core.outer_grads(fns, w_new, lam, arrays)
    alpha_norm = _core.norm(alpha)
    nonzero = alpha_norm > 0
    eps = config.fd_eps / jnp.where(nonzero, alpha_norm, 1.0)
    grad_lam_in = jax.grad(fns.inner_loss, argnums=1)
    mixed = (grad_lam_in(w_prev + eps * alpha, lam, arrays)
             - grad_lam_in(w_prev - eps * alpha, lam, arrays)) / (2.0 * eps)
    g = g_fo - eta * jnp.where(nonzero, mixed, jnp.zeros_like(mixed))
    lam_new, opt_state = _outer_update(config, lam, g, opt_state)
    return w_new, lam_new, opt_state, g


def t1t2_step(problem, state: OnlineState, *, t: int = 1, K: int = 0):
    """t inner steps, then one λ update with the DARTS one-step hypergradient.

    The mixed derivative is taken at w_{t−1}, the point the last step was taken from (as in
    DARTS and T1-T2), so the estimate equals ``one_step``/``itd(t=1)`` from w_{t−1} up to
    the finite-difference error (zero up to rounding when ∇_λ L_in is quadratic in w).
    K is unused. Cost: t gradient steps + 2 gradients of L_in w.r.t. λ; no HVP.
    """
    return _windowed_step(_t1t2_step, "t1t2", problem, state, t, K,
                          extras={"n_fd_grad_evals": 2})


def _windowed_step(jitted, method: str, problem, state: OnlineState, t: int, K: int, *,
                   extras):
    """Run a jitted ``(fns, config, w, lam, opt_state, arrays, η, t) -> (w, λ, opt, g)``
    step (t traced) and wrap its outputs as the new state and the step's info."""
    t, _ = check_budget(t, K, uses_K=False)
    fns, _, arrays, eta = _core.problem_inputs(problem)
    w, lam, opt_state, g = jitted(fns, state.config, state.w, state.lam, state.opt_state,
                                  arrays, eta, jnp.asarray(t, jnp.int32))
    new = state._replace(w=w, lam=lam, opt_state=opt_state, n_updates=state.n_updates + 1,
                         n_inner=state.n_inner + t)
    info = OnlineInfo(lam=state.lam, w=w, hypergrad=g, extras=dict(extras),
                      **step_counts(method, t=t))
    return new, info


# -- Greedy --------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("fns", "config"))
def _greedy_step(fns, config, w, lam, opt_state, arrays, eta, t):
    grad_fn = _core.inner_grad_fn(fns, arrays)
    gamma = config.gamma
    grad_w_out = jax.grad(fns.outer_loss, argnums=0)

    def body(s, carry):
        w, acc = carry
        w_next, vjp_lam = jax.vjp(lambda l_: _core.phi(grad_fn, w, l_, eta), lam)
        alpha = grad_w_out(w_next, lam, arrays)
        return w_next, gamma * acc + vjp_lam(alpha)[0]  # Σ γ^{T−s} α_s B_s

    w_new, acc = lax.fori_loop(0, t, body, (w, jnp.zeros_like(lam)))
    g = _core.outer_grads(fns, w_new, lam, arrays)[1] + acc
    lam_new, opt_state = _outer_update(config, lam, g, opt_state)
    return w_new, lam_new, opt_state, g


def greedy_step(problem, state: OnlineState, *, t: int = 1, K: int = 0):
    """A window of T = t inner steps, then one λ update with the γ-decayed greedy sum.

    T = 1 gives ``one_step``/``itd(t=1)`` from the window's start. K is unused.
    Cost: T gradient steps, T vjps of Φ w.r.t. λ and T + 1 gradients of L_out.
    """
    return _windowed_step(_greedy_step, "greedy", problem, state, t, K, extras={})


hyperdistill = online_method("hyperdistill", hyperdistill_step, outer_optimizer)
t1t2 = online_method("t1t2", t1t2_step, outer_optimizer)
greedy = online_method("greedy", greedy_step, outer_optimizer)
