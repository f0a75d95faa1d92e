"""Single-loop stochastic bilevel solvers in PyTorch (mirrors ``jax/solvers_single.py``).

Each solver is a :class:`~hypersweep.algorithms.solvers_common.Solver`: ``init``/``step``
here, ``samples``/``counts`` in :mod:`hypersweep.algorithms.plans_single` (backend-free).
The pieces and conventions (oracles, draws, cfg, counting) are in
:mod:`hypersweep.algorithms.solvers_common`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.func import grad, vjp, vmap

from hypersweep.algorithms import plans_single
from hypersweep.algorithms.solvers_common import Solver
from hypersweep.algorithms.torch._core import Linearization
from hypersweep.algorithms.torch._solver_core import scatter_rows


class SobaState(NamedTuple):
    """SOBA's state: inner w, linear-system v, outer λ, iteration count k."""

    inner: Any
    adjoint: Any
    outer: Any
    k: Any


def soba_init(oracles, w0, lam0, cfg) -> SobaState:
    """w₀, v₀ = 0, λ₀, k = 0."""
    return SobaState(inner=w0, adjoint=torch.zeros_like(w0), outer=lam0,
                     k=0)


def soba_step(oracles, state, draws, cfg) -> SobaState:
    """One SOBA iteration (Dagréou et al. 2022, Algorithm 1).

    With one train batch B and one validation batch B' (``draws``), α = ``inner_step``,
    γ = ``adjoint_step``, β = ``outer_step``, all three directions at the current point::

        D_w = ∇_w L_in^B(w, λ)
        D_v = H^B(w, λ) v + ∇_w L_out^{B'}(w, λ)
        D_λ = ∇_λ L_out^{B'}(w, λ) + (∂_λ ∇_w L_in^B(w, λ))ᵀ v
        w ← w − α D_w,  v ← v − γ D_v,  λ ← λ − β D_λ

    v tracks −[H]⁻¹ ∇_w L_out, so D_λ estimates ∇F(λ) at w. Cost: 1 inner gradient,
    1 HVP, 1 cross product (one linearization of ∇_w L_in^B), 1 outer-gradient pair.
    """
    idx_in, idx_out = draws
    w, v, lam = state.inner, state.adjoint, state.outer
    g, hv, cv = oracles.inner_vjp(w, lam, idx_in, v)
    gw_out, glam_out = oracles.outer_grads(w, lam, idx_out)
    return SobaState(inner=w - cfg.inner_step * g,
                     adjoint=v - cfg.adjoint_step * (hv + gw_out),
                     outer=lam - cfg.outer_step * (glam_out + cv),
                     k=state.k + 1)


soba = Solver(init=soba_init, step=soba_step, samples=plans_single.soba_samples,
              counts=plans_single.soba_counts)


# --- SABA ------------------------------------------------------------------------------------

class SabaState(NamedTuple):
    """SABA's state: w, v, λ, k and the SAGA memories, one row per sample —
    ``memory_train`` (n_train rows): the last [∇_w ℓ_i | H_i v | (∂_λ ∇_w ℓ_i)ᵀ v],
    ``memory_val`` (n_val rows): the last [∇_w f_j | ∇_λ f_j] (flattened, concatenated),
    ``mean_train``/``mean_val`` their means over the rows, and ``count_train``/
    ``count_val`` (all zero between steps) the scratch that counts the repeats of a batch's
    rows in O(b)."""

    inner: Any
    adjoint: Any
    outer: Any
    k: Any
    memory_train: Any
    memory_val: Any
    mean_train: Any
    mean_val: Any
    count_train: Any
    count_val: Any


def _per_sample_train(oracles, w, lam, idx, v=None):
    """Per train row i of ``idx``: [∇_w ℓ_i | H_i v | (∂_λ ∇_w ℓ_i)ᵀ v] flattened, shape
    (b, 2·dim w + dim λ) — the per-row values of ``oracles.inner_vjp``, from
    one ``torch.func.vmap`` (about 25x faster than its Python loop on the CPU), or the
    problem's closed form where it declares one (``inner_grad_rows``); ``v`` None:
    [∇_w ℓ_i] only."""
    fns, arrays = oracles.fns, oracles.arrays
    if fns.has_grad_rows:
        b = idx.shape[0]
        rows = fns.inner_grad_rows(w, lam, torch.zeros_like(w) if v is None else v, arrays,
                                   idx)
        return torch.cat([x.reshape(b, -1) for x in (rows[:1] if v is None else rows)], dim=1)

    def one(i):
        row = i.unsqueeze(0)
        if v is None:
            return grad(fns.inner_loss_batch)(w, lam, arrays, row).reshape(-1)
        g, pullback = vjp(lambda w_, lam_: grad(fns.inner_loss_batch)(w_, lam_, arrays, row),
                          w, lam)
        hv, cv = pullback(v)
        return torch.cat([g.reshape(-1), hv.reshape(-1), cv.reshape(-1)])

    return vmap(one)(idx)


def _per_sample_val(oracles, w, lam, idx):
    """Per validation row j of ``idx``: [∇_w f_j | ∇_λ f_j] flattened (``torch.func``, or
    ``outer_grad_rows`` where the problem declares it)."""
    fns, arrays = oracles.fns, oracles.arrays
    if fns.has_grad_rows:
        b = idx.shape[0]
        return torch.cat([x.reshape(b, -1) for x in fns.outer_grad_rows(w, lam, arrays, idx)],
                         dim=1)

    def one(j):
        gw, gl = grad(fns.outer_loss_batch, argnums=(0, 1))(w, lam, arrays, j.unsqueeze(0))
        return torch.cat([gw.reshape(-1), gl.reshape(-1)])

    return vmap(one)(idx)


def _split(flat, *likes):
    """``flat`` cut into tensors shaped as ``likes``."""
    out, start = [], 0
    for like in likes:
        out.append(flat[start:start + like.numel()].reshape(like.shape))
        start += like.numel()
    return out


def saba_init(oracles, w0, lam0, cfg) -> SabaState:
    """w₀, v₀ = 0, λ₀, k = 0 and the memories filled at (w₀, λ₀, v₀) by one full pass:
    per-sample ∇_w ℓ_i over the train split and (∇_w f_j, ∇_λ f_j) over the validation
    split; H_i v₀ and (∂_λ ∇_w ℓ_i)ᵀ v₀ are 0 (counted on iteration 0, see
    :func:`~hypersweep.algorithms.plans_single.saba_counts`)."""
    g = _per_sample_train(oracles, w0, lam0, oracles.all_train)
    memory_train = torch.cat([g, torch.zeros_like(g), lam0.new_zeros((cfg.n_train,
                                                                       lam0.numel()))], dim=1)
    memory_val = _per_sample_val(oracles, w0, lam0, oracles.all_val)
    device = memory_train.device
    return SabaState(inner=w0, adjoint=torch.zeros_like(w0), outer=lam0, k=0,
                     memory_train=memory_train, memory_val=memory_val,
                     mean_train=memory_train.mean(dim=0), mean_val=memory_val.mean(dim=0),
                     count_train=torch.zeros(cfg.n_train, dtype=torch.int64, device=device),
                     count_val=torch.zeros(cfg.n_val, dtype=torch.int64, device=device))


def _saga(memory, mean, count, idx, rows, n):
    """One SAGA estimate in O(b): (m̄ + 1/b Σ_r (rows_r − m[idx_r]), m with rows idx set to
    rows, m̄ + 1/n Σ over the distinct rows of the change, the scratch back to 0). A row
    drawn c times adds its (equal) change c times with weight 1/c."""
    old = memory[idx]
    delta = rows - old
    count = count.index_put((idx,), torch.ones_like(idx), accumulate=True)
    repeats = count[idx]
    new_mean = mean + torch.sum(delta / repeats[:, None].to(delta.dtype), dim=0) / n
    return (mean + delta.mean(dim=0), scatter_rows(memory, idx, rows), new_mean,
            count.index_put((idx,), torch.zeros_like(idx)))


def saba_step(oracles, state, draws, cfg) -> SabaState:
    """One SABA iteration (Dagréou et al. 2022, Algorithm 2: SOBA with SAGA).

    Per-sample values at the current (w, v, λ) on the train batch B (rows i) and the
    validation batch B' (rows j): (∇_w ℓ_i, H_i v, (∂_λ ∇_w ℓ_i)ᵀ v) and (∇_w f_j,
    ∇_λ f_j). Each of the five quantities q gets its SAGA estimate with memory m (per row)
    and its mean m̄::

        S[q] = m̄ + 1/|B| Σ_{i∈B} (q_i − m_i),   then m_i ← q_i (i ∈ B),
        m̄ ← m̄ + 1/n Σ_{distinct i∈B} (q_i − m_i^old)                (O(b))
        D_w = S[∇_w ℓ],  D_v = S[H v] + S[∇_w f],  D_λ = S[∇_λ f] + S[(∂_λ ∇_w ℓ)ᵀ v]
        w ← w − α D_w,  v ← v − γ D_v,  λ ← λ − β D_λ

    The estimates are unbiased (rows drawn with replacement) and their variance vanishes
    as the iterates converge, so constant steps reach the stationary point; with whole
    splits (the deterministic limit) S[q] is the full-batch q, SABA is SOBA. Cost: SOBA's
    oracles, each per sample over its batch (1 inner gradient, 1 HVP, 1 cross product,
    1 outer-gradient pair; b_train + b_val rows), constant steps α, γ, β; memory
    n_train·(2 dim w + dim λ) + n_val·(dim w + dim λ).
    """
    idx_in, idx_out = draws
    w, v, lam = state.inner, state.adjoint, state.outer
    d_train, memory_train, mean_train, count_train = _saga(
        state.memory_train, state.mean_train, state.count_train, idx_in,
        _per_sample_train(oracles, w, lam, idx_in, v), cfg.n_train)
    d_val, memory_val, mean_val, count_val = _saga(
        state.memory_val, state.mean_val, state.count_val, idx_out,
        _per_sample_val(oracles, w, lam, idx_out), cfg.n_val)
    d_g, d_hv, d_cv = _split(d_train, w, w, lam)
    d_gw, d_gl = _split(d_val, w, lam)
    return SabaState(inner=w - cfg.inner_step * d_g,
                     adjoint=v - cfg.adjoint_step * (d_hv + d_gw),
                     outer=lam - cfg.outer_step * (d_gl + d_cv),
                     k=state.k + 1, memory_train=memory_train, memory_val=memory_val,
                     mean_train=mean_train, mean_val=mean_val, count_train=count_train,
                     count_val=count_val)


saba = Solver(init=saba_init, step=saba_step, samples=plans_single.saba_samples,
              counts=plans_single.saba_counts)


# --- SRBA ------------------------------------------------------------------------------------

class SrbaState(NamedTuple):
    """SRBA's state: w, v, λ, k, the point of the previous iteration (``previous``: (w, v,
    λ)) and the recursive directions (``directions``: (D_w, D_v, D_λ))."""

    inner: Any
    adjoint: Any
    outer: Any
    k: Any
    previous: Any
    directions: Any


def srba_init(oracles, w0, lam0, cfg) -> SrbaState:
    """w₀, v₀ = 0, λ₀, k = 0; previous point = the start, directions 0 (iteration 0 is a
    full-batch refresh)."""
    v0 = torch.zeros_like(w0)
    return SrbaState(inner=w0, adjoint=v0, outer=lam0, k=0, previous=(w0, v0, lam0),
                     directions=(torch.zeros_like(w0), v0, torch.zeros_like(lam0)))


def _directions(oracles, w, v, lam, idx_in, idx_out):
    """(D_w, D_v, D_λ) = (g, H v + ∇_w L_out, ∇_λ L_out + (∂_λ g)ᵀ v) on the given rows."""
    g, hv, cv = oracles.inner_vjp(w, lam, idx_in, v)
    gw, gl = oracles.outer_grads(w, lam, idx_out)
    return g, hv + gw, gl + cv


def srba_step(oracles, state, draws, cfg) -> SrbaState:
    """One SRBA iteration (Dagréou, Moreau, Vaiter & Ablin 2024, Algorithm 1).

    With q = ``period`` (None: ⌈n_train / b_train⌉), D(w, v, λ) = SOBA's three directions
    and (w⁻, v⁻, λ⁻) the previous iterate::

        k ≡ 0 mod q:  D^k = D(w, v, λ) on the whole splits                  (refresh)
        otherwise:    D^k = D^{k−1} + D^{B,B'}(w, v, λ) − D^{B,B'}(w⁻, v⁻, λ⁻)   (SARAH)
        w ← w − α D^k_w,  v ← v − γ D^k_v,  λ ← λ − β D^k_λ

    Both minibatch evaluations read the same batches B, B'. The paper's projection of v
    on a ball is omitted (its radius needs unknown constants; benchmark practice). Cost:
    a refresh is 1 inner gradient, 1 HVP, 1 cross product, 1 outer-gradient pair over
    n_train + n_val rows; another iteration twice each on the minibatches. Constant
    steps α, γ, β.
    """
    idx_in, idx_out = draws
    w, v, lam = state.inner, state.adjoint, state.outer
    if state.k % plans_single.srba_period(cfg) == 0:
        d_w, d_v, d_lam = _directions(oracles, w, v, lam, oracles.all_train,
                                      oracles.all_val)
    else:
        new = _directions(oracles, w, v, lam, idx_in, idx_out)
        old = _directions(oracles, *state.previous, idx_in, idx_out)
        d_w, d_v, d_lam = (d + a - b for d, a, b in zip(state.directions, new, old))
    return SrbaState(inner=w - cfg.inner_step * d_w,
                     adjoint=v - cfg.adjoint_step * d_v,
                     outer=lam - cfg.outer_step * d_lam,
                     k=state.k + 1, previous=(w, v, lam), directions=(d_w, d_v, d_lam))


srba = Solver(init=srba_init, step=srba_step, samples=plans_single.srba_samples,
              counts=plans_single.srba_counts)


# --- TTSA ------------------------------------------------------------------------------------

class TtsaState(NamedTuple):
    """TTSA's state: w, the last Neumann adjoint estimate v, λ, k."""

    inner: Any
    adjoint: Any
    outer: Any
    k: Any


def ttsa_init(oracles, w0, lam0, cfg) -> TtsaState:
    """w₀, v₀ = 0, λ₀, k = 0."""
    return TtsaState(inner=w0, adjoint=torch.zeros_like(w0), outer=lam0, k=0)


def _batch_grad_fn(oracles, idx):
    """(w, λ) ↦ ∇_w L_in^B(w, λ) with its graph (for a :class:`Linearization`)."""
    def grad_fn(w, lam):
        (g,) = torch.autograd.grad(oracles.fns.inner_loss_batch(w, lam, oracles.arrays, idx),
                                   w, create_graph=True)
        return g
    return grad_fn


def ttsa_step(oracles, state, draws, cfg) -> TtsaState:
    """One TTSA iteration (Hong, Wai, Wang & Yang 2023, Algorithm 1, with Ghadimi & Wang's
    stochastic Neumann hypergradient).

    Draws: B₀ (step on w), B_c (cross product), B₁ … B_{K−1} (HVPs), B' (validation);
    K = ``n_hia_steps``, η = γ (``adjoint_step``, a bound on 1/L), p_k ∈ {0, …, K−1}
    uniform (:func:`~hypersweep.algorithms.plans_single.ttsa_truncation`)::

        w ← w − α_k ∇_w L_in^{B₀}(w, λ)                    (the inner step comes first)
        v = −K η (I − η H^{B_p}) ⋯ (I − η H^{B₁}) ∇_w L_out^{B'}(w, λ)    (at the new w)
        λ ← λ − β_k (∇_λ L_out^{B'}(w, λ) + (∂_λ ∇_w L_in^{B_c}(w, λ))ᵀ v)

    E_p[v] = −η Σ_{i<K} (I − ηH)^i ∇_w L_out, the K-term Neumann approximation of
    −H⁻¹ ∇_w L_out. In the deterministic limit (train split read whole) the random
    truncation would be the only noise left, so v is that expectation (K − 1 HVPs).
    Steps (:func:`~hypersweep.algorithms.plans_single.ttsa_schedule`, the paper's
    nonconvex rates as schedules in k): α_k = α (1 + k/m)^(−2/5) on w, β_k = β (1 +
    k/m)^(−3/5) on λ (the slower time scale), m = ``decay_offset`` (None: constant); η
    constant. Cost: 1 inner gradient, p_k HVPs, 1 cross product, 1 outer-gradient pair.
    """
    w, lam, k = state.inner, state.outer, state.k
    idx_w, idx_cross, idx_hvp, idx_out = draws[0], draws[1], draws[2:-1], draws[-1]
    n_terms, eta = int(cfg.get("n_hia_steps")), cfg.adjoint_step
    alpha_k, beta_k = plans_single.ttsa_schedule(cfg, k)
    w = w - alpha_k * oracles.inner_grad(w, lam, idx_w)
    gw, gl = oracles.outer_grads(w, lam, idx_out)
    if cfg.b_train >= cfg.n_train:
        # one linearization of the full-batch g serves the K − 1 HVPs and the cross product
        lin = Linearization(_batch_grad_fn(oracles, oracles.all_train), w, lam)
        term, total = gw, gw
        for _ in range(n_terms - 1):
            term = term - eta * lin.hvp(term)
            total = total + term
        v = -eta * total
        cv = lin.cross(v)
    else:
        term = gw
        for i in range(plans_single.ttsa_truncation(cfg, k)):
            term = term - eta * oracles.hvp(w, lam, idx_hvp[i], term)
        v = -n_terms * eta * term
        cv = oracles.cross(w, lam, idx_cross, v)
    return TtsaState(inner=w, adjoint=v, outer=lam - beta_k * (gl + cv), k=k + 1)


ttsa = Solver(init=ttsa_init, step=ttsa_step, samples=plans_single.ttsa_samples,
              counts=plans_single.ttsa_counts)


# --- MA-SOBA ---------------------------------------------------------------------------------

class MaSobaState(NamedTuple):
    """MA-SOBA's state: w, v, λ, k and h, the moving average of the λ direction."""

    inner: Any
    adjoint: Any
    outer: Any
    k: Any
    average: Any


def ma_soba_init(oracles, w0, lam0, cfg) -> MaSobaState:
    """w₀, v₀ = 0, λ₀, k = 0, h₀ = 0."""
    return MaSobaState(inner=w0, adjoint=torch.zeros_like(w0), outer=lam0, k=0,
                       average=torch.zeros_like(lam0))


def ma_soba_step(oracles, state, draws, cfg) -> MaSobaState:
    """One MA-SOBA iteration (Chen, Xiao & Balasubramanian 2023, Algorithm 1).

    SOBA's directions D_w, D_v, D_λ at the current (w, v, λ) (see :func:`soba_step`),
    θ = ``averaging``::

        w ← w − α D_w,  v ← v − γ D_v,  λ ← λ − β h,  h ← h + θ (D_λ − h)

    λ moves along the average h of the past directions (the paper's order: the step
    uses h_k, then h absorbs D_λ^k), which averages out the noise of D_λ. The paper's
    projection of v on a ball is omitted (its radius needs unknown constants). Cost: as
    SOBA (1 inner gradient, 1 HVP, 1 cross product, 1 outer-gradient pair); constant
    steps α, γ, β and weight θ.
    """
    idx_in, idx_out = draws
    w, v, lam, h = state.inner, state.adjoint, state.outer, state.average
    g, hv, cv = oracles.inner_vjp(w, lam, idx_in, v)
    gw_out, glam_out = oracles.outer_grads(w, lam, idx_out)
    theta = cfg.get("averaging")
    return MaSobaState(inner=w - cfg.inner_step * g,
                       adjoint=v - cfg.adjoint_step * (hv + gw_out),
                       outer=lam - cfg.outer_step * h,
                       k=state.k + 1,
                       average=h + theta * (glam_out + cv - h))


ma_soba = Solver(init=ma_soba_init, step=ma_soba_step, samples=plans_single.ma_soba_samples,
                 counts=plans_single.ma_soba_counts)
