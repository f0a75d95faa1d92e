"""Iterative differentiation in PyTorch: itd, itd_forward, tbptt, first_order, one_step.

All differentiate ``L_out(w_t(λ), λ)`` with ``w_t = Φ^t(w_init)``, ``Φ(w, λ) = w − η g(w, λ)``,
``g = ∇_w L_in`` (see :mod:`hypersweep.algorithms.torch._core`); ``w_init`` does not depend
on λ. Counts (``docs/costs.md``): ``n_inner_grad_evals`` = t (the forward steps; a reverse
pass reuses the recorded graph, no replay); every step differentiated in reverse mode is
one VJP of Φ, which yields both ∂_wΦᵀp and ∂_λΦᵀp: one ``n_hvp_evals`` and one
``n_cross_evals`` each (t for itd, min(K, t) for tbptt, 1 for one_step, 0 for
first_order); forward mode does one JVP of Φ per (step, direction of λ), one of each too;
``n_outer_grad_evals`` = 1.
"""
from __future__ import annotations

import warnings

import torch

from hypersweep.algorithms.common import Hypergrad
from hypersweep.algorithms.torch import _core


def _reverse_through_last(problem, lam, t: int, k: int) -> Hypergrad:
    """Run t − k steps without a graph, then k recorded steps (the autograd graph kept:
    memory O(k · dim w)), then one reverse pass."""
    fns, w0, arrays, eta = _core.problem_inputs(problem)
    g = _core.inner_grad_fn(fns, arrays)
    return _reverse_from(problem, lam, g, _core.run_inner(g, w0, lam, eta, t - k), t, k)


def _reverse_from(problem, lam, g, w_start, t: int, k: int) -> Hypergrad:
    """k recorded steps from ``w_start`` = w_{t−k} (a constant in λ), then one reverse
    pass; costs counted as the t-step estimator's (shared with the t-grid form)."""
    fns, _, arrays, eta = _core.problem_inputs(problem)
    if k == 0:
        _, grad_lam = _core.outer_grads(fns, w_start, lam, arrays)
        return Hypergrad(hypergrad=grad_lam, w_t=w_start, n_inner_grad_evals=t,
                         n_hvp_evals=0, n_cross_evals=0)
    lam_ = lam.detach().requires_grad_(True)
    with torch.enable_grad():
        w_t = w_start
        for _ in range(k):
            w_t = _core.phi(g, w_t, lam_, eta)
        loss = fns.outer_loss(w_t, lam_, arrays)
        (hypergrad,) = torch.autograd.grad(loss, lam_, allow_unused=True,
                                           materialize_grads=True)
    return Hypergrad(hypergrad=hypergrad.detach(), w_t=w_t.detach(), n_inner_grad_evals=t,
                     n_hvp_evals=k, n_cross_evals=k)


def itd(problem, lam, *, t: int, K: int = 0, seed: int = 0) -> Hypergrad:
    """Iterative differentiation (reverse mode through all t inner steps).

    Exact derivative of ``λ ↦ L_out(Φ^t(w_init, λ), λ)``: the t steps are recorded by
    autograd (``g`` differentiable: analytic ``inner_grad`` needs no double backward)
    and one ``torch.autograd.grad`` call walks them back. K is unused.

    Cost: t inner gradients forward, t step VJPs backward; memory O(t · dim w).
    References: Maclaurin et al. 2015; Franceschi et al. 2017; Grazzi et al. 2020.
    """
    return _reverse_through_last(problem, lam, t, t)


def tbptt(problem, lam, *, t: int, K: int, seed: int = 0) -> Hypergrad:
    """Truncated back-propagation: reverse mode through the last ``min(K, t)`` steps only.

    The first ``t − K`` steps run without a graph and ``w_{t−K}`` is treated as a constant.
    ``K ≥ t`` is :func:`itd`; ``K = 0`` is :func:`first_order`.

    Cost: t inner gradients, min(K, t) step VJPs; memory O(min(K, t) · dim w).
    Reference: Shaban et al. 2019.
    """
    return _reverse_through_last(problem, lam, t, min(K, t))


def first_order(problem, lam, *, t: int, K: int = 0, seed: int = 0) -> Hypergrad:
    """First-order estimate ``∇_λ L_out(w_t, λ)`` (w_t treated as a constant). K is unused.

    Cost: t inner gradients, one gradient of L_out, no HVP.
    References: Finn et al. 2017 (FOMAML); Nichol et al. 2018.
    """
    return _reverse_through_last(problem, lam, t, 0)


def one_step(problem, lam, *, t: int, K: int = 0, seed: int = 0) -> Hypergrad:
    """One-step estimate ``∇_λ L_out(w_t, λ) + ∂_λΦ(w_{t−1}, λ)ᵀ ∇_w L_out(w_t, λ)``.

    Equal to ``tbptt(K=1)`` (and to ``itd`` at t = 1), computed here with a single VJP of
    ``g`` at ``w_{t−1}``: ``∂_λΦ(w_{t−1})ᵀ u = −η (∂_λ g(w_{t−1}))ᵀ u``. K is unused.

    Cost: t inner gradients, one VJP.
    References: Luketina et al. 2016; Baydin et al. 2018.
    """
    fns, w0, arrays, eta = _core.problem_inputs(problem)
    g = _core.inner_grad_fn(fns, arrays)
    return _one_step_from(problem, lam, g, _core.run_inner(g, w0, lam, eta, t - 1), t)


def _one_step_from(problem, lam, g, w_prev, t: int) -> Hypergrad:
    """The one-step estimate at w_t = Φ(w_prev) (shared with the t-grid form)."""
    fns, _, arrays, eta = _core.problem_inputs(problem)
    lin = _core.Linearization(g, w_prev, lam)
    w_t = (lin.w - eta * lin.g).detach()
    grad_w, grad_lam = _core.outer_grads(fns, w_t, lam, arrays)
    hypergrad = grad_lam - eta * lin.cross(grad_w)
    # Counted as tbptt(K=1), one reverse step (one of each product), by the convention;
    # only its λ-part is needed, so this skips the w-part (as autodiff does at step 0).
    return Hypergrad(hypergrad=hypergrad.detach(), w_t=w_t, n_inner_grad_evals=t,
                     n_hvp_evals=1, n_cross_evals=1)


def itd_forward(problem, lam, *, t: int, K: int = 0, seed: int = 0) -> Hypergrad:
    """Iterative differentiation in forward mode.

    Propagates the tangents ``Z_s = ∂w_s/∂λ`` (one per basis direction e_j of λ, stacked
    first) with ``Z_{s+1} = ∂_wΦ Z_s + ∂_λΦ e_j``, ``Z_0 = 0``: one ``torch.func.jvp`` of Φ
    per step, ``vmap``-ed over the dim λ directions. Then
    ``∇F_j = ∇_λ L_out(w_t)_j + ⟨Z_t[j], ∇_w L_out(w_t)⟩``. Equals :func:`itd`. K is unused.

    Cost: t inner gradients, t · dim λ JVPs (batched), memory O(dim λ · dim w) — no growth
    with t. Reference: Franceschi et al. 2017 (forward-mode RTHO).
    """
    step, tangents = _forward_start(problem, lam)
    w, tangents = _forward_steps(step, problem.w_init.detach().clone(), tangents, t)
    return _forward_result(problem, lam, w, tangents, t)


def _forward_start(problem, lam):
    """(step, Z_0): ``step(w, Z) = (Φ(w), ∂_wΦ Z + ∂_λΦ e)`` over the dim λ basis
    directions e (stacked first), and Z_0 = 0."""
    fns, w0, arrays, eta = _core.problem_inputs(problem)
    # torch.func.grad, not autograd: the eager ∇ cannot run under jvp/vmap
    g = (_core.inner_grad_fn(fns, arrays) if fns.has_inner_grad else
         torch.func.grad(lambda w, lam_: fns.inner_loss(w, lam_, arrays)))
    lam = lam.detach()
    n_lam = lam.numel()
    directions = torch.eye(n_lam, dtype=lam.dtype, device=lam.device)
    directions = directions.reshape((n_lam,) + tuple(lam.shape))

    def step(w, tangents):
        def push(dw, dlam):
            return torch.func.jvp(lambda w_, lam_: _core.phi(g, w_, lam_, eta), (w, lam),
                                  (dw, dlam))
        return torch.func.vmap(push, out_dims=(None, 0))(tangents, directions)

    tangents = torch.zeros((n_lam,) + tuple(w0.shape), dtype=w0.dtype, device=w0.device)
    return step, tangents


def _forward_steps(step, w, tangents, n: int):
    """n forward-mode steps of (w, Z)."""
    with torch.no_grad(), warnings.catch_warnings():
        # torch's forward AD scripts its jvp decompositions on first use and warns that
        # torch.jit.script is deprecated: torch-internal, nothing for a caller to act on.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                                category=DeprecationWarning)
        for _ in range(n):
            w, tangents = step(w, tangents)
    return w, tangents


def _forward_result(problem, lam, w, tangents, t: int) -> Hypergrad:
    """∇F_j = ∇_λ L_out(w_t)_j + ⟨Z_t[j], ∇_w L_out(w_t)⟩, with the t-step costs."""
    fns, _, arrays, _ = _core.problem_inputs(problem)
    n_lam = lam.numel()
    grad_w, grad_lam = _core.outer_grads(fns, w, lam, arrays)
    implicit = tangents.reshape(n_lam, -1) @ grad_w.reshape(-1)
    hypergrad = grad_lam + implicit.reshape(lam.shape)
    return Hypergrad(hypergrad=hypergrad, w_t=w, n_inner_grad_evals=t, n_hvp_evals=t * n_lam,
                     n_cross_evals=t * n_lam)
