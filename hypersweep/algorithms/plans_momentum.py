"""Backend-free parts of the momentum (STORM-type) solvers FSLA, MRBO and SUSTAIN: the
minibatches one step reads (``*_samples``), its oracle calls (``*_counts``), and the
host-side pieces their steps share (the decaying schedule's constants, the weights that
turn a host draw into SUSTAIN's random Neumann truncation). Shared by
``hypersweep.algorithms.{jax,torch}.solvers_momentum`` (see
:mod:`hypersweep.algorithms.solvers_common` for the conventions). Imports neither torch
nor jax.

STORM (Cutkosky & Orabona 2019) corrects a running direction d with the change of the
estimator between the previous and the current iterate, both evaluated on the *same*
minibatches::

    d_k = D(x_k; B_k) + (1 − ρ_k) (d_{k−1} − D(x_{k−1}; B_k)),    ρ_0 = 1

so every estimator a step feeds into a recursion is computed twice (at the current and at
the previous iterate): the counts below include both.

Rows read (``n_samples_touched``): every minibatch a step draws, once, whatever the number
of points it is evaluated at (as SOBA counts its train batch once for three quantities).
SUSTAIN's extra draw only seeds its random truncation and reads no data: not counted.
"""
from __future__ import annotations

from hypersweep.algorithms.solvers_common import SolverConfig, step_costs


# -- FSLA ------------------------------------------------------------------------------------
def fsla_samples(cfg: SolverConfig) -> tuple:
    """One train batch (∇_w L_in, HVP and cross products, at both points), one validation
    batch (the outer-gradient pairs, at both points)."""
    return ("train", "val")


def fsla_counts(cfg: SolverConfig, k: int) -> dict:
    """At the current point one linearization of ∇_w L_in (1 inner gradient, 1 HVP, 1 cross)
    and 1 outer pair; at the previous point the outer direction again: 1 cross, 1 outer."""
    return step_costs(cfg, inner=1, hvp=1, cross=2, outer=2, train_rows=cfg.b_train,
                      val_rows=cfg.b_val)


# -- MRBO and SUSTAIN: the decaying schedule ----------------------------------------------------
def decay_offset(cfg: SolverConfig) -> float | None:
    """m of the schedule η_k = (m / (m + k))^{1/3} (None: constant steps and momentum)."""
    m = cfg.get("decay_offset")
    return None if m is None else float(m)


def n_neumann_batches(cfg: SolverConfig) -> int:
    """Hessian minibatches of one hypergradient estimate: MRBO Q, SUSTAIN Q − 1 (its
    truncation k ∈ {0, …, Q−1} uses at most Q − 1 factors)."""
    q = int(cfg.get("n_hia_steps"))
    return q if cfg.name == "mrbo" else q - 1


def _double_momentum_samples(cfg: SolverConfig) -> tuple:
    return (("train", "train") + ("train",) * n_neumann_batches(cfg) + ("val",))


def _double_momentum_counts(cfg: SolverConfig) -> dict:
    n_h = n_neumann_batches(cfg)
    return step_costs(cfg, inner=2, hvp=2 * n_h, cross=2, outer=2,
                      train_rows=(2 + n_h) * cfg.b_train, val_rows=cfg.b_val)


def mrbo_samples(cfg: SolverConfig) -> tuple:
    """``("train" ζ: ∇_w L_in, "train" ζ₀: cross product, Q × "train": the Neumann
    Hessians, "val": the outer pair)``, Q = ``n_hia_steps``."""
    return _double_momentum_samples(cfg)


def mrbo_counts(cfg: SolverConfig, k: int) -> dict:
    """At each of the two points (current and previous): 1 inner gradient, Q HVPs, 1 cross,
    1 outer pair."""
    return _double_momentum_counts(cfg)


# -- SUSTAIN: the random truncation --------------------------------------------------------------
def sustain_samples(cfg: SolverConfig) -> tuple:
    """As MRBO with Q − 1 Hessian batches, plus one last ``"train"`` draw that only seeds
    the truncation k (:func:`truncation_weights`)."""
    return _double_momentum_samples(cfg) + ("train",)


def sustain_counts(cfg: SolverConfig, k: int) -> dict:
    """At each of the two points: 1 inner gradient, Q − 1 HVPs (all computed, those past
    the truncation masked, so the cost is fixed), 1 cross, 1 outer pair."""
    return _double_momentum_counts(cfg)


def random_truncation(cfg: SolverConfig) -> bool:
    """Whether SUSTAIN draws its truncation: not when the truncation draw is the whole
    train split (the deterministic limit), where the estimator is replaced by its mean,
    the partial Neumann sum."""
    return cfg.b_train < cfg.n_train and int(cfg.get("n_hia_steps")) > 1


def truncation_weights(cfg: SolverConfig) -> tuple:
    """Integer weights c_j with k = (Σ_j (i_j mod Q) c_j) mod Q for the draw i of
    ``b_train`` rows.

    Reading the draw as the base-n digits of N = Σ_j i_j n^{b−1−j} (N uniform on
    [0, n^b) since the rows are i.i.d. uniform), k = N mod Q with c_j = n^{b−1−j} mod Q:
    uniform on {0, …, Q−1} up to Q / n^b. Computed in integers on the host so both
    backends get the same k; every term stays below Q², the sum below b·Q² (no overflow
    of int32 for any realistic b, Q).
    """
    q, n, b = int(cfg.get("n_hia_steps")), cfg.n_train, cfg.b_train
    return tuple(pow(n, b - 1 - j, q) for j in range(b))
