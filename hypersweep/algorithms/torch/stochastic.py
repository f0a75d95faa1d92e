"""Stochastic bilevel estimators in PyTorch: stocbio (mirrors ``jax/stochastic.py``).

Minibatches are i.i.d. uniform row indices drawn with replacement (``torch.randint``),
O(batch) per batch whatever the split size; see :func:`stocbio` for the sampler and the
counts.
"""
from __future__ import annotations

import torch

from hypersweep.algorithms.common import Hypergrad, minibatch_sizes
from hypersweep.algorithms.torch import _core
from hypersweep.seeding import seed_from_text


def _stream_seed(seed: int, stream: str) -> int:
    """A stable 63-bit seed for one kind of batch of one run (blake2b, never ``hash``).

    One generator per kind: the inner batches do not depend on K, nor the validation and
    Hessian batches on t (as with the JAX backend's ``fold_in`` keys).
    """
    return seed_from_text(f"stocbio/{seed}/{stream}", bits=63)  # recorded in the baseline


class _Batches:
    """Row indices of one split for one stream of batches.

    All rows when the split has at most ``batch_size`` rows (no draw). Otherwise each
    batch is ``batch_size`` i.i.d. uniform indices drawn with replacement by
    ``torch.randint`` from a seeded CPU generator: O(batch) per batch, whatever n.
    """

    def __init__(self, n: int, batch_size: int, seed: int, stream: str,
                 device: torch.device):
        self.n, self.batch_size, self.device = n, batch_size, device
        self.full = batch_size >= n
        self.rows = min(batch_size, n)  # rows one batch reads
        self.generator = None if self.full else torch.Generator().manual_seed(
            _stream_seed(seed, stream))

    def draw(self, count: int) -> list[torch.Tensor]:
        """``count`` index batches, sampled on the CPU and moved with one transfer."""
        if count == 0:
            return []
        if self.full:
            return [torch.arange(self.n, device=self.device)] * count
        rows = torch.randint(0, self.n, (count, self.batch_size), generator=self.generator)
        return list(rows.to(self.device).unbind(0))


def stocbio(problem, lam, *, t: int, K: int, seed: int = 0, batch_size: int = 64,
            neumann_lr: float | None = None) -> Hypergrad:
    """stocBiO hypergradient (Ji, Yang & Liang 2021).

    Inner: t steps of minibatch SGD ``w ← w − η ∇_w L_in^{B_s}(w, λ)`` from ``w_init``
    (``B_s``: ``batch_size`` training rows). Adjoint, at ``w_t`` with fresh batches and
    ``η_N = neumann_lr`` (default η)::

        v = η_N Σ_{q=0}^{K} Π_{j=1}^{q} (I − η_N H_{B_j}) ∇_w L_out^{B_val}(w_t, λ)

    (K Neumann terms beyond the first, no early stop), and the estimate
    ``∇_λ L_out^{B_val}(w_t, λ) − (∂_λ g^{B_c})ᵀ v``. With ``batch_size ≥ n`` a split uses
    every row (no draw) and, for η_N = η, the estimate equals ``aid_neumann(K)`` without
    its early stop.

    Sampler: every batch is ``batch_size`` i.i.d. uniform row indices drawn with
    replacement (``torch.randint``) from a CPU ``torch.Generator``: t inner batches B_s,
    K Hessian batches B_1..B_K (one per Neumann factor) and the cross-term batch B_c from
    the training split, one batch B_val (for both outer gradients) from the validation
    split. Each kind has its own generator, seeded from (``seed``, kind) by blake2b, and
    batch s is the s-th draw of its kind's generator, so one seed reproduces one run bit
    for bit and the inner batches do not depend on K. O(batch) per batch, independent of
    n: i.i.d. draws are what stocBiO's analysis assumes (independent samples, unbiased
    minibatch averages) and need no per-epoch state; ``randperm(n)`` per batch would cost
    O(n) per step, a permutation per epoch O(n) per epoch.

    Counts (identical to the JAX backend): ``n_inner_grad_evals = t``, ``n_hvp_evals = K``
    (the Neumann products), ``n_cross_evals = 1``, ``n_outer_grad_evals = 1``,
    ``solver_iters = K``, ``n_samples_touched = (t + K + 1)·b_tr + b_val`` with
    ``b = min(batch_size, split size)``.
    Cost: t minibatch gradients, K minibatch HVPs (each building its batch's gradient graph,
    once in total when the training batch is full), 1 cross VJP, 1 outer-gradient pair;
    memory O(dim w).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    if neumann_lr is not None and not (isinstance(neumann_lr, (int, float))
                                       and not isinstance(neumann_lr, bool)
                                       and neumann_lr > 0):
        raise ValueError(f"neumann_lr must be a number > 0 or None; got {neumann_lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    eta = problem.inner_lr
    eta_n = eta if neumann_lr is None else float(neumann_lr)
    device = lam.device
    n_train, n_val = minibatch_sizes(problem)
    inner, hessian, cross = (_Batches(n_train, batch_size, seed, stream, device)
                             for stream in ("inner", "hessian", "cross"))
    val = _Batches(n_val, batch_size, seed, "val", device)
    g_batch = _core.batch_inner_grad_fn(problem.fns, problem.arrays)
    lam = lam.detach()

    w = problem.w_init.detach().clone()
    with torch.no_grad():
        for idx in inner.draw(t):
            w.sub_(g_batch(w, lam, idx), alpha=eta)

    (val_idx,) = val.draw(1)
    rhs, grad_lam = _core.outer_grads_batch(problem.fns, w, lam, problem.arrays, val_idx)

    def linearize(idx):
        return _core.Linearization(lambda w_, lam_: g_batch(w_, lam_, idx), w, lam)

    # A full training split gives every B_j and B_c the same rows: one graph serves all.
    shared = linearize(hessian.draw(1)[0]) if hessian.full else None
    term = rhs
    v = rhs.clone()
    for idx in hessian.draw(K):
        lin = shared if shared is not None else linearize(idx)
        term = term - eta_n * lin.hvp(term)
        v.add_(term)
    v.mul_(eta_n)
    lin = shared if shared is not None else linearize(cross.draw(1)[0])
    hypergrad = grad_lam - lin.cross(v)
    return Hypergrad(hypergrad=hypergrad.detach(), w_t=w, n_inner_grad_evals=t, n_hvp_evals=K,
                     solver_iters=K, n_cross_evals=1, n_outer_grad_evals=1,
                     n_samples_touched=(t + K + 1) * inner.rows + val.rows,
                     extras={"batch_size": batch_size, "neumann_lr": eta_n,
                             "full_batch": inner.full and val.full})
