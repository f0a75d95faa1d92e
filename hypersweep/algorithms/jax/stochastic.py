"""stocBiO (Ji, Yang & Liang 2021) in JAX: minibatch inner SGD, minibatch Neumann adjoint.

With g^B = ∇_w L_in^B (the problem's ``inner_loss_batch`` over training rows B) and
η = ``problem.inner_lr``, η_N = ``neumann_lr`` (default η):

    inner:    w_{s+1} = w_s − η g^{B_s}(w_s, λ),  s = 0 … t−1,  a fresh batch B_s per step
    adjoint:  v = η_N Σ_{q=0}^{K} Π_{j=1}^{q} (I − η_N H_{B_j}) ∇_w L_out^{B_val}(w_t, λ)
    output:   ∇_λ L_out^{B_val}(w_t, λ) − (∂_λ g^{B_c}(w_t, λ))ᵀ v

with K independent training batches B_1 … B_K (one fresh batch per Neumann factor, as
in the paper's recursion), one validation batch B_val for both outer gradients, and one
more training batch B_c for the cross term. Compared with the AID convention (hypergrad =
∇_λ L_out − η (∂_λ g)ᵀ v_AID, v_AID = Σ_{q=0}^{K} (I − ηH)^q rhs), stocBiO's v already
carries the step: v = η_N v_AID. Hence with ``batch_size`` ≥ both split sizes (every row
used, no sampling) and η_N = η, stocbio(t, K) equals ``aid_neumann``(t, K) up to rounding
(when that one does not stop early; stocBiO never stops early).

Sampling: each batch is ``batch_size`` row indices drawn i.i.d. uniformly *with
replacement* from its split (``jax.random.randint``): the t inner batches and B_1 … B_K,
B_c from the training rows, B_val from the validation rows. That is what stocBiO's
analysis assumes (independent samples, so every minibatch average is an unbiased
estimate of its full-batch counterpart), it needs no per-epoch state, and one batch costs
O(batch) whatever the split size; a permutation per batch (drawing without replacement)
costs O(n) per step, and a permutation per epoch O(n) once per epoch. A split with at
most ``batch_size`` rows is used whole, in order (no draw). Keys derive from ``seed`` with
``fold_in`` of the step index, so batch B_s does not depend on t or K and one seed
reproduces one run bit for bit. Conditional on w_t, the batches B_val, B_1 … B_K and B_c
are independent of each other, so the estimate is an unbiased estimate of the
full-batch AID-Neumann(K) one at w_t.

Counting convention (``docs/costs.md``): ``n_inner_grad_evals`` = t minibatch gradients;
``n_hvp_evals`` = K minibatch Hessian-vector products (the Neumann ones);
``n_cross_evals`` = 1 (the cross term); ``n_outer_grad_evals`` = 1 (one pair on B_val);
``solver_iters`` = K; ``n_samples_touched`` = (t + K + 1)·b_tr + b_val with
b_tr = min(batch_size, n_train), b_val = min(batch_size, n_val).
One compilation per (problem functions, shapes, batch sizes); t, K, seed, η, η_N traced.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from hypersweep.algorithms.common import Hypergrad, minibatch_sizes
from hypersweep.algorithms.jax import _core


def _batch(key, n: int, batch_size: int):
    """One batch of row indices of an n-row split: all rows when n ≤ ``batch_size``,
    else ``batch_size`` i.i.d. uniform draws with replacement (O(batch), not O(n))."""
    if batch_size >= n:
        return jnp.arange(n)
    return jax.random.randint(key, (batch_size,), 0, n)


@functools.partial(jax.jit, static_argnames=("fns", "n_train", "n_val", "batch_size"))
def _stocbio(fns, n_train, n_val, batch_size, w0, lam, arrays, eta, eta_neumann, t, K, key):
    key_inner, key_neumann, key_val, key_cross = jax.random.split(key, 4)
    g_batch = _core.batch_inner_grad_fn(fns, arrays)

    def sgd_step(s, w):
        idx = _batch(jax.random.fold_in(key_inner, s), n_train, batch_size)
        return w - eta * g_batch(w, lam, idx)

    w_t = lax.fori_loop(0, t, sgd_step, w0)
    idx_val = _batch(key_val, n_val, batch_size)
    rhs, grad_lam = _core.outer_grads_batch(fns, w_t, lam, arrays, idx_val)

    def neumann_step(j, carry):
        term, total = carry
        idx = _batch(jax.random.fold_in(key_neumann, j), n_train, batch_size)
        _, vjp_w = jax.vjp(lambda w: g_batch(w, lam, idx), w_t)
        term = term - eta_neumann * vjp_w(term)[0]
        return term, total + term

    _, total = lax.fori_loop(0, K, neumann_step, (rhs, rhs))
    v = eta_neumann * total
    idx_cross = _batch(key_cross, n_train, batch_size)
    _, vjp_lam = jax.vjp(lambda lam_: g_batch(w_t, lam_, idx_cross), lam)
    return grad_lam - vjp_lam(v)[0], w_t


def stocbio(problem, lam, *, t: int, K: int, seed: int = 0, batch_size: int = 64,
            neumann_lr: float | None = None) -> Hypergrad:
    """stocBiO hypergradient estimate (Ji, Yang & Liang, ICML 2021).

    t: minibatch SGD steps with step η = ``problem.inner_lr``. K: Neumann terms after the
    first (K minibatch Hessian-vector products, each on its own batch). ``batch_size``:
    rows per batch (≥ 1; a split no larger than it is used whole). ``neumann_lr``: η_N
    (> 0; None → η). ``seed``: the batches (reproducible bit for bit).

    Sampler: every batch is ``batch_size`` i.i.d. uniform row indices drawn with
    replacement (``jax.random.randint``, key = ``fold_in`` of the seed's stream and the
    step index): t inner batches and K + 1 Hessian/cross batches from the training split,
    one validation batch from the validation split. O(batch) per batch, independent of n.

    Cost: t minibatch gradients, K minibatch Hessian-vector products, 1 minibatch cross
    product, 1 minibatch outer-gradient pair; (t + K + 1)·b_tr + b_val rows read
    (b = min(batch_size, split size)); O(dim w) memory. Counts as in the module docstring.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    eta_n = problem.inner_lr if neumann_lr is None else neumann_lr
    if isinstance(eta_n, bool) or not isinstance(eta_n, (int, float)) or not eta_n > 0:
        raise ValueError(f"neumann_lr must be a number > 0 (or None for inner_lr); "
                         f"got {neumann_lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    fns, w0, arrays, eta = _core.problem_inputs(problem)
    n_train, n_val = minibatch_sizes(problem)
    hypergrad, w_t = jax.block_until_ready(_stocbio(
        fns, n_train, n_val, batch_size, w0, lam, arrays, eta,
        jnp.asarray(eta_n, problem.dtype), jnp.asarray(t, jnp.int32),
        jnp.asarray(K, jnp.int32), jax.random.PRNGKey(seed)))
    b_train, b_val = min(batch_size, n_train), min(batch_size, n_val)
    return Hypergrad(hypergrad=hypergrad, w_t=w_t, n_inner_grad_evals=t, n_hvp_evals=K,
                     solver_iters=K, n_cross_evals=1, n_outer_grad_evals=1,
                     n_samples_touched=(t + K + 1) * b_train + b_val,
                     extras={"batch_size": batch_size, "neumann_lr": float(eta_n),
                             "full_batch": batch_size >= max(n_train, n_val)})
