"""The minibatch oracles of the bilevel solvers in PyTorch (mirrors ``jax/_solver_core.py``).

``Oracles(fns, arrays, n_train, n_val)`` binds a problem's pure functions to its data and
gives every first- and second-order quantity a solver step needs over a minibatch of row
indices ``idx``; ``all_train``/``all_val`` are the whole splits. Every result is detached
(a solver step is not differentiated through). Eager autograd: ``torch.autograd.grad``
for gradients, one retained graph per linearization for (g, Hv, cross).
"""
from __future__ import annotations

import torch


def _grads(loss, wrt, *, create_graph=False):
    out = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True,
                              create_graph=create_graph)
    return out


def _leaf(x):
    return x.detach().requires_grad_(True)


class Oracles:
    """Minibatch oracles of one problem instance (see the module docstring)."""

    def __init__(self, fns, arrays, n_train, n_val):
        self.fns, self.arrays = fns, arrays
        device = next(iter(arrays.values())).device
        self.all_train = torch.arange(n_train, device=device)
        self.all_val = torch.arange(n_val, device=device)

    # -- values ---------------------------------------------------------------------------
    def inner_value(self, w, lam, idx):
        """L_in^B(w, λ)."""
        with torch.no_grad():
            return self.fns.inner_loss_batch(w, lam, self.arrays, idx)

    def outer_value(self, w, lam, idx):
        """L_out^B(w, λ)."""
        with torch.no_grad():
            return self.fns.outer_loss_batch(w, lam, self.arrays, idx)

    # -- first order ----------------------------------------------------------------------
    def inner_grad(self, w, lam, idx):
        """g^B(w, λ) = ∇_w L_in^B (one inner gradient)."""
        w_ = _leaf(w)
        with torch.enable_grad():
            (g,) = _grads(self.fns.inner_loss_batch(w_, lam.detach(), self.arrays, idx), w_)
        return g.detach()

    def inner_grads(self, w, lam, idx):
        """(∇_w L_in^B, ∇_λ L_in^B) (one inner gradient and, in the counts, one cross)."""
        w_, lam_ = _leaf(w), _leaf(lam)
        with torch.enable_grad():
            gw, gl = _grads(self.fns.inner_loss_batch(w_, lam_, self.arrays, idx), (w_, lam_))
        return gw.detach(), gl.detach()

    def outer_grads(self, w, lam, idx):
        """(∇_w L_out^B, ∇_λ L_out^B) (one outer-gradient pair)."""
        w_, lam_ = _leaf(w), _leaf(lam)
        with torch.enable_grad():
            gw, gl = _grads(self.fns.outer_loss_batch(w_, lam_, self.arrays, idx), (w_, lam_))
        return gw.detach(), gl.detach()

    # -- second order ---------------------------------------------------------------------
    def inner_vjp(self, w, lam, idx, v):
        """(g^B, H^B v, (∂_λ g^B)ᵀ v) from one linearization of g^B at (w, λ)."""
        w_, lam_ = _leaf(w), _leaf(lam)
        with torch.enable_grad():
            (g,) = _grads(self.fns.inner_loss_batch(w_, lam_, self.arrays, idx), w_,
                          create_graph=True)
            if not g.requires_grad:
                return g.detach(), torch.zeros_like(w), torch.zeros_like(lam)
            hv, cv = torch.autograd.grad(g, (w_, lam_), grad_outputs=v, allow_unused=True,
                                         materialize_grads=True)
        return g.detach(), hv.detach(), cv.detach()

    def hvp(self, w, lam, idx, v):
        """H^B v (one Hessian-vector product)."""
        return self.inner_vjp(w, lam, idx, v)[1]

    def cross(self, w, lam, idx, v):
        """(∂_λ g^B)ᵀ v (one cross product)."""
        return self.inner_vjp(w, lam, idx, v)[2]



def scatter_rows(memory, idx, rows):
    """``memory`` with rows ``idx`` set to ``rows`` (a new tensor; a repeated index keeps
    one of its equal values: the rows of one batch are computed at one point)."""
    out = memory.clone()
    out[idx] = rows
    return out


def run_chunk(step, fns, cfg, n_steps, arrays, state, draws):
    """``n_steps`` outer iterations of ``step`` (a Python loop; eager PyTorch)."""
    oracles = Oracles(fns, arrays, cfg.n_train, cfg.n_val)
    for k in range(n_steps):
        state = step(oracles, state, tuple(d[k] for d in draws), cfg)
    return state


def run_init(init, fns, cfg, arrays, w0, lam0):
    """``init(oracles, w0, lam0, cfg)``."""
    return init(Oracles(fns, arrays, cfg.n_train, cfg.n_val), w0, lam0, cfg)
