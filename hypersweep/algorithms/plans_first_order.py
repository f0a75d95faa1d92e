"""Backend-free parts of the first- and zeroth-order solvers (F2SA, BOME, PZOBO): the
minibatches one step reads (``*_samples``), its oracle calls (``*_counts``), F2SA's
multiplier schedule and the counter-based Gaussian generator PZOBO's directions come from
(a numpy reference of the one in both backends). Shared by
``hypersweep.algorithms.{jax,torch}.solvers_first_order`` (see
:mod:`hypersweep.algorithms.solvers_common` for the conventions). Imports neither torch
nor jax.

Rows (``n_samples_touched``) count the minibatches drawn: a batch read by several
evaluations (F2SA's z- and w-steps, PZOBO's Q + 1 inner runs) counts once.
"""
from __future__ import annotations

import numpy as np

from hypersweep.algorithms.solvers_common import SolverConfig, step_costs

#: the 32-bit mixing constants of PZOBO's counter-based generator (Wellons' lowbias32)
MIX_MUL = (0x7FEB352D, 0x846CA68B)
#: the golden-ratio increment that spreads counters and salts over 32 bits
GOLDEN = 0x9E3779B9
MASK32 = 0xFFFFFFFF


# --- F2SA ---------------------------------------------------------------------------------
def f2sa_multiplier(cfg: SolverConfig, k):
    """ν_k = ``multiplier0`` + ``multiplier_growth`` · k: the penalty multiplier of outer
    iteration k (linear growth; ``k`` may be a backend scalar)."""
    return cfg.get("multiplier0") + cfg.get("multiplier_growth") * k


def f2sa_samples(cfg: SolverConfig) -> tuple:
    """Per inner step t < T: one train batch (∇_w L_in at z and at w), one validation batch
    (∇_w L_out at w); then one train batch (∇_λ L_in at w and at z, common to both so
    their difference is not swamped by sampling noise) and one validation batch
    (∇_λ L_out)."""
    return ("train", "val") * (cfg.get("n_inner_steps") + 1)


def f2sa_counts(cfg: SolverConfig, k: int) -> dict:
    """T = ``n_inner_steps``: 2T + 2 inner gradients (T on z, T on w, and the two
    (∇_w, ∇_λ) L_in pairs of the λ step), 2 cross products (those two ∇_λ L_in), T + 1
    outer-gradient pairs; no HVP."""
    T = cfg.get("n_inner_steps")
    return step_costs(cfg, inner=2 * T + 2, cross=2, outer=T + 1,
                      train_rows=(T + 1) * cfg.b_train, val_rows=(T + 1) * cfg.b_val)


# --- BOME ---------------------------------------------------------------------------------
def bome_samples(cfg: SolverConfig) -> tuple:
    """T train batches (the GD steps of the value-function copy θ), one train batch
    (∇ L_in at w and at θ_T: ∇q̂), one validation batch (∇L_out)."""
    return ("train",) * (cfg.get("n_inner_steps") + 1) + ("val",)


def bome_counts(cfg: SolverConfig, k: int) -> dict:
    """T + 2 inner gradients (T steps of θ, the (∇_w, ∇_λ) L_in pairs at w and at θ_T),
    2 cross products (those two ∇_λ L_in), 1 outer-gradient pair; no HVP."""
    T = cfg.get("n_inner_steps")
    return step_costs(cfg, inner=T + 2, cross=2, outer=1,
                      train_rows=(T + 1) * cfg.b_train, val_rows=cfg.b_val)


# --- PZOBO --------------------------------------------------------------------------------
def pzobo_samples(cfg: SolverConfig) -> tuple:
    """T train batches (the inner GD steps, shared by the unperturbed run and the Q
    perturbed ones: common random numbers), one validation batch (∇L_out)."""
    return ("train",) * cfg.get("n_inner_steps") + ("val",)


def pzobo_counts(cfg: SolverConfig, k: int) -> dict:
    """T·(Q + 1) inner gradients (T steps at λ and at each λ + μ u_j), 1 outer-gradient
    pair; no HVP, no cross product (Q = ``n_directions``)."""
    T, Q = cfg.get("n_inner_steps"), cfg.get("n_directions")
    return step_costs(cfg, inner=T * (Q + 1), outer=1, train_rows=T * cfg.b_train,
                      val_rows=cfg.b_val)


def mix32(x: np.ndarray) -> np.ndarray:
    """lowbias32 (C. Wellons' 32-bit integer hash) on uint32 arrays: the reference of the
    backends' ``mix32``."""
    x = np.asarray(x, dtype=np.uint32)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(MIX_MUL[0])
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(MIX_MUL[1])
        x = x ^ (x >> np.uint32(16))
    return x


def draw_salt(idx: np.ndarray) -> np.uint32:
    """Σ_i mix32(idx_i + i·GOLDEN) mod 2³²: the run's entropy folded out of one minibatch
    (reference of the backends' ``draw_salt``)."""
    idx = np.asarray(idx).astype(np.uint64)
    i = np.arange(idx.size, dtype=np.uint64)
    words = ((idx + i * np.uint64(GOLDEN)) & np.uint64(MASK32)).astype(np.uint32)
    return np.uint32(int(mix32(words).astype(np.uint64).sum()) & MASK32)


def counter_normals(salt: int, k: int, shape: tuple, dtype=np.float64) -> np.ndarray:
    """Standard normals of ``shape`` from the counter (salt, k): the numpy reference of
    the backends' ``counter_normals`` (bits equal; floats to rounding).

    key = mix32(salt ⊕ mix32(k)); word i = mix32(mix32(i·GOLDEN + key) ⊕ key) for
    i < 2m (m = size); u = (word >> 8 + ½)·2⁻²⁴ ∈ (0, 1) (24 bits: exact in float32);
    z = √(−2 log u_{:m}) · cos(2π u_{m:}) (Box–Muller, cosine branch).
    """
    m = int(np.prod(shape, dtype=np.int64))
    key = mix32(np.uint32(salt) ^ mix32(np.uint32(k)))
    i = np.arange(2 * m, dtype=np.uint64)
    ctr = ((i * np.uint64(GOLDEN) + np.uint64(key)) & np.uint64(MASK32)).astype(np.uint32)
    words = mix32(mix32(ctr) ^ key)
    u = ((words >> np.uint32(8)).astype(dtype) + 0.5) * 2.0 ** -24
    return (np.sqrt(-2.0 * np.log(u[:m])) * np.cos(2.0 * np.pi * u[m:])).reshape(shape)
