"""Online hypergradient methods in PyTorch: HyperDistill, T1-T2 (DARTS), Greedy.

The same math, state and counts as :mod:`hypersweep.algorithms.jax.online` (read its
docstring for the formulas; state, settings, ``init`` and counts are the backend-free
ones of :mod:`hypersweep.algorithms.online_common`); eager loops instead of
``lax.fori_loop``. Functions are pure:
a ``step`` returns a new :class:`OnlineState` and never mutates the old one, and nothing is
left in ``.grad``. The outer optimizer is a functional Adam/SGD whose update equations are
those of ``torch.optim.Adam``/``SGD`` (and of ``optax.adam``/``sgd``): m̂/(√v̂ + ε) with
bias corrections, ε = 1e-8 added after the square root.
"""
from __future__ import annotations

import copy

import torch

from hypersweep.algorithms.common import check_budget
from hypersweep.algorithms.online_common import (
    ADAM_B1, ADAM_B2, ADAM_EPS, OUTER_OPTIMIZERS, OnlineConfig, OnlineInfo, OnlineState,
    OuterOptimizer, decay_sum, online_method, step_counts)
from hypersweep.algorithms.torch import _core
from hypersweep.registry import check_choice


# -- the outer optimizer: torch.optim behind a functional (init, apply) pair ---------------
def outer_optimizer(name: str, lr: float) -> OuterOptimizer:
    """``torch.optim.Adam`` (β = (0.9, 0.999), ε = 1e-8, as optax's defaults on the JAX
    side) or plain ``torch.optim.SGD`` on λ.

    The state is the torch optimizer itself (it owns a leaf copy of λ). ``apply`` works on
    a deep copy of it, so it is pure like optax's update: the HPO pipeline's untimed
    warm-up call does not advance Adam's moments. Cost of the copy: O(dim λ).
    """
    check_choice("optimizer", name, OUTER_OPTIMIZERS)
    lr = float(lr)

    def init(lam):
        param = lam.detach().clone().requires_grad_(True)
        if name == "sgd":
            return torch.optim.SGD([param], lr=lr)
        return torch.optim.Adam([param], lr=lr, betas=(ADAM_B1, ADAM_B2), eps=ADAM_EPS)

    def apply(lam, grad, state):
        opt = copy.deepcopy(state)
        param = opt.param_groups[0]["params"][0]
        with torch.no_grad():
            param.copy_(lam)
        param.grad = grad.detach().clone()
        opt.step()
        return param.detach().clone(), opt

    return OuterOptimizer(init=init, apply=apply)


def _fresh(x: torch.Tensor) -> torch.Tensor:
    """A detached copy for the state: no caller's tensor (or graph) is aliased."""
    return x.detach().clone()


def _outer_update(config: OnlineConfig, lam, grad, opt_state):
    return outer_optimizer(config.optimizer, config.outer_lr).apply(lam, grad, opt_state)


def _phi_fn(problem):
    """Φ(·, ·) of the problem with its data and η bound."""
    g = _core.inner_grad_fn(problem.fns, problem.arrays)
    eta = problem.inner_lr
    return lambda w, lam: _core.phi(g, w, lam, eta)


def _vjp_lam(phi, w: torch.Tensor, lam: torch.Tensor, cotangent: torch.Tensor
             ) -> torch.Tensor:
    """∂_λΦ(w, λ)ᵀ cotangent (one vjp)."""
    _, vjp = torch.func.vjp(lambda l_: phi(w, l_), lam)
    return vjp(cotangent)[0]


# -- HyperDistill ------------------------------------------------------------------------
def _drmad_second_order(phi, w_start, w_end, lam, alpha, tau: int, n: int) -> torch.Tensor:
    """DrMAD's reverse pass over the last n steps of the straight path w_0 → w_τ."""
    p, acc = alpha, torch.zeros_like(lam)
    for j in range(n):
        w_prev = w_start + ((tau - j - 1.0) / tau) * (w_end - w_start)
        _, vjp = torch.func.vjp(phi, w_prev, lam)
        p, p_lam = vjp(p)
        acc = acc + p_lam
    return acc


def hyperdistill_step(problem, state: OnlineState, *, t: int = 1, K: int = 0):
    """See ``hypersweep.algorithms.jax.online.hyperdistill_step`` (same math and counts)."""
    t, K = check_budget(t, K, uses_K=False)
    c = state.config
    phi = _phi_fn(problem)
    gamma = c.gamma
    w, w_ema, lam = state.w, state.w_ema, state.lam.detach()
    with torch.no_grad():
        for i in range(t):
            tau_i = state.n_inner + i + 1
            p = gamma * decay_sum(gamma, tau_i - 1) / decay_sum(gamma, tau_i)
            w_ema = p * w_ema + (1.0 - p) * w
            w = phi(w, lam)
    tau = state.n_inner + t
    alpha, g_fo = _core.outer_grads(problem.fns, w, lam, problem.arrays)
    distilled = decay_sum(gamma, tau) * _vjp_lam(phi, w_ema, lam, alpha)
    refit = K > 0 and state.n_updates % c.theta_every == 0
    n_drmad = min(tau, K) if refit else 0
    theta = state.theta
    if refit:
        target = _drmad_second_order(phi, state.w_start, w, lam, alpha, tau, n_drmad)
        xx = float(_core.vdot(distilled, distilled))
        if xx > torch.finfo(distilled.dtype).tiny:
            theta = float(_core.vdot(distilled, target)) / xx
    g = (g_fo + theta * distilled).detach()
    lam_new, opt_state = _outer_update(c, lam, g, state.opt_state)
    new = state._replace(w=w.detach(), lam=lam_new.detach(), opt_state=opt_state,
                         n_updates=state.n_updates + 1, n_inner=tau,
                         w_ema=w_ema.detach(), theta=theta)
    info = OnlineInfo(lam=state.lam, w=new.w, hypergrad=g,
                      extras={"theta": float(theta), "theta_refit": bool(refit)},
                      **step_counts("hyperdistill", t=t, n_drmad=n_drmad))
    return new, info


# -- T1-T2 with DARTS finite differences ---------------------------------------------------
def t1t2_step(problem, state: OnlineState, *, t: int = 1, K: int = 0):
    """See ``hypersweep.algorithms.jax.online.t1t2_step`` (same math and counts)."""
    t, _ = check_budget(t, K, uses_K=False)
    c = state.config
    fns, _, arrays, eta = _core.problem_inputs(problem)
    g_in = _core.inner_grad_fn(fns, arrays)
    lam = state.lam.detach()
    w_prev = _core.run_inner(g_in, state.w, lam, eta, t - 1)
    with torch.no_grad():
        w_new = _core.phi(g_in, w_prev, lam, eta)
    alpha, g_fo = _core.outer_grads(fns, w_new, lam, arrays)
    alpha_norm = float(_core.norm(alpha))
    g = g_fo
    if alpha_norm > 0:
        eps = c.fd_eps / alpha_norm
        grad_lam_in = torch.func.grad(lambda w_, l_: fns.inner_loss(w_, l_, arrays),
                                      argnums=1)
        mixed = (grad_lam_in(w_prev + eps * alpha, lam)
                 - grad_lam_in(w_prev - eps * alpha, lam)) / (2.0 * eps)
        g = g_fo - eta * mixed
    g = g.detach()
    lam_new, opt_state = _outer_update(c, lam, g, state.opt_state)
    new = state._replace(w=w_new, lam=lam_new.detach(), opt_state=opt_state,
                         n_updates=state.n_updates + 1, n_inner=state.n_inner + t)
    info = OnlineInfo(lam=state.lam, w=w_new, hypergrad=g, extras={"n_fd_grad_evals": 2},
                      **step_counts("t1t2", t=t))
    return new, info


# -- Greedy --------------------------------------------------------------------------------
def greedy_step(problem, state: OnlineState, *, t: int = 1, K: int = 0):
    """See ``hypersweep.algorithms.jax.online.greedy_step`` (same math and counts)."""
    t, _ = check_budget(t, K, uses_K=False)
    c = state.config
    phi = _phi_fn(problem)
    lam = state.lam.detach()
    w = state.w
    acc = torch.zeros_like(lam)
    for _ in range(t):
        w_next, vjp = torch.func.vjp(lambda l_: phi(w, l_), lam)
        alpha, _ = _core.outer_grads(problem.fns, w_next, lam, problem.arrays)
        acc = c.gamma * acc + vjp(alpha)[0]  # Σ γ^{T−s} α_s B_s
        w = w_next.detach()
    g = (_core.outer_grads(problem.fns, w, lam, problem.arrays)[1] + acc).detach()
    lam_new, opt_state = _outer_update(c, lam, g, state.opt_state)
    new = state._replace(w=w, lam=lam_new.detach(), opt_state=opt_state,
                         n_updates=state.n_updates + 1, n_inner=state.n_inner + t)
    info = OnlineInfo(lam=state.lam, w=w, hypergrad=g, extras={},
                      **step_counts("greedy", t=t))
    return new, info


hyperdistill = online_method("hyperdistill", hyperdistill_step, outer_optimizer,
                             fresh=_fresh)
t1t2 = online_method("t1t2", t1t2_step, outer_optimizer, fresh=_fresh)
greedy = online_method("greedy", greedy_step, outer_optimizer, fresh=_fresh)
