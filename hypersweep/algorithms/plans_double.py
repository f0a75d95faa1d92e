"""Backend-free parts of the two-loop solvers: the minibatches one step reads
(``*_samples``), its oracle calls (``*_counts``) and the layout that maps the draws onto
the step's loops, shared by ``hypersweep.algorithms.{jax,torch}.solvers_double`` (see
:mod:`hypersweep.algorithms.solvers_common` for the conventions). Imports neither torch
nor jax.

Layouts: a step's ``samples(cfg)`` is a sequence of named groups ``(name, split, count)``
(e.g. stocBiO: 10 "train" batches for the inner SGD steps, 10 for the Neumann factors,
one for the cross product, one "val"); :func:`split_draws` cuts the step's ``draws`` along
the same groups, so the two backends read the same batch at the same place.

Data-dependent costs (``bsa``'s random Neumann truncation, ``hoag``'s tolerance-driven
loops): ``counts(cfg, k)`` gives the part that does not depend on the data, and the state
carries ``calls``, an integer vector of the *other* calls since ``init``, in the order of
:data:`CALLS`; :func:`calls_costs` turns an increase of ``calls`` into cost columns (a
train batch reads ``cfg.b_train`` rows, a validation batch ``cfg.b_val``; ``hoag`` has no
``batch_size``, so its batches are the whole splits).
"""
from __future__ import annotations

import math
from typing import Sequence

from hypersweep.algorithms.solvers_common import (CALLS, SolverConfig,  # noqa: F401
                                                  calls_costs, step_costs)

def _samples(layout) -> tuple:
    return tuple(split for _, split, count in layout for _ in range(count))


def split_draws(layout, draws) -> dict:
    """``draws`` (one index array per entry of the samples) cut into the layout's groups:
    name -> tuple of index arrays."""
    out, start = {}, 0
    for name, _, count in layout:
        out[name] = tuple(draws[start:start + count])
        start += count
    if start != len(draws):
        raise ValueError(f"a step got {len(draws)} minibatches, its layout reads {start}")
    return out


# --- stocBiO ------------------------------------------------------------------------------
def stocbio_solver_layout(cfg: SolverConfig) -> tuple:
    """T = n_inner_steps SGD batches, Q = n_neumann_steps Neumann batches (one per factor
    I − γH_j), one batch for the cross product, one validation batch."""
    return (("inner", "train", cfg.get("n_inner_steps")),
            ("neumann", "train", cfg.get("n_neumann_steps")),
            ("cross", "train", 1), ("val", "val", 1))


def stocbio_solver_samples(cfg: SolverConfig) -> tuple:
    return _samples(stocbio_solver_layout(cfg))


def stocbio_solver_counts(cfg: SolverConfig, k: int) -> dict:
    """T inner gradients, Q HVPs, 1 cross product, 1 outer-gradient pair; every call on
    its own batch."""
    t, q = cfg.get("n_inner_steps"), cfg.get("n_neumann_steps")
    return step_costs(cfg, inner=t, hvp=q, cross=1, outer=1,
                      train_rows=(t + q + 1) * cfg.b_train, val_rows=cfg.b_val)


# --- BSA ----------------------------------------------------------------------------------
def bsa_layout(cfg: SolverConfig) -> tuple:
    """T SGD batches, N − 1 batches for the HIA factors (the first p are read), one batch
    whose integers draw the truncation index p (no data read), one cross-product batch,
    one validation batch."""
    n = cfg.get("n_hia_steps")
    return (("inner", "train", cfg.get("n_inner_steps")), ("hia", "train", n - 1),
            ("truncation", "train", 1), ("cross", "train", 1), ("val", "val", 1))


def bsa_samples(cfg: SolverConfig) -> tuple:
    return _samples(bsa_layout(cfg))


def bsa_counts(cfg: SolverConfig, k: int) -> dict:
    """T inner gradients, 1 cross product, 1 outer-gradient pair. The p HVPs of the HIA
    (p random) are in the state's ``calls``."""
    t = cfg.get("n_inner_steps")
    return step_costs(cfg, inner=t, cross=1, outer=1, train_rows=(t + 1) * cfg.b_train,
                      val_rows=cfg.b_val)


def truncation_index(total: int, n: int) -> int:
    """Reference for BSA's truncation index: p = (Σ_i idx_i) mod N (the backends compute
    Σ_i (idx_i mod N) mod N, equal and free of overflow). The idx_i are i.i.d. uniform on
    {0..n−1}: p is exactly uniform on {0..N−1} when N divides n, and within
    |φ|^b of uniform otherwise (φ the largest nonzero Fourier coefficient of idx mod N)."""
    return int(total) % int(n)


# --- AmIGO --------------------------------------------------------------------------------
def amigo_layout(cfg: SolverConfig) -> tuple:
    """T SGD batches on w, N = n_adjoint_steps batches for the SGD steps on v, one
    cross-product batch, one validation batch."""
    return (("inner", "train", cfg.get("n_inner_steps")),
            ("adjoint", "train", cfg.get("n_adjoint_steps")),
            ("cross", "train", 1), ("val", "val", 1))


def amigo_samples(cfg: SolverConfig) -> tuple:
    return _samples(amigo_layout(cfg))


def amigo_counts(cfg: SolverConfig, k: int) -> dict:
    """T inner gradients, N HVPs, 1 cross product, 1 outer-gradient pair."""
    t, n = cfg.get("n_inner_steps"), cfg.get("n_adjoint_steps")
    return step_costs(cfg, inner=t, hvp=n, cross=1, outer=1,
                      train_rows=(t + n + 1) * cfg.b_train, val_rows=cfg.b_val)


# --- VRBO ---------------------------------------------------------------------------------
def vrbo_period(cfg: SolverConfig) -> int:
    """Outer iterations between full-batch refreshes: ``period``, or ⌈n_train / b_train⌉
    (one epoch of minibatches) when None."""
    period = cfg.get("period")
    return int(period) if period is not None else max(1, math.ceil(cfg.n_train / cfg.b_train))


def vrbo_layout(cfg: SolverConfig) -> tuple:
    """Per inner step t (m = n_inner_steps of them): one train batch (inner gradient and
    cross product), Q = n_neumann_steps Neumann batches, one validation batch; grouped
    as m "batch", m·Q "neumann" (step t reads [tQ, (t+1)Q)), m "val"."""
    m, q = cfg.get("n_inner_steps"), cfg.get("n_neumann_steps")
    return (("batch", "train", m), ("neumann", "train", m * q), ("val", "val", m))


def vrbo_samples(cfg: SolverConfig) -> tuple:
    return _samples(vrbo_layout(cfg))


def vrbo_counts(cfg: SolverConfig, k: int) -> dict:
    """Per inner step, the estimates at the new and the old point on the same batches:
    2 × (1 inner gradient, Q HVPs, 1 cross, 1 outer pair). Every ``period`` iterations
    (k mod period = 0) a full-batch refresh: 1 inner gradient, Q HVPs, 1 cross, 1 outer
    pair, each reading its whole split."""
    m, q = cfg.get("n_inner_steps"), cfg.get("n_neumann_steps")
    costs = dict(inner=2 * m, hvp=2 * m * q, cross=2 * m, outer=2 * m,
                 train_rows=2 * m * (q + 2) * cfg.b_train, val_rows=2 * m * cfg.b_val)
    if k % vrbo_period(cfg) == 0:
        costs = dict(inner=costs["inner"] + 1, hvp=costs["hvp"] + q,
                     cross=costs["cross"] + 1, outer=costs["outer"] + 1,
                     train_rows=costs["train_rows"] + (q + 2) * cfg.n_train,
                     val_rows=costs["val_rows"] + cfg.n_val)
    return step_costs(cfg, **costs)


# --- HOAG ---------------------------------------------------------------------------------
def hoag_samples(cfg: SolverConfig) -> tuple:
    """None: every call reads the whole splits (``oracles.all_train`` / ``all_val``)."""
    return ()


def hoag_counts(cfg: SolverConfig, k: int) -> dict:
    """1 outer-gradient pair and 1 cross product (full batch). The inner gradients and
    HVPs of the tolerance-driven loops are in the state's ``calls``."""
    return step_costs(cfg, cross=1, outer=1, train_rows=cfg.n_train, val_rows=cfg.n_val)
