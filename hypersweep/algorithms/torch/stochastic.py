"""Stochastic bilevel estimators in PyTorch: stocbio."""
from __future__ import annotations

import torch

from hypersweep.algorithms.common import Hypergrad
from hypersweep.algorithms.torch import _core


def _n_rows(problem, split: str) -> int:
    """Rows of the ``split`` ("train"/"val") set that the minibatch losses index."""
    key = f"X_{split}"
    if key in problem.arrays_np:
        return int(problem.arrays_np[key].shape[0])
    n = problem.built.info.get(f"n_{split}")
    if n is None:
        raise ValueError(f"problem {problem.name!r} has neither array {key!r} nor "
                         f"info['n_{split}']; stocbio cannot size its minibatches")
    return int(n)


class _Batches:
    """Row indices: all rows when ``batch_size ≥ n`` (no sampling, no RNG draw), else
    ``batch_size`` distinct rows drawn uniformly (``randperm``) from a CPU generator."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator,
                 device: torch.device):
        self.full = batch_size >= n
        self.n, self.batch_size, self.generator, self.device = n, batch_size, generator, device
        self.all_rows = torch.arange(n, device=device)

    def draw(self, count: int) -> list[torch.Tensor]:
        """``count`` index batches, sampled on the CPU and moved with one transfer."""
        if self.full or count == 0:
            return [self.all_rows] * count
        rows = torch.stack([torch.randperm(self.n, generator=self.generator)[:self.batch_size]
                            for _ in range(count)])
        return list(rows.to(self.device).unbind(0))


def stocbio(problem, lam, *, t: int, K: int, seed: int = 0, batch_size: int = 64,
            neumann_lr: float | None = None) -> Hypergrad:
    """stocBiO hypergradient (Ji, Yang & Liang 2021).

    Inner: t steps of minibatch SGD ``w ← w − η ∇_w L_in^{B_s}(w, λ)`` from ``w_init``
    (``B_s``: ``batch_size`` training rows). Adjoint, at ``w_t`` with fresh batches and
    ``η_N = neumann_lr`` (default η)::

        v = η_N Σ_{q=0}^{K} Π_{j=1}^{q} (I − η_N H_{B_j}) ∇_w L_out^{B_val}(w_t, λ)

    (K Neumann terms beyond the first, no early stop), and the estimate
    ``∇_λ L_out^{B_val}(w_t, λ) − (∂_λ g^{B})ᵀ v``. Batches are drawn from a CPU
    ``torch.Generator`` seeded with ``seed``, in the order: t inner, B_val, B_1..B_K, B.
    With ``batch_size ≥ n`` a set uses every row (no draw) and, for η_N = η, the estimate
    equals ``aid_neumann(K)`` without its early stop.

    Counts: ``n_inner_grad_evals = t`` (minibatch gradients), ``n_hvp_evals = K + 1``,
    ``solver_iters = K``.
    Cost: t minibatch gradients, K minibatch HVPs (each building its batch's gradient graph,
    once in total when the training batch is full) + 1 cross VJP; memory O(dim w).
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
    generator = torch.Generator().manual_seed(int(seed))
    train = _Batches(_n_rows(problem, "train"), batch_size, generator, device)
    val = _Batches(_n_rows(problem, "val"), batch_size, generator, device)
    g_batch = _core.batch_inner_grad_fn(problem)
    lam = lam.detach()

    w = problem.w_init.detach().clone()
    with torch.no_grad():
        for idx in train.draw(t):
            w.sub_(g_batch(w, lam, idx), alpha=eta)

    (val_idx,) = val.draw(1)
    rhs, grad_lam = _core.outer_grads(problem, w, lam, val_idx)

    def linearize(idx):
        return _core.Linearization(lambda w_, lam_: g_batch(w_, lam_, idx), w, lam)

    hvp_batches = train.draw(K)
    cross_idx = train.draw(1)[0]
    shared = linearize(train.all_rows) if train.full else None
    term = rhs
    v = rhs.clone()
    for idx in hvp_batches:
        lin = shared if shared is not None else linearize(idx)
        term = term - eta_n * lin.hvp(term)
        v.add_(term)
    v.mul_(eta_n)
    lin = shared if shared is not None else linearize(cross_idx)
    hypergrad = grad_lam - lin.cross(v)
    return Hypergrad(hypergrad.detach(), w, t, K + 1, K,
                     {"batch_size": batch_size, "neumann_lr": eta_n,
                      "full_batch": train.full and val.full})
