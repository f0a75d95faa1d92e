"""ℓ2-regularized binary logistic regression on sparse features, one penalty per feature.

The model is :mod:`hypersweep.problems.logreg`'s; only the storage of X differs. With
h = log λ ∈ R^d, labels y ∈ {−1, +1} and σ the logistic function::

    L_in(w, h)  = mean_i softplus(−y_i x_iᵀw) + ½ Σ_j exp(h_j) w_j²     (training split)
    L_out(w, h) = mean_i softplus(−y_i x_iᵀw)                            (validation split)

    ∇_w L_in  = Xᵀr + exp(h) ⊙ w,           r_i = −y_i σ(−y_i x_iᵀw) / n
    ∇²_w L_in = Xᵀ diag(c) X / n + diag(exp(h)),   c_i = σ(z_i) σ(−z_i),  z = Xw
    ∇F(h)     = −exp(h) ⊙ w* ⊙ v,           ∇²_w L_in(w*) v = ∇_w L_out(w*)

Storage (numpy, what :func:`build` returns; one group per split s ∈ train, val, test):
``X_s_data`` (nnz,) float, ``X_s_indices`` (nnz,) int64 column ids, ``X_s_indptr``
(n + 1,) int64 CSR row pointers, ``X_s_rows`` (nnz,) int64 row id of every entry (the
COO row vector, so a full-split product needs no pointer expansion inside a trace), ``y_s``
(n,) ±1. ``static``: ``n_features`` d and ``max_row_nnz_train`` / ``max_row_nnz_val``
k (the longest row of the split, ≥ 1: the width of a padded minibatch). No array is named
``X_train``/``X_val``: the stochastic solvers size their batches from ``info['n_train']``
and ``info['n_val']`` (:func:`hypersweep.algorithms.common.minibatch_sizes`).

The segment-sum formulation (written once against ``ops``; numpy, JAX and PyTorch
evaluate the same formula; no sparse matrix type enters the traced or autograd code):

* full split, ``Xw = segment_sum(data ⊙ w[indices], rows, n)`` and
  ``Xᵀr = segment_sum(data ⊙ r[rows], indices, d)``: O(nnz) each;
* minibatch rows ``idx`` (b,): ``starts = indptr[idx]``, ``lens = indptr[idx+1] − starts``,
  positions ``starts[:, None] + arange(k)``, masked where ``arange(k) ≥ lens``, gathered
  into a (b, k) block of values and column ids, and ``(Xw)_B = Σ_k vals ⊙ w[cols]``:
  O(b·k) per batch, never O(n) or O(nnz) (k = the longest row of the split).

Why not JAX ``BCOO`` or torch sparse tensors: a gather's transpose is a segment sum and a
segment sum's transpose is a gather, so reverse mode (and the forward-over-reverse or
reverse-over-reverse products the estimators take: ∇²_ww and ∇²_λw through
``inner_grad``) stays in these two primitives at every order, with the data as plain
constants. ``BCOO`` has no VJP for some sparse × sparse products, and a gradient that
reaches a ``BCOO`` constructor densifies (an n × d cotangent); torch sparse CSR lacks
double backward for several ops. ``docs/sparse.md`` says what is sparse where.

``inner_grad`` is the analytic formula above (no autodiff in the inner loop).
``lipschitz``: L(h) = ¼ λ_max(XᵀX/n) + max_j exp(h_j) ≥ λ_max(∇²_w L_in(w, h)) for every
w; λ_max by Lanczos (``scipy.sparse.linalg.eigsh``, a fixed start vector, so it is
deterministic) on sparse products, cached per problem. η (``inner_lr``) = 1/L(h₀).

Oracles (float64 numpy on scipy CSR, no d × d or n × d array): w* by Newton–CG
(Hessian-vector products Xᵀ(c ⊙ Xv)/n + exp(h) ⊙ v; Jacobi-preconditioned CG with the
forcing term min(0.1, ‖∇‖/‖∇₀‖), Armijo backtracking while the Newton decrement is
large; stop at ‖∇_w L_in‖ ≤ 1e-12 ‖∇_w L_in(0)‖), the adjoint v by the same
preconditioned CG to a true relative residual ≤ 1e-12. Newton always starts at w = 0, so
an oracle's value never depends on the λ solved before it; the last few solutions are
kept, keyed by (a blake2b digest of the training arrays, λ's bytes). ``inner_hessian``
(dense) exists for d ≤ 4000 only (it feeds the contraction factor); larger d raise a
one-line ``ValueError``.

Data (``dataset=``, or ``data=``): ``"news20_shaped"``, the offline 20-Newsgroups-shaped
generator of :mod:`hypersweep.problems.datasets` (``n_train + n_val + n_test``
documents, ``n_features`` terms, ``density``); ``data=`` an svmlight/libsvm file (split
by n_train/n_val/n_test and the seed) or ``{"train": …, "val": …, "test": …}`` files
(used as given), read by :func:`hypersweep.problems.datasets.load_svmlight_data` with
labels mapped to ±1; the files decide d (their largest column index), so ``n_features``
and ``density`` are ignored there.
"""
from __future__ import annotations

import logging

import numpy as np

from hypersweep.problems.base import ProblemData
from hypersweep.problems.helpers import (SolutionCache, broadcast_lam0, check_positive_int,
                                         pcg)
from hypersweep.registry import check_choice

logger = logging.getLogger(__name__)

#: the optional functions this module defines (see hypersweep.problems.base)
HOOKS = frozenset({"inner_grad", "inner_loss_batch", "outer_loss_batch", "lipschitz"})

DATASETS = ("news20_shaped",)
#: the params with a fixed set of values (checked at ``plan``, before any cell runs)
CHOICES = {"dataset": DATASETS}
SPLITS = ("train", "val", "test")
#: the largest d for which the dense ``inner_hessian`` is built (4000² float64 = 128 MB)
DENSE_HESSIAN_MAX_D = 4000
NEWTON_TOL = 1e-12     # ‖∇_w L_in(w)‖ ≤ NEWTON_TOL · ‖∇_w L_in(0)‖
ADJOINT_TOL = 1e-12    # ‖H v − b‖ ≤ ADJOINT_TOL · ‖b‖ (the true residual)


# -- data -------------------------------------------------------------------------------
def split_arrays(X, y, split: str) -> dict[str, np.ndarray]:
    """The five storage arrays of one split from a scipy sparse matrix ``X`` and ±1 ``y``."""
    import scipy.sparse as sp

    X = sp.csr_matrix(X, dtype=np.float64, copy=True)  # the caller's matrix stays as is
    X.sum_duplicates()  # canonical CSR: sorted column ids, no repeats
    n = X.shape[0]
    indptr = X.indptr.astype(np.int64)
    return {f"X_{split}_data": np.asarray(X.data, dtype=np.float64),
            f"X_{split}_indices": X.indices.astype(np.int64),
            f"X_{split}_indptr": indptr,
            f"X_{split}_rows": np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr)),
            f"y_{split}": np.asarray(y, dtype=np.float64).reshape(n)}


def problem_data(splits: dict, *, lam0=-2.0, source: str = "data") -> ProblemData:
    """The :class:`ProblemData` of sparse matrices ``splits = {"X_train": csr, "y_train":
    ±1, "X_val": …, "y_val": …[, "X_test": …, "y_test": …]}`` (what :func:`build` returns;
    tests call it with matrices of their own)."""
    for key in ("X_train", "y_train", "X_val", "y_val"):
        if key not in splits:
            raise ValueError(f"{source}: missing {key!r}; sparse_logreg needs X_train, "
                             f"y_train, X_val, y_val (optional: X_test, y_test)")
    d = int(splits["X_train"].shape[1])
    arrays, info = {}, {"source": source, "n_features": d, "n_classes": 2}
    for split in SPLITS:
        if split == "test" and (splits.get("X_test") is None
                                or splits["X_test"].shape[0] == 0):
            continue
        if splits[f"X_{split}"].shape[0] == 0:
            raise ValueError(f"{source}: X_{split} has no rows")
        X, y = splits[f"X_{split}"], np.asarray(splits[f"y_{split}"], dtype=np.float64)
        if X.shape[1] != d:
            raise ValueError(f"{source}: X_{split} has {X.shape[1]} features, X_train has {d}")
        if y.shape != (X.shape[0],):
            raise ValueError(f"{source}: y_{split} must have shape ({X.shape[0]},) to match "
                             f"X_{split} {X.shape}; got {y.shape}")
        if not np.all(np.isin(y, (-1.0, 1.0))):
            raise ValueError(f"{source}: y_{split} must hold labels ±1; got "
                             f"{np.unique(y)[:5].tolist()}")
        part = split_arrays(X, y, split)
        if not np.all(np.isfinite(part[f"X_{split}_data"])):
            raise ValueError(f"{source}: X_{split} contains NaN or inf")
        if part[f"X_{split}_data"].size == 0:  # a padded batch slot reads entry 0
            raise ValueError(f"{source}: X_{split} has no stored entries")
        arrays.update(part)
        info[f"n_{split}"] = int(X.shape[0])
        info[f"nnz_{split}"] = int(part[f"X_{split}_data"].size)
    static = {"n_features": d}
    for split in ("train", "val"):
        static.update(_row_stats(arrays[f"X_{split}_indptr"], split))
    info["density_train"] = info["nnz_train"] / max(1, info["n_train"] * d)
    info["data_bytes"] = int(sum(a.nbytes for a in arrays.values()))
    lam0_arr = broadcast_lam0(lam0, (d,), what="log penalty per feature")
    L = _data_curvature(arrays, static) + float(np.exp(lam0_arr).max())
    return ProblemData(arrays=arrays, static=static, lam0=lam0_arr, w_shape=(d,),
                       inner_lr=1.0 / L, info=info)


def _row_stats(indptr: np.ndarray, split: str) -> dict:
    """The split's longest row (the padded block's width) and the mean and standard
    deviation of its row lengths, rounded up to 3 significant digits (the flat block's
    budget; rounded so that nearby instances share a compiled function more often)."""
    lens = np.diff(indptr)
    return {f"max_row_nnz_{split}": _max_row_nnz(indptr),
            f"row_nnz_mean_{split}": _round_up(float(lens.mean())),
            f"row_nnz_sd_{split}": _round_up(float(lens.std()))}


def _round_up(x: float, digits: int = 3) -> float:
    if x <= 0:
        return 0.0
    scale = 10.0 ** (int(np.floor(np.log10(x))) - digits + 1)
    return float(np.ceil(x / scale) * scale)


def _max_row_nnz(indptr: np.ndarray) -> int:
    # ≥ 1 so a batch block is never (b, 0), even for a split of empty rows.
    return max(1, int(np.diff(indptr).max(initial=0)))


def build(seed: int, *, dataset="news20_shaped", n_train=2000, n_val=1000, n_test=1000,
          n_features=4000, density=5e-3, lam0=-2.0, zero_based=False,
          data=None) -> ProblemData:
    """The instance: ``data`` (svmlight file(s)) if given, else ``dataset``'s generator at
    n_train/n_val/n_test × ``n_features`` with ``density``; λ₀ = ``lam0`` per feature.
    ``zero_based``: the files' column indices start at 0 (``sklearn.datasets.
    dump_svmlight_file``'s default) instead of libsvm's 1."""
    from hypersweep.problems import datasets

    n_test = check_positive_int("n_test", n_test, minimum=0)
    if data is not None:
        splits = datasets.load_svmlight_data(data, n_train=n_train, n_val=n_val,
                                             n_test=n_test, seed=seed, labels="binary",
                                             zero_based=bool(zero_based))
        source = str(data)
    else:
        check_choice("dataset", dataset, DATASETS)
        n_train = check_positive_int("n_train", n_train)
        n_val = check_positive_int("n_val", n_val)
        n_features = check_positive_int("n_features", n_features, minimum=4)
        # the generator draws its 2 × topic_words informative words among the ranks
        # [d/100, d/2): at most half of those per class (1000, its default, from d ≈ 4100)
        topic_words = min(1000, (n_features // 2 - n_features // 100) // 2)
        splits = datasets.news20_shaped(seed, n=n_train, n_val=n_val, n_test=n_test,
                                        d=n_features, density=density,
                                        topic_words=topic_words)
        source = dataset
    return problem_data(splits, lam0=lam0, source=source)


# -- the math, once against ops ---------------------------------------------------------
def _product(w, arrays, split, ops):
    """X_s w over the whole split: one gather of w and one segment sum, O(nnz)."""
    data, y = arrays[f"X_{split}_data"], arrays[f"y_{split}"]
    return ops.segment_sum(data * ops.take_rows(w, arrays[f"X_{split}_indices"]),
                           arrays[f"X_{split}_rows"], y.shape[0])


def _batch_product(w, arrays, split, static, ops, idx):
    """(X_s w)[idx] for a minibatch of b rows, in O(min(budget, nnz)) work and memory.

    Three layouts, picked from static sizes (b, the split's nnz, its row-length mean μ,
    standard deviation σ and maximum k):

    * the flat block (:func:`_flat_product`): the batch's entries end to end in B slots,
      B = :func:`flat_budget` ≈ b·μ + 4√b·σ;
    * the whole split's product X_s w (``_product``, O(nnz)) gathered at ``idx``, when
      b·μ ≥ nnz (a batch as large as the split: full-batch oracles);
    * the padded (b, k) block (:func:`_padded_product`), when b·k is smaller than B.

    A batch with more entries than B (rows are drawn with replacement, so no bound below
    b·k is exact; rare) takes the cheaper exact layout of the other two instead, through
    ``ops.cond`` (JAX compiles both branches and allocates their buffers, hence never the
    (b, k) block when it is larger than the split). The gathers take flat 1-D indices:
    torch's 1-D ``index_select`` (and its ``index_add`` transpose) is an order of magnitude
    faster than 2-D advanced indexing.
    """
    b, k = int(idx.shape[0]), static[f"max_row_nnz_{split}"]
    nnz = int(arrays[f"X_{split}_data"].shape[0])
    if b * static[f"row_nnz_mean_{split}"] >= nnz:
        return ops.take_rows(_product(w, arrays, split, ops), idx)
    indptr = arrays[f"X_{split}_indptr"]
    starts = ops.take_rows(indptr, idx)
    lens = ops.take_rows(indptr, idx + 1) - starts
    budget = flat_budget(b, static, split)
    if budget is None:
        return _padded_product(w, arrays, split, k, ops, starts, lens)
    if b * k <= nnz:
        exact = lambda: _padded_product(w, arrays, split, k, ops, starts, lens)  # noqa: E731
    else:
        exact = lambda: ops.take_rows(_product(w, arrays, split, ops), idx)  # noqa: E731
    ends = ops.cumsum(lens)
    return ops.cond(ends[-1] <= budget,
                    lambda: _flat_product(w, arrays, split, budget, ops, starts, lens, ends),
                    exact)


def flat_budget(b: int, static, split: str) -> int | None:
    """The flat block's size for a batch of ``b`` rows of ``split``: b·μ + 4·√b·σ (μ, σ the
    mean and standard deviation of the split's row lengths) rounded up to a multiple of
    256; ``None`` where that is no smaller than the padded block b·k. A batch above it
    (rows are drawn with replacement, so no smaller bound is exact; at the 20-news shape
    about one batch of 64 in 10³) takes the padded block."""
    mu, sd = static[f"row_nnz_mean_{split}"], static[f"row_nnz_sd_{split}"]
    budget = -(-int(np.ceil(b * mu + 4.0 * np.sqrt(b) * sd)) // 256) * 256
    return None if budget >= b * static[f"max_row_nnz_{split}"] else budget


def _flat_product(w, arrays, split, budget, ops, starts, lens, ends):
    """The batch's entries end to end in ``budget`` slots. Row j's entries start at slot
    ends[j−1]; each slot's row id and data position come from two prefix sums over the
    slots of marks scattered at those starts (a row id steps by one per row start, a data
    position jumps from row j's last entry to row j+1's first), so an empty row costs no
    slot and the gathers read only the batch's entries."""
    slot = ops.arange(budget, starts)
    valid = slot < ends[-1]
    bounds = ends[:-1]  # the slot where row j + 1 begins
    row = ops.cumsum(ops.segment_sum(bounds * 0 + 1, bounds, budget + 1)[:budget])
    jumps = starts[1:] - (starts[:-1] + lens[:-1])
    pos = ops.where(valid, starts[0] + slot
                    + ops.cumsum(ops.segment_sum(jumps, bounds, budget + 1)[:budget]), 0)
    cols = ops.take_rows(arrays[f"X_{split}_indices"], pos)
    terms = ops.take_rows(arrays[f"X_{split}_data"], pos) * ops.take_rows(w, cols)
    return ops.segment_sum(ops.where(valid, terms, 0.0), ops.where(valid, row, 0),
                           lens.shape[0])


def _padded_product(w, arrays, split, k, ops, starts, lens):
    """The (b, k) block: row i's entries in slots [0, lens_i), the rest masked."""
    offsets = ops.arange(k, starts)[None, :]
    mask = offsets < lens[:, None]
    pos = ops.reshape(ops.where(mask, starts[:, None] + offsets, 0), (-1,))  # pads read 0
    cols = ops.take_rows(arrays[f"X_{split}_indices"], pos)
    terms = ops.take_rows(arrays[f"X_{split}_data"], pos) * ops.take_rows(w, cols)
    return ops.sum(ops.where(mask, ops.reshape(terms, (-1, k)), 0.0), axis=1)


def _mean_logistic(margin, y, ops):
    return ops.mean(ops.softplus(-y * margin))


def _penalty(w, lam, ops):
    return 0.5 * ops.sum(ops.exp(lam) * w * w)


def inner_loss(w, lam, arrays, static, ops):
    return (_mean_logistic(_product(w, arrays, "train", ops), arrays["y_train"], ops)
            + _penalty(w, lam, ops))


def inner_grad(w, lam, arrays, static, ops):
    y = arrays["y_train"]
    r = -(y * ops.sigmoid(-y * _product(w, arrays, "train", ops))) / y.shape[0]
    Xt_r = ops.segment_sum(arrays["X_train_data"] * ops.take_rows(r, arrays["X_train_rows"]),
                           arrays["X_train_indices"], static["n_features"])
    return Xt_r + ops.exp(lam) * w


def outer_loss(w, lam, arrays, static, ops):
    return _mean_logistic(_product(w, arrays, "val", ops), arrays["y_val"], ops)


def inner_loss_batch(w, lam, arrays, static, ops, idx):
    margin = _batch_product(w, arrays, "train", static, ops, idx)
    return (_mean_logistic(margin, ops.take_rows(arrays["y_train"], idx), ops)
            + _penalty(w, lam, ops))


def outer_loss_batch(w, lam, arrays, static, ops, idx):
    margin = _batch_product(w, arrays, "val", static, ops, idx)
    return _mean_logistic(margin, ops.take_rows(arrays["y_val"], idx), ops)


# -- float64 oracles on scipy CSR ---------------------------------------------------------
def _csr(arrays, split, static):
    import scipy.sparse as sp

    n = arrays[f"y_{split}"].shape[0]
    return sp.csr_matrix((arrays[f"X_{split}_data"], arrays[f"X_{split}_indices"],
                          arrays[f"X_{split}_indptr"]), shape=(n, static["n_features"]))


def _logistic_grad_data(X, y, w):
    """(∇_w mean softplus(−y ⊙ Xw), z = Xw)."""
    from scipy.special import expit

    z = X @ w
    return X.T @ (-(y * expit(-y * z))) / X.shape[0], z


#: w*(λ) of the last few λ, keyed by a digest of the training arrays and λ's bytes
_SOLUTIONS = SolutionCache(("X_train_data", "X_train_indices", "X_train_indptr", "y_train"),
                           size=8)


def _hessian_operator(X, w, pen):
    """(v ↦ ∇²_w L_in(w) v, diag ∇²_w L_in(w)) with X the training CSR: one product with X
    and one with Xᵀ per application; the diagonal (Jacobi preconditioner) costs one pass
    over the squared entries."""
    from scipy.special import expit

    z = X @ w
    c = expit(z) * expit(-z) / X.shape[0]
    X_sq = X.copy()
    X_sq.data = X_sq.data ** 2
    return (lambda v: X.T @ (c * (X @ v)) + pen * v), X_sq.T @ c + pen


def _newton_cg(X, y, pen, *, max_iter=100):
    """argmin_w mean softplus(−y ⊙ Xw) + ½ Σ pen ⊙ w², from w = 0, to
    ‖∇‖ ≤ NEWTON_TOL ‖∇(0)‖. Newton directions by preconditioned CG with the forcing
    term min(0.1, ‖∇‖/‖∇(0)‖) (superlinear, quadratic at the end); Armijo backtracking
    while the Newton decrement is above float64's resolution of the loss."""
    n = X.shape[0]

    def loss(w):
        return float(np.mean(np.logaddexp(0.0, -y * (X @ w))) + 0.5 * np.sum(pen * w * w))

    w = np.zeros(X.shape[1])
    g0 = float(np.linalg.norm(X.T @ (-0.5 * y) / n)) or 1.0  # ‖∇(0)‖: σ(0) = ½
    tol = NEWTON_TOL * g0
    for _ in range(max_iter):
        g = _logistic_grad_data(X, y, w)[0] + pen * w
        gnorm = float(np.linalg.norm(g))
        if gnorm <= tol:
            return w
        hvp, diag = _hessian_operator(X, w, pen)
        step, _ = pcg(hvp, g, diag, rtol=min(0.1, gnorm / g0))
        decrement = float(g @ step)
        if decrement < 1e-10:
            # Below float64's resolution of the loss Armijo cannot judge; the full Newton
            # step converges quadratically here.
            w = w - step
            continue
        f0, s = loss(w), 1.0
        while s > 1e-12 and loss(w - s * step) > f0 - 1e-4 * s * decrement:
            s *= 0.5
        w = w - s * step
    gnorm = float(np.linalg.norm(_logistic_grad_data(X, y, w)[0] + pen * w))
    if gnorm > tol:
        logger.warning("Newton-CG on the sparse_logreg inner problem stopped after %d "
                       "iterations at ‖∇‖ = %.3g > %.3g", max_iter, gnorm, tol)
    return w


def exact_inner_solution(lam, arrays, static):
    """w*(λ) by Newton–CG from w = 0 (never warm-started, so the value does not depend on
    which λ were solved before); the last few solutions are kept, keyed by the data's
    digest and λ's bytes, so F(λ) and ∇F(λ) at one λ solve once."""
    lam = np.asarray(lam, dtype=np.float64)
    return _SOLUTIONS.get(lam, arrays, static, lambda: _newton_cg(
        _csr(arrays, "train", static), arrays["y_train"], np.exp(lam)))


def exact_hypergradient(lam, arrays, static):
    lam = np.asarray(lam, dtype=np.float64)
    w = exact_inner_solution(lam, arrays, static)
    grad_out, _ = _logistic_grad_data(_csr(arrays, "val", static), arrays["y_val"], w)
    pen = np.exp(lam)
    hvp, diag = _hessian_operator(_csr(arrays, "train", static), w, pen)
    v, rel = pcg(hvp, grad_out, diag, rtol=ADJOINT_TOL)
    if rel > ADJOINT_TOL:
        logger.warning("sparse_logreg adjoint CG stopped at relative residual %.3g > %.1g",
                       rel, ADJOINT_TOL)
    return -pen * w * v


def inner_hessian(w, lam, arrays, static):
    from scipy.special import expit

    d = static["n_features"]
    if d > DENSE_HESSIAN_MAX_D:
        raise ValueError(f"sparse_logreg: the dense inner Hessian is built only for "
                         f"n_features <= {DENSE_HESSIAN_MAX_D} (this instance has {d}: a "
                         f"{d}x{d} float64 matrix); the oracles use Hessian-vector products")
    X = _csr(arrays, "train", static)
    z = X @ np.asarray(w, dtype=np.float64)
    c = expit(z) * expit(-z) / X.shape[0]
    return (X.T @ X.multiply(c[:, None]).tocsr()).toarray() + np.diag(np.exp(lam))


def metrics(w, lam, arrays, static):
    if "y_test" not in arrays:
        return {"test_loss": None, "test_accuracy": None}
    y = arrays["y_test"]
    margin = _csr(arrays, "test", static) @ np.asarray(w, dtype=np.float64)
    return {"test_loss": float(np.mean(np.logaddexp(0.0, -y * margin))),
            "test_accuracy": float(np.mean(np.where(margin >= 0, 1.0, -1.0) == y))}


def _data_curvature(arrays, static) -> float:
    """¼ λ_max(XᵀX/n) of the training split, from sparse products only.

    λ_max(XᵀX) = λ_max(XXᵀ): the Gram matrix of the smaller side. Up to 256 on that side
    it is formed densely (eigvalsh); above, Lanczos (ARPACK ``eigsh``, tol 1e-8) from the
    fixed start vector 1/√m, so the value, and η, are deterministic.
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    X = _csr(arrays, "train", static)
    n, d = X.shape
    m = min(n, d)
    if m <= 256:
        gram = (X @ X.T) if n <= d else (X.T @ X)
        top = float(np.linalg.eigvalsh(gram.toarray())[-1])
    else:
        matvec = (lambda u: X @ (X.T @ u)) if n <= d else (lambda u: X.T @ (X @ u))
        op = LinearOperator((m, m), matvec=matvec, dtype=np.float64)
        top = float(eigsh(op, k=1, which="LA", tol=1e-8, v0=np.full(m, m ** -0.5),
                          return_eigenvectors=False)[0])
    return 0.25 * max(top, 0.0) / n


def lipschitz(lam, arrays, static, cache):
    """L(λ) = ¼ λ_max(XᵀX/n) + max exp(h) ≥ λ_max(∇²_w L_in(w, λ)) for every w."""
    if "data" not in cache:
        cache["data"] = _data_curvature(arrays, static)
    return cache["data"] + float(np.exp(lam).max())
