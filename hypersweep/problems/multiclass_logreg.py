"""Multiclass logistic regression with one ℓ2 penalty per class (covtype-style).

Parametrization: h ∈ R^C, h_c = log λ_c, the penalty of class c's weight column.
W has shape (D, C), D = d + 1: the ``X_*`` arrays carry a constant-1 last column (the
bias, penalized like the rest). ``Y_*`` are one-hot labels (float), ``y_*`` int64 labels.

    CE(z, y)    = logsumexp(z) − z_y
    L_in(W, h)  = (1/n) Σ_i CE(x_iᵀW, y_i) + ½ Σ_c exp(h_c) ‖W_{:,c}‖²
    L_out(W, h) = (1/m) Σ_i CE(x^val_iᵀW, y^val_i)

With P = softmax(XW): ∇_W L_in = (1/n) Xᵀ(P − Y) + W·diag(exp(h)),
∇²_W L_in = (1/n) Σ_i (x_i x_iᵀ) ⊗ (diag(p_i) − p_i p_iᵀ) + diag(1_D ⊗ exp(h))
(W flattened row-major, index a·C + c), and ∇F_c = −exp(h_c) Σ_a W*_{a,c} V_{a,c} with
V = (∇²_W L_in)⁻¹ ∇_W L_out (reshaped to (D, C)). Oracle: Newton in float64 to
‖∇‖ ≤ 1e-12, then one direct solve (dim W = D·C: 385 for covtype's 54 features × 7);
beyond ``helpers.DENSE_NEWTON_MAX_DIM`` = 2,000 inner variables (``mnist_shaped``: 7,850),
matrix-free Newton–CG and CG instead (the Hessian never formed).

η (``inner_lr``) = 1/L with L = ½ λ_max((1/n) XᵀX) + max_c exp(h₀_c) (the softmax Hessian
has eigenvalues ≤ ½); ``lipschitz`` re-bounds it as h moves.

Data: ``dataset="covtype_shaped"`` (default; :func:`hypersweep.problems.datasets.
covtype_shaped`, 54 features, 7 classes, at ``n_train``/``n_val``/``n_test`` rows),
``"mnist_shaped"``, or ``data=`` an svmlight file / {train, val, test} files (e.g. the real
covtype from libsvm, densified: it has 54 columns) or a ``.npz``/``.parquet`` with integer
labels. Features are standardized by the training split (the constant column excepted).
"""
from __future__ import annotations

import numpy as np

from hypersweep.problems.base import ProblemData
from hypersweep.problems.data import load_user_data, standardize
from hypersweep.problems.helpers import (broadcast_lam0, check_positive_int, cross_entropy,
                                         integer_labels, multinomial_dense_hessian,
                                         multinomial_exact_solution, multinomial_metrics,
                                         multinomial_val_adjoint, SolutionCache)
from hypersweep.registry import check_choice

#: the optional functions this module defines (see hypersweep.problems.base)
HOOKS = frozenset({"inner_grad", "inner_loss_batch", "outer_loss_batch", "lipschitz"})

DATASETS = ("covtype_shaped", "mnist_shaped")
#: the params with a fixed set of values (checked at ``plan``, before any cell runs)
CHOICES = {"dataset": DATASETS}


def _generated(dataset, seed, n_train, n_val, n_test):
    from hypersweep.problems import datasets

    make = {"covtype_shaped": datasets.covtype_shaped,
            "mnist_shaped": datasets.mnist_shaped}[dataset]
    return make(seed, n=n_train, n_val=n_val, n_test=n_test)


def build(seed: int, *, dataset="covtype_shaped", n_train=1000, n_val=500, n_test=500,
          lam0=-2.0, data=None) -> ProblemData:
    if data is not None:
        raw = load_user_data(data, densify=True, labels="multiclass", seed=seed,
                             n_train=n_train, n_val=n_val, n_test=n_test)
        source = str(data)
    else:
        check_choice("dataset", dataset, DATASETS)
        raw = _generated(dataset, seed, check_positive_int("n_train", n_train),
                         check_positive_int("n_val", n_val),
                         check_positive_int("n_test", n_test, minimum=0))
        source = dataset
    raw = standardize({k: np.asarray(v, dtype=np.float64) if k.startswith("X") else v
                       for k, v in raw.items()})
    classes, labels = integer_labels(raw, source, "multiclass_logreg")
    n_classes = len(classes)
    arrays = {}
    for split in ("train", "val", "test"):
        if f"X_{split}" not in raw:
            continue
        X = raw[f"X_{split}"]
        arrays[f"X_{split}"] = np.hstack([X, np.ones((X.shape[0], 1))])
        arrays[f"y_{split}"] = labels[f"y_{split}"].astype(np.int64)
        arrays[f"Y_{split}"] = np.eye(n_classes)[labels[f"y_{split}"]]
    lam0_arr = broadcast_lam0(lam0, (n_classes,), what="one log-penalty per class")
    X = arrays["X_train"]
    n, D = X.shape
    data_curvature = 0.5 * np.linalg.eigvalsh(X.T @ X / n)[-1]
    return ProblemData(arrays=arrays, static={}, lam0=lam0_arr, w_shape=(D, n_classes),
                       inner_lr=1.0 / (data_curvature + float(np.exp(lam0_arr).max())),
                       info={"source": source, "n_train": n, "n_features": D - 1,
                             "n_classes": n_classes, "data_curvature": data_curvature})


_cross_entropy = cross_entropy


def _penalty(w, lam, ops):
    return 0.5 * ops.sum(ops.exp(lam) * ops.sum(w * w, axis=0))


def inner_loss(w, lam, arrays, static, ops):
    ce = _cross_entropy(arrays["X_train"], arrays["Y_train"], w, ops)
    return ops.mean(ce) + _penalty(w, lam, ops)


def inner_grad(w, lam, arrays, static, ops):
    X, Y = arrays["X_train"], arrays["Y_train"]
    probs = ops.exp(ops.log_softmax(X @ w, axis=1))
    # einsum contracts X's first axis without materializing X.T (slow in XLA loops).
    return ops.einsum("nd,nc->dc", X, probs - Y) / X.shape[0] + w * ops.exp(lam)


def outer_loss(w, lam, arrays, static, ops):
    return ops.mean(_cross_entropy(arrays["X_val"], arrays["Y_val"], w, ops))


def inner_loss_batch(w, lam, arrays, static, ops, idx):
    X, Y = ops.take_rows(arrays["X_train"], idx), ops.take_rows(arrays["Y_train"], idx)
    return ops.mean(_cross_entropy(X, Y, w, ops)) + _penalty(w, lam, ops)


def outer_loss_batch(w, lam, arrays, static, ops, idx):
    X, Y = ops.take_rows(arrays["X_val"], idx), ops.take_rows(arrays["Y_val"], idx)
    return ops.mean(_cross_entropy(X, Y, w, ops))


def lipschitz(lam, arrays, static, cache):
    """½ λ_max((1/n) XᵀX) + max_c exp(h_c): bounds ∇²_W L_in for every W."""
    if "data" not in cache:
        X = arrays["X_train"]
        cache["data"] = 0.5 * float(np.linalg.eigvalsh(X.T @ X / X.shape[0])[-1])
    return cache["data"] + float(np.exp(np.max(lam)))


def _curvature(lam, arrays, static):
    """(per-row weights 1/n, penalty exp(h_c) per class column): what ∇²_w L_in is made of."""
    n = arrays["X_train"].shape[0]
    return np.full(n, 1.0 / n), np.exp(lam)[None, :]


def inner_hessian(w, lam, arrays, static):
    return multinomial_dense_hessian(arrays["X_train"], w, *_curvature(lam, arrays, static))


#: w*(λ) of the last few λ (never warm-started: a value does not depend on what was solved
#: before)
_SOLUTIONS = SolutionCache(("X_train", "Y_train"))


def exact_inner_solution(lam, arrays, static):
    """w*(h): dense Newton for small instances (covtype's 55 × 7), Newton–CG beyond
    ``helpers.DENSE_NEWTON_MAX_DIM`` inner variables (MNIST's 785 × 10)."""
    return multinomial_exact_solution(_SOLUTIONS, lam, arrays, static, loss=inner_loss,
                                      grad=inner_grad, curvature=_curvature,
                                      what="multiclass_logreg inner problem")


def exact_hypergradient(lam, arrays, static):
    w = exact_inner_solution(lam, arrays, static)
    adjoint = multinomial_val_adjoint(lam, arrays, static, w, curvature=_curvature,
                                      what="multiclass_logreg")
    return -np.exp(lam) * np.sum(w * adjoint, axis=0)


def metrics(w, lam, arrays, static):
    return multinomial_metrics(w, arrays)
