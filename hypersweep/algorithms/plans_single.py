"""Backend-free parts of the single-loop solvers: the minibatches one step reads
(``*_samples``) and its oracle calls (``*_counts``), shared by
``hypersweep.algorithms.{jax,torch}.solvers_single`` (see
:mod:`hypersweep.algorithms.solvers_common` for the conventions). Imports neither torch
nor jax.
"""
from __future__ import annotations

from hypersweep.algorithms.solvers_common import SolverConfig, step_costs


def soba_samples(cfg: SolverConfig) -> tuple:
    """One train batch (∇_w L_in, HVP and cross product at one point), one validation
    batch (the outer-gradient pair)."""
    return ("train", "val")


def soba_counts(cfg: SolverConfig, k: int) -> dict:
    """1 inner gradient, 1 HVP, 1 cross product, 1 outer-gradient pair per iteration."""
    return step_costs(cfg, inner=1, hvp=1, cross=1, outer=1, train_rows=cfg.b_train,
                      val_rows=cfg.b_val)
