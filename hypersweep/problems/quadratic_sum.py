"""Finite-sum quadratic bilevel problem (benchmark_bilevel's ``simulated`` construction).

Parametrization: λ = x ∈ R^d (``dim_outer``), w = z ∈ R^p (``dim_inner``), no transform::

    L_in(w, λ)  = 1/n Σᵢ [½ wᵀAᵢw + ½ λᵀBᵢλ + λᵀCᵢw + aᵢᵀw + bᵢᵀλ]     (n train samples)
    L_out(w, λ) = 1/m Σⱼ [½ wᵀFⱼw + ½ λᵀHⱼλ + λᵀKⱼw + fⱼᵀw + hⱼᵀλ]     (m val samples)

A minibatch loss is the same mean over the sampled rows, so every stochastic solver sees
unbiased minibatch oracles. Closed form from the means (Ā, C̄, …): w*(λ) = −Ā⁻¹(C̄ᵀλ + ā),
J = ∂w*/∂λ = −Ā⁻¹C̄ᵀ and ∇F(λ) = H̄λ + K̄w* + h̄ + Jᵀ(F̄w* + K̄ᵀλ + f̄).

Data: ``data: file.npz`` with the arrays ``inner_hess_inner`` (n,p,p), ``inner_hess_outer``
(n,d,d), ``inner_cross`` (n,d,p), ``inner_linear_inner`` (n,p), ``inner_linear_outer``
(n,d), the same five with prefix ``outer_`` (m samples), and optionally ``inner_var0`` /
``outer_var0`` (the start point; default 0 and λ₀ = ``lam0``). Without data, an instance of
the same shape is generated from the seed (our own construction, in the spirit of
benchmark_bilevel's: rank-one Aᵢ whose mean has eigenvalues in [``mu_inner``, 1], rank-one
PSD Bᵢ, Fᵢ, Hᵢ, Gaussian cross terms scaled by ``l_cross``, N(0, 1) linear terms).

η (``inner_lr``) = 1/λ_max(Ā). The float64 oracle solves with the means, so a float32 data
file (benchmark_bilevel writes float32) is read exactly and promoted.

Stored forms: each quadratic form's matrix is kept symmetrized, Aᵢ ← ½(Aᵢ + Aᵢᵀ) (likewise
Bᵢ, Fⱼ, Hⱼ), which leaves every loss unchanged (½wᵀAw = ½wᵀ·½(A + Aᵀ)·w), and the cross
terms also transposed (``inner_cross_t`` Cᵢᵀ, ``outer_cross_t`` Kⱼᵀ), so that the
per-sample hooks (:func:`inner_grad_rows`, :func:`outer_grad_rows`; SABA's memories) are
plain matrix-vector products over the gathered rows: ∇_w ℓᵢ = Aᵢw + Cᵢᵀλ + aᵢ, Hᵢv = Aᵢv,
(∂_λ∇_w ℓᵢ)ᵀv = Cᵢv; ∇_w fⱼ = Fⱼw + Kⱼᵀλ + fⱼ, ∇_λ fⱼ = Hⱼλ + Kⱼw + hⱼ. (A transpose of
the gathered rows inside the compiled step was 2.3x slower than the autodiff route in
XLA:CPU; the stored transposes make SABA 1.3–1.6x faster than it, docs/benchmarks.md §10c.)
The means, and so the float64 oracle and ``inner_grad``, are symmetric too.
"""
from __future__ import annotations

import numpy as np

from hypersweep.problems.base import ProblemData
from hypersweep.problems.data import rng
from hypersweep.problems.helpers import check_positive, check_positive_int

#: the optional functions this module defines (see hypersweep.problems.base)
HOOKS = frozenset({"inner_grad", "inner_loss_batch", "outer_loss_batch", "inner_grad_rows",
                   "outer_grad_rows"})
#: (per-sample array, its mean's key) for the inner and the outer sums
_TERMS = ("hess_inner", "hess_outer", "cross", "linear_inner", "linear_outer")
REQUIRED = tuple(f"{side}_{term}" for side in ("inner", "outer") for term in _TERMS)


def _read(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as f:
            found = {k: np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"data: cannot read {path!r} as .npz: {exc}") from None
    missing = [k for k in REQUIRED if k not in found]
    if missing:
        raise ValueError(f"data: {path!r} lacks the arrays {', '.join(missing)} (a "
                         f"quadratic_sum file needs: {', '.join(REQUIRED)})")
    return found


def _generate(seed, n, m, p, d, mu_inner, l_cross) -> dict[str, np.ndarray]:
    g = rng(seed, "quadratic_sum")

    def rank_one_psd(count, dim, low, high):
        basis, _ = np.linalg.qr(g.standard_normal((dim, dim)))
        spectrum = np.linspace(low, high, dim)
        j = np.arange(count) % dim  # balanced: the mean is basis·diag(spectrum)·basisᵀ
        vecs = basis[:, j].T * np.sqrt(dim * spectrum[j])[:, None]
        return np.einsum("ni,nj->nij", vecs, vecs)

    return {
        "inner_hess_inner": rank_one_psd(n, p, mu_inner, 1.0),
        "inner_hess_outer": rank_one_psd(n, d, 0.1, 1.0),
        "inner_cross": l_cross * g.standard_normal((n, d, p)) / np.sqrt(p),
        "inner_linear_inner": g.standard_normal((n, p)),
        "inner_linear_outer": g.standard_normal((n, d)),
        "outer_hess_inner": rank_one_psd(m, p, 0.1, 1.0),
        "outer_hess_outer": rank_one_psd(m, d, 0.1, 1.0),
        "outer_cross": l_cross * g.standard_normal((m, d, p)) / np.sqrt(p),
        "outer_linear_inner": g.standard_normal((m, p)),
        "outer_linear_outer": g.standard_normal((m, d)),
    }


def build(seed: int, *, n_samples=1024, n_samples_outer=1024, dim_inner=10, dim_outer=10,
          mu_inner=0.1, l_cross=0.1, lam0=-2.0, data=None) -> ProblemData:
    if data is not None:
        found = _read(str(data))
        source = str(data)
    else:
        found = _generate(seed, check_positive_int("n_samples", n_samples),
                          check_positive_int("n_samples_outer", n_samples_outer),
                          check_positive_int("dim_inner", dim_inner),
                          check_positive_int("dim_outer", dim_outer),
                          check_positive("mu_inner", mu_inner), float(l_cross))
        source = "synthetic"
    arrays = {k: np.asarray(found[k], dtype=np.float64) for k in REQUIRED}
    n, p = arrays["inner_linear_inner"].shape
    m, d = arrays["outer_linear_outer"].shape
    shapes = {"inner_hess_inner": (n, p, p), "inner_hess_outer": (n, d, d),
              "inner_cross": (n, d, p), "inner_linear_outer": (n, d),
              "outer_hess_inner": (m, p, p), "outer_hess_outer": (m, d, d),
              "outer_cross": (m, d, p), "outer_linear_inner": (m, p)}
    for key, shape in shapes.items():
        if arrays[key].shape != shape:
            raise ValueError(f"data: array {key!r} must have shape {shape} (n={n}, m={m}, "
                             f"p={p}, d={d}); got {arrays[key].shape}")
    for key in ("inner_hess_inner", "inner_hess_outer", "outer_hess_inner", "outer_hess_outer"):
        arrays[key] = 0.5 * (arrays[key] + arrays[key].transpose(0, 2, 1))
    for key in REQUIRED:
        arrays[f"{key}_mean"] = arrays[key].mean(axis=0)
    for side in ("inner", "outer"):
        arrays[f"{side}_cross_t"] = np.ascontiguousarray(
            arrays[f"{side}_cross"].transpose(0, 2, 1))
    A = arrays["inner_hess_inner_mean"]
    eig = np.linalg.eigvalsh(A)  # symmetric: stored so (module docstring)
    if not eig[0] > 0:
        raise ValueError(f"data: the mean inner Hessian must be positive definite "
                         f"(min eigenvalue {eig[0]:.3g}); the inner problem has no unique "
                         f"solution")
    if data is not None and "outer_var0" in found:
        lam0_arr = np.asarray(found["outer_var0"], dtype=np.float64).reshape(d)
    else:
        lam0_arr = np.broadcast_to(np.asarray(lam0, dtype=np.float64), (d,)).copy()
    info = {"n_train": n, "n_val": m, "n_test": 0, "dim_inner": p, "dim_outer": d, "source": source,
            "mu_inner": float(eig[0]), "L_inner": float(eig[-1])}
    if data is not None and "inner_var0" in found:
        info["w_init"] = np.asarray(found["inner_var0"], dtype=np.float64).reshape(p)
    return ProblemData(arrays=arrays, static={}, lam0=lam0_arr, w_shape=(p,),
                       inner_lr=1.0 / float(eig[-1]), info=info)


def _loss(w, lam, A, B, C, a, b, ops):
    """½ wᵀAw + ½ λᵀBλ + λᵀCw + aᵀw + bᵀλ for (mean) matrices."""
    return (0.5 * ops.vdot(w, A @ w) + 0.5 * ops.vdot(lam, B @ lam) + ops.vdot(lam, C @ w)
            + ops.vdot(a, w) + ops.vdot(b, lam))


def _mean_terms(arrays, side, ops, idx=None):
    # A batch of as many rows as the split is the whole split (the samplers never draw n
    # rows with replacement: a batch ≥ n is the split, in order), so it reads the stored
    # means — equal to the mean of the gathered rows up to rounding, without an O(n)
    # gather (and its O(n) scatter-add in the backward pass) per call. Shapes are static
    # in both backends, so this is a trace-time choice in JAX.
    if idx is None or idx.shape[0] == arrays[f"{side}_linear_inner"].shape[0]:
        return [arrays[f"{side}_{t}_mean"] for t in _TERMS]
    return [ops.mean(ops.take_rows(arrays[f"{side}_{t}"], idx), axis=0) for t in _TERMS]


def inner_loss(w, lam, arrays, static, ops):
    return _loss(w, lam, *_mean_terms(arrays, "inner", ops), ops)


def inner_grad(w, lam, arrays, static, ops):
    A = arrays["inner_hess_inner_mean"]
    # Ā is stored symmetric (module docstring): ∇_w of ½wᵀĀw is Āw
    return A @ w + lam @ arrays["inner_cross_mean"] \
        + arrays["inner_linear_inner_mean"]


def outer_loss(w, lam, arrays, static, ops):
    return _loss(w, lam, *_mean_terms(arrays, "outer", ops), ops)


def inner_loss_batch(w, lam, arrays, static, ops, idx):
    return _loss(w, lam, *_mean_terms(arrays, "inner", ops, idx), ops)


def outer_loss_batch(w, lam, arrays, static, ops, idx):
    return _loss(w, lam, *_mean_terms(arrays, "outer", ops, idx), ops)


def _rows_times(M, x):
    """M_i x for every row block M_i of M (b, r, c), as one (b·r, c) matrix-vector product."""
    b, r, c = M.shape
    return (M.reshape(b * r, c) @ x).reshape(b, r)


def inner_grad_rows(w, lam, v, arrays, static, ops, idx):
    A = ops.take_rows(arrays["inner_hess_inner"], idx)
    g = (_rows_times(A, w) + _rows_times(ops.take_rows(arrays["inner_cross_t"], idx), lam)
         + ops.take_rows(arrays["inner_linear_inner"], idx))
    return g, _rows_times(A, v), _rows_times(ops.take_rows(arrays["inner_cross"], idx), v)


def outer_grad_rows(w, lam, arrays, static, ops, idx):
    K = ops.take_rows(arrays["outer_cross"], idx)
    gw = (_rows_times(ops.take_rows(arrays["outer_hess_inner"], idx), w)
          + _rows_times(ops.take_rows(arrays["outer_cross_t"], idx), lam)
          + ops.take_rows(arrays["outer_linear_inner"], idx))
    gl = (_rows_times(ops.take_rows(arrays["outer_hess_outer"], idx), lam) + _rows_times(K, w)
          + ops.take_rows(arrays["outer_linear_outer"], idx))
    return gw, gl


def inner_hessian(w, lam, arrays, static):
    return np.array(arrays["inner_hess_inner_mean"])  # a copy: symmetric as stored


def exact_inner_solution(lam, arrays, static):
    A, C, a = (arrays["inner_hess_inner_mean"], arrays["inner_cross_mean"],
               arrays["inner_linear_inner_mean"])
    return -np.linalg.solve(A, C.T @ lam + a)


def exact_hypergradient(lam, arrays, static):
    A, C = arrays["inner_hess_inner_mean"], arrays["inner_cross_mean"]
    F, H, K, f, h = (arrays[f"outer_{t}_mean"] for t in _TERMS)
    w = exact_inner_solution(lam, arrays, static)
    # ∇_w L_out and ∇_λ L_out at (w*, λ) for the symmetrized quadratic forms
    grad_w = F @ w + K.T @ lam + f
    grad_lam = H @ lam + K @ w + h
    # Jᵀ grad_w with J = −Ā⁻¹C̄ᵀ (Ā symmetric)
    return grad_lam - C @ np.linalg.solve(A, grad_w)


def metrics(w, lam, arrays, static):
    return {"test_loss": None, "test_accuracy": None}
