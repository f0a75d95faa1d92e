"""Backend-free parts of the single-loop solvers: the minibatches one step reads
(``*_samples``) and its oracle calls (``*_counts``), shared by
``hypersweep.algorithms.{jax,torch}.solvers_single`` (see
:mod:`hypersweep.algorithms.solvers_common` for the conventions). Imports neither torch
nor jax.
"""
from __future__ import annotations

from hypersweep.algorithms.common import add_costs
from hypersweep.algorithms.solvers_common import SolverConfig, step_costs


def soba_samples(cfg: SolverConfig) -> tuple:
    """One train batch (∇_w L_in, HVP and cross product at one point), one validation
    batch (the outer-gradient pair)."""
    return ("train", "val")


def soba_counts(cfg: SolverConfig, k: int) -> dict:
    """1 inner gradient, 1 HVP, 1 cross product, 1 outer-gradient pair per iteration."""
    return step_costs(cfg, inner=1, hvp=1, cross=1, outer=1, train_rows=cfg.b_train,
                      val_rows=cfg.b_val)


# --- SABA ------------------------------------------------------------------------------------

def saba_samples(cfg: SolverConfig) -> tuple:
    """As SOBA: one train batch (per-sample g, Hv, cross at one point), one validation
    batch (per-sample outer-gradient pairs)."""
    return ("train", "val")


def saba_counts(cfg: SolverConfig, k: int) -> dict:
    """SOBA's calls, each evaluated per sample over its batch (one batched call, b rows):
    1 inner gradient, 1 HVP, 1 cross product, 1 outer-gradient pair. Iteration 0 adds the
    memories' initialisation in ``init`` (one full pass at w₀, λ₀, v₀ = 0: 1 inner gradient
    over the n_train rows and 1 outer-gradient pair over the n_val rows; H v₀ = 0 and
    (∂_λ g)ᵀ v₀ = 0 need no call)."""
    costs = step_costs(cfg, inner=1, hvp=1, cross=1, outer=1, train_rows=cfg.b_train,
                       val_rows=cfg.b_val)
    if k == 0:
        costs = add_costs(costs, step_costs(cfg, inner=1, outer=1, train_rows=cfg.n_train,
                                            val_rows=cfg.n_val))
    return costs


# --- SRBA ------------------------------------------------------------------------------------

def srba_period(cfg: SolverConfig) -> int:
    """Iterations between two full-batch refreshes: ``period``, None → ⌈n_train / b_train⌉
    (one epoch of the inner split)."""
    period = cfg.get("period")
    return -(-cfg.n_train // cfg.b_train) if period is None else int(period)


def srba_samples(cfg: SolverConfig) -> tuple:
    """One train batch and one validation batch, each read at the new and the previous
    point (unused at a full-batch refresh)."""
    return ("train", "val")


def srba_counts(cfg: SolverConfig, k: int) -> dict:
    """A refresh (k a multiple of the period): 1 inner gradient, 1 HVP, 1 cross product,
    1 outer-gradient pair over the whole splits. Otherwise each of them twice on the
    minibatches (at the current and the previous point; the rows are counted per read)."""
    if k % srba_period(cfg) == 0:
        return step_costs(cfg, inner=1, hvp=1, cross=1, outer=1, train_rows=cfg.n_train,
                          val_rows=cfg.n_val)
    return step_costs(cfg, inner=2, hvp=2, cross=2, outer=2, train_rows=2 * cfg.b_train,
                      val_rows=2 * cfg.b_val)


# --- TTSA ------------------------------------------------------------------------------------

#: offset that keeps the truncation hash away from its fixed point 0 (2³²/golden ratio)
TRUNCATION_SALT = 0x9E3779B9
_MASK32 = 0xFFFFFFFF


def mix32(x: int) -> int:
    """A 32-bit integer hash (xor-shift / multiply, "lowbias32"); the JAX step computes the
    same function in uint32 arithmetic."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    x ^= x >> 16
    return x


def ttsa_truncation(cfg: SolverConfig, k: int) -> int:
    """The HVPs of TTSA's Neumann estimate at iteration k: p_k ∈ {0, …, K−1}, K =
    ``n_hia_steps``, uniform (up to 2⁻³²·K) and independent of the minibatches —
    ``mix32(k + salt) mod K``, a counter-based draw, so that ``counts`` (which sees only
    cfg and k) is exact and both backends use the same p_k (the same sequence for every
    seed; the minibatches differ). In the deterministic limit (the train split read
    whole) the estimate is the K-term Neumann sum: K − 1 HVPs."""
    K = int(cfg.get("n_hia_steps"))
    if cfg.b_train >= cfg.n_train:
        return K - 1
    return mix32(int(k) + TRUNCATION_SALT) % K


def ttsa_samples(cfg: SolverConfig) -> tuple:
    """One train batch for the step on w, one for the cross product, K − 1 for the
    Neumann HVPs (the first p_k of them are read), one validation batch."""
    return ("train", "train") + ("train",) * (int(cfg.get("n_hia_steps")) - 1) + ("val",)


def ttsa_counts(cfg: SolverConfig, k: int) -> dict:
    """1 inner gradient, p_k HVPs (:func:`ttsa_truncation`), 1 cross product, 1
    outer-gradient pair; rows b_train·(2 + p_k) + b_val."""
    p = ttsa_truncation(cfg, k)
    return step_costs(cfg, inner=1, hvp=p, cross=1, outer=1,
                      train_rows=(2 + p) * cfg.b_train, val_rows=cfg.b_val)


def ttsa_schedule(cfg: SolverConfig, k):
    """(inner step α_k, outer step β_k) of iteration k: α_k = α·(1 + k/m)^(−2/5),
    β_k = β·(1 + k/m)^(−3/5), m = ``decay_offset`` (None: constant α, β). Hong et al.
    (2023) set, for a nonconvex outer problem and a horizon of K iterations, α ∝ K^(−2/5)
    on w and β ∝ K^(−3/5) on λ (λ on the slower time scale); used here as schedules in k,
    as benchmark_bilevel does (m = 1 is its schedule α/(k+1)^0.4, β/(k+1)^0.6). Works on
    Python numbers and traced arrays."""
    m = cfg.get("decay_offset")
    if m is None:
        return cfg.inner_step, cfg.outer_step
    ratio = 1.0 + k / float(m)
    return cfg.inner_step * ratio ** -0.4, cfg.outer_step * ratio ** -0.6


# --- MA-SOBA ---------------------------------------------------------------------------------

def ma_soba_samples(cfg: SolverConfig) -> tuple:
    """As SOBA: one train batch, one validation batch."""
    return ("train", "val")


def ma_soba_counts(cfg: SolverConfig, k: int) -> dict:
    """As SOBA: 1 inner gradient, 1 HVP, 1 cross product, 1 outer-gradient pair."""
    return step_costs(cfg, inner=1, hvp=1, cross=1, outer=1, train_rows=cfg.b_train,
                      val_rows=cfg.b_val)
