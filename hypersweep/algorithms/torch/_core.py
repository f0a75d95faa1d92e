"""Shared PyTorch pieces of the hypergradient estimators: the inner map and the linear
solvers.

Conventions (the JAX backend uses the same ones; every public function and class here
has the same name and signature as in :mod:`hypersweep.algorithms.jax._core`, checked
by ``tests/test_mirror.py``):

* ``g(w, λ) = ∇_w L_in(w, λ)``: the problem's analytic ``inner_grad`` when it has one
  (plain tensor ops: no autograd overhead in the inner loop, still differentiable by
  autograd), else autodiff of ``inner_loss`` (see :func:`inner_grad_fn`).
* ``Φ(w, λ) = w − η g(w, λ)``, ``w_t = Φ^t(w_init)``.
* The adjoint system is ``(I − ∂_wΦ(w_t))ᵀ v = ∇_w L_out(w_t, λ)``, i.e. ``η H v = rhs``
  with ``H = ∇²_w L_in(w_t, λ)``, and ``∂_λΦ(w_t, λ)ᵀ v = −η (∂_λ g)ᵀ v``.
* Solvers take a ``matvec`` and iterate on tensors of any shape. Their stop criterion is
  evaluated on the device every iteration; once met, the iterate is frozen with
  ``torch.where`` so the result is what a per-iteration check gives. The host only reads
  the ``done`` flag every ``_sync_every`` iterations (1 on CPU, where reading is free;
  8 on accelerators, to avoid a GPU→CPU sync per iteration), so up to 7 extra, discarded
  matvecs may run on a GPU. Reported iteration counts are the iterations that changed the
  iterate, identical on every device.
"""
from __future__ import annotations

from typing import Callable

import torch

from hypersweep.algorithms.common import DEFAULT_TOL, SolveResult


def tolerance(dtype) -> float:
    """The relative residual at which the iterative adjoint solvers stop early
    (``dtype``: a torch dtype or its name)."""
    return DEFAULT_TOL[str(dtype).removeprefix("torch.")]


def vdot(a, b):
    """Σ a ⊙ b for tensors of any (equal) shape, as a 0-d tensor."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def norm(a):
    """‖a‖₂ over all entries (a 0-d tensor)."""
    return torch.linalg.vector_norm(a)


def problem_inputs(problem):
    """(fns, w_init, arrays, η) with η the problem's inner step (a float)."""
    return problem.fns, problem.w_init, problem.arrays, problem.inner_lr


# -- the inner map -------------------------------------------------------------------------
def _autograd_grad_w(loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``∇_w loss_fn(w, λ, *rest)`` by ``torch.autograd.grad`` (eager; ~10× cheaper per call
    than ``torch.func.grad``). Keeps a graph (``create_graph``) exactly when the caller
    records one: grad mode on and w or λ requiring grad; otherwise returns a plain tensor.
    """
    def grad_w(w, lam, *rest):
        record = torch.is_grad_enabled() and (w.requires_grad or lam.requires_grad)
        with torch.enable_grad():
            w_in = w if w.requires_grad else w.detach().requires_grad_(True)
            (out,) = torch.autograd.grad(loss_fn(w_in, lam, *rest), w_in,
                                         create_graph=record)
        return out
    return grad_w


def inner_grad_fn(fns, arrays):
    """``g(w, λ) = ∇_w L_in(w, λ)`` with the data bound.

    The problem's analytic ``inner_grad`` when it has one (plain tensor ops: no autograd
    overhead in the inner loop, still differentiable by autograd and ``torch.func``).
    Otherwise ``torch.autograd.grad`` of ``inner_loss`` (eager; under ``torch.func``
    transforms use ``torch.func.grad`` instead, as ``itd_forward`` does).
    """
    if fns.has_inner_grad:
        return lambda w, lam: fns.inner_grad(w, lam, arrays)
    return _autograd_grad_w(lambda w, lam: fns.inner_loss(w, lam, arrays))


def batch_inner_grad_fn(fns, arrays):
    """``g^B(w, λ, idx) = ∇_w L_in^B(w, λ)`` over the training rows ``idx`` (autograd)."""
    return _autograd_grad_w(lambda w, lam, idx: fns.inner_loss_batch(w, lam, arrays, idx))


def phi(grad_fn, w, lam, eta):
    """``Φ(w, λ) = w − η g(w, λ)`` for ``grad_fn`` = g."""
    return w - eta * grad_fn(w, lam)


def run_inner(grad_fn, w0, lam, eta, t):
    """``w_t = Φ^t(w0)`` without building a graph (t evaluations of g); updates one buffer
    in place."""
    w = w0.detach().clone()
    lam = lam.detach()
    with torch.no_grad():
        for _ in range(t):
            w.sub_(grad_fn(w, lam), alpha=eta)
    return w


# -- derivatives at a point -----------------------------------------------------------------
def _detached_grads(loss_fn, w, lam):
    w_ = w.detach().requires_grad_(True)
    lam_ = lam.detach().requires_grad_(True)
    with torch.enable_grad():
        gw, glam = torch.autograd.grad(loss_fn(w_, lam_), (w_, lam_), allow_unused=True,
                                       materialize_grads=True)
    return gw.detach(), glam.detach()


def outer_grads(fns, w, lam, arrays):
    """``(∇_w L_out(w, λ), ∇_λ L_out(w, λ))``, detached; zeros where L_out ignores λ."""
    return _detached_grads(lambda w_, lam_: fns.outer_loss(w_, lam_, arrays), w, lam)


def outer_grads_batch(fns, w, lam, arrays, idx):
    """``(∇_w L_out^B, ∇_λ L_out^B)`` of the minibatch loss over the validation rows
    ``idx``, detached."""
    return _detached_grads(lambda w_, lam_: fns.outer_loss_batch(w_, lam_, arrays, idx),
                           w, lam)


class Linearization:
    """The graph of g = ``grad_fn`` built once at (w, λ) and reused by every VJP.

    ``hvp(v) = H v = (∂_w g)ᵀ v`` (H is symmetric) and ``cross(v) = (∂_λ g)ᵀ v``; each
    is one reverse pass through the retained graph (one HVP in the counts). ``g`` is
    g(w, λ) (with its graph).
    """

    def __init__(self, grad_fn, w, lam):
        self.w = w.detach().requires_grad_(True)
        self.lam = lam.detach().requires_grad_(True)
        with torch.enable_grad():
            self.g = grad_fn(self.w, self.lam)

    def _vjp(self, wrt, v):
        if not self.g.requires_grad:  # g does not depend on w or λ at all
            return torch.zeros_like(wrt)
        (out,) = torch.autograd.grad(self.g, wrt, grad_outputs=v, retain_graph=True,
                                     allow_unused=True, materialize_grads=True)
        return out

    def hvp(self, v):
        return self._vjp(self.w, v)

    def cross(self, v):
        return self._vjp(self.lam, v)

    def dense_hessian(self):
        """``∂_w g`` as a (dim w, dim w) matrix: dim w VJPs, batched when autograd can."""
        n = self.w.numel()
        basis = torch.eye(n, dtype=self.w.dtype, device=self.w.device)
        basis = basis.reshape((n,) + tuple(self.w.shape))
        if not self.g.requires_grad:
            return torch.zeros(n, n, dtype=self.w.dtype, device=self.w.device)
        try:
            (rows,) = torch.autograd.grad(self.g, self.w, grad_outputs=basis,
                                          retain_graph=True, is_grads_batched=True,
                                          allow_unused=True, materialize_grads=True)
        except RuntimeError:  # an op without a batching rule: one VJP per basis vector
            rows = torch.stack([self.hvp(e) for e in basis])
        return rows.reshape(n, n)


# -- linear solvers on a matvec ------------------------------------------------------------
def _sync_every(device: torch.device) -> int:
    """How often (in iterations) a solver reads its stop flag on the host."""
    return 1 if device.type == "cpu" else 8


def _relative(x: torch.Tensor, b: torch.Tensor) -> float:
    """x/‖b‖ as a float (0 when b = 0), one host read per solve."""
    b_norm = float(norm(b))
    return float(x) / b_norm if b_norm > 0 else 0.0


def is_nonzero(x):
    """Whether a warm start ``x`` is given and has a non-zero entry (worth a matvec).

    Reads one flag on the host (one sync per solve, not per iteration).
    """
    return x is not None and bool(torch.any(x != 0))


def cg(matvec, b, *, max_iter, tol, x0=None) -> SolveResult:
    """At most ``max_iter`` CG steps on ``A x = b`` (A symmetric positive definite) from
    ``x0`` (default 0).

    Stops when ``‖r‖ ≤ tol·‖b‖`` (recursive residual; relative to b, not to r₀, so an
    accurate ``x0`` stops after 0 steps), or — without applying the step and instead of
    dividing by a vanishing or negative number — when ``pᵀAp`` is not a positive normal
    finite number (A not positive definite along p, or p underflowed) or the new residual
    is not finite: the last finite iterate is returned, so float32 runs with a large
    budget never produce NaN. ``iters`` counts applied steps only; ``matvecs`` includes
    the one for ``r₀ = b − A x0``, taken only when x0 has a non-zero entry (x0 = 0 gives
    exactly the cold run). ``rel_residual`` = ‖r‖/‖b‖ (recursive residual; 0 if b = 0).
    """
    every = _sync_every(b.device)
    tiny = torch.finfo(b.dtype).tiny
    matvecs = 0
    if is_nonzero(x0):
        x = x0.detach().to(b.dtype).clone()
        r = b - matvec(x)
        matvecs += 1
    else:
        x = torch.zeros_like(b)
        r = b.clone()
    p = r.clone()
    rs = vdot(r, r)
    threshold = tol * norm(b)
    done = norm(r) <= threshold
    iters = torch.zeros((), dtype=torch.int64, device=b.device)
    for k in range(max_iter):
        if k % every == 0 and bool(done):
            break
        Ap = matvec(p)
        matvecs += 1
        pAp = vdot(p, Ap)
        ok = (~done) & torch.isfinite(pAp) & (pAp > tiny)
        alpha = torch.where(ok, rs / torch.where(ok, pAp, torch.ones_like(pAp)),
                            torch.zeros_like(pAp))
        r = r - alpha * Ap
        rs_new = vdot(r, r)
        ok = ok & torch.isfinite(alpha) & torch.isfinite(rs_new)
        x = torch.where(ok, x + alpha * p, x)
        beta = torch.where(ok, rs_new / torch.where(ok, rs, torch.ones_like(rs)),
                           torch.zeros_like(rs))
        p = r + beta * p
        rs = torch.where(ok, rs_new, rs)
        iters = iters + ok.to(torch.int64)
        # ~ok covers "pᵀAp ≤ 0 / not finite": stop there rather than divide by it.
        done = done | ~ok | (torch.sqrt(rs_new) <= threshold)
    return SolveResult(x, int(iters), _relative(torch.sqrt(rs), b), matvecs)


def fixed_point(matvec, b, *, max_iter, tol, v0=None) -> SolveResult:
    """At most ``max_iter`` steps of ``v_{k+1} = M v_k + b`` from ``v0`` (default 0).

    ``matvec(v) = M v`` (for AID, ``M = ∂_wΦᵀ = I − ηH``). Stops after the first step
    with ``‖v_{k+1} − v_k‖ ≤ tol·‖b‖``. From 0 the first step, ``v_1 = b``, needs no
    matvec, so ``iters`` steps cost ``iters − 1`` matvecs; from a ``v0`` with a non-zero
    entry every step costs one. ``max_iter = 0`` returns v0 (or 0).
    ``rel_residual`` = ‖v_iters − v_{iters−1}‖/‖b‖ (inf/‖b‖ when no step was taken).
    """
    warm = is_nonzero(v0)
    start = v0.detach().to(b.dtype).clone() if warm else torch.zeros_like(b)
    if max_iter == 0:
        return SolveResult(start, 0, _relative(torch.tensor(float("inf")), b), 0)
    every = _sync_every(b.device)
    threshold = tol * norm(b)
    if warm:
        v = matvec(start) + b
        matvecs = 1
    else:
        v = b.clone()
        matvecs = 0
    delta = norm(v - start)  # ‖v_1 − v_0‖ (= ‖b‖ from 0)
    done = delta <= threshold
    iters = torch.ones((), dtype=torch.int64, device=b.device)
    for k in range(1, max_iter):
        if k % every == 0 and bool(done):
            break
        v_new = matvec(v) + b
        matvecs += 1
        active = ~done
        step = norm(v_new - v)
        v = torch.where(active, v_new, v)
        delta = torch.where(active, step, delta)
        iters = iters + active.to(torch.int64)
        done = done | (step <= threshold)
    return SolveResult(v, int(iters), _relative(delta, b), matvecs)


def neumann(matvec, b, *, n_terms, tol) -> SolveResult:
    """``Σ_{j=0}^{n_terms} M^j b`` (the first ``n_terms + 1`` terms), one matvec a term.

    No warm start: the series has no initial point (warm-start :func:`fixed_point`).

    Stops after adding the first term with ``‖M^j b‖ ≤ tol·‖b‖``. Since the fixed-point
    iterates are the partial sums, ``v_{k+1} = Σ_{j≤k} M^j b``, this equals
    :func:`fixed_point` with ``max_iter = n_terms + 1`` (same stop rule, one fewer
    iteration reported: ``iters`` counts added terms beyond ``b``).
    ``rel_residual`` = ‖last term‖/‖b‖.
    """
    every = _sync_every(b.device)
    threshold = tol * norm(b)
    v = b.clone()
    term = b
    term_norm = norm(b)
    done = term_norm <= threshold
    iters = torch.zeros((), dtype=torch.int64, device=b.device)
    matvecs = 0
    for k in range(n_terms):
        if k % every == 0 and bool(done):
            break
        term = matvec(term)
        matvecs += 1
        active = ~done
        step = norm(term)
        v = torch.where(active, v + term, v)
        term_norm = torch.where(active, step, term_norm)
        iters = iters + active.to(torch.int64)
        done = done | (step <= threshold)
    return SolveResult(v, int(iters), _relative(term_norm, b), matvecs)
