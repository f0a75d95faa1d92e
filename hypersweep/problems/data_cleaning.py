"""Data hyper-cleaning: multinomial logistic regression with a learned weight per example.

Parametrization: λ ∈ R^n, one per training example; example i has weight σ(λ_i).
W has shape (D, C), D = d + 1: the data arrays ``X_*`` already carry a constant-1 last
column (the bias). ``Y_*`` are the one-hot labels (float), ``y_*`` the int64 labels.

    CE(z, y)    = logsumexp(z) − z_y
    L_in(W, λ)  = (1/n) Σ_i σ(λ_i)·CE(x_iᵀW, y_i) + (reg/2)‖W‖²
    L_out(W, λ) = (1/m) Σ_i CE(x^val_iᵀW, y^val_i)       (clean validation labels)

With p_i = softmax(x_iᵀW) and s = σ(λ): ∇_W L_in = (1/n) Xᵀ(s ⊙ (P − Y)) + reg·W,
∇²_W L_in = (1/n) Σ_i s_i (x_i x_iᵀ) ⊗ (diag(p_i) − p_i p_iᵀ) + reg·I (W flattened row-major,
index a·C + c), and ∇F_i = −(σ'(λ_i)/n) (x_iᵀV)(p_i − y_i) with V = (∇²_W L_in)⁻¹ ∇_W L_out
(reshaped to (D, C)). Oracle: Newton in float64 to ‖∇‖ ≤ 1e-12 then one direct solve
(a Newton step costs O(n (DC)² + (DC)³)) up to ``helpers.DENSE_NEWTON_MAX_DIM`` = 2,000
inner variables; beyond (MNIST's 785 × 10), Newton–CG and CG on Hessian-vector products
(O(n·D·C) each, the Hessian never formed) to ‖∇‖ ≤ 1e-12·max(1, ‖∇(0)‖) and a relative
residual of 1e-12.

η (``inner_lr``) = 1/L with L = ½ λ_max((1/n) Xᵀ diag(σ(λ₀)) X) + reg: the softmax Hessian
diag(p) − ppᵀ has eigenvalues ≤ ½ (Gershgorin), so L bounds ∇²_W L_in for every W. L_in is
reg-strongly convex, so q ≤ 1 − η·reg < 1; with the defaults q ≈ 0.997 (pixels that are
always 0 and the softmax shift direction are curved by reg only): many inner steps.

Default data: sklearn's bundled ``digits`` (1797 × 64, pixels scaled to [0, 1], 10 classes),
split with a seeded shuffle. ``dataset="mnist_shaped"``: the offline MNIST-shaped generator
(784 pixels in [0, 1], 10 classes; :func:`hypersweep.problems.datasets.mnist_shaped`) at
n_train/n_val/n_test, the shape of stocBiO's hyper-cleaning experiment (20,000 training
images). A fraction ``corruption`` of the *training* labels is replaced
by a different class drawn uniformly (seeded); validation and test labels stay clean.
``data="file.npz|.parquet"`` (e.g. MNIST): integer class labels, features used as given,
corrupted the same way (pass ``corruption=0`` if the file is already noisy).
``info["corrupted"]`` holds the boolean mask of corrupted training examples.
"""
from __future__ import annotations

import numpy as np

from hypersweep.problems.base import ProblemData
from hypersweep.problems.data import load_user_data, rng, split_arrays
from hypersweep.problems.helpers import (broadcast_lam0, check_positive, check_positive_int,
                                         cross_entropy, integer_labels,
                                         multinomial_dense_hessian,
                                         multinomial_exact_solution, multinomial_metrics,
                                         multinomial_val_adjoint, SolutionCache,
                                         softmax_rows)
from hypersweep.registry import check_choice

#: the optional functions this module defines (see hypersweep.problems.base)
HOOKS = frozenset({"inner_grad", "inner_loss_batch", "outer_loss_batch"})

DATASETS = ("digits", "mnist_shaped")
#: the params with a fixed set of values (checked at ``plan``, before any cell runs)
CHOICES = {"dataset": DATASETS}


def _digits(seed, n_train, n_val, n_test):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return split_arrays(X / 16.0, y, n_train, n_val, n_test,
                        rng(seed, "data_cleaning", "digits"), source="digits")


def _mnist_shaped(seed, n_train, n_val, n_test):
    from hypersweep.problems.datasets import mnist_shaped

    return mnist_shaped(seed, n=n_train, n_val=n_val, n_test=n_test)


def build(seed: int, *, dataset="digits", n_train=300, n_val=300, n_test=300,
          corruption=0.3, reg=1e-2, lam0=0.0, data=None) -> ProblemData:
    reg = check_positive("reg", reg)
    corruption = float(corruption)
    if not 0.0 <= corruption < 1.0:
        raise ValueError(f"corruption must be in [0, 1); got {corruption!r}")
    if data is not None:
        raw = load_user_data(data)
        source = str(data)
    else:
        check_choice("dataset", dataset, DATASETS)
        make = {"digits": _digits, "mnist_shaped": _mnist_shaped}[dataset]
        raw = make(seed, check_positive_int("n_train", n_train),
                   check_positive_int("n_val", n_val),
                   check_positive_int("n_test", n_test, minimum=0))
        source = dataset
    classes, labels = integer_labels(raw, source, "data_cleaning")
    n_classes = len(classes)
    y_train = labels["y_train"].copy()
    n = len(y_train)
    g = rng(seed, "data_cleaning", "corruption")
    corrupted = np.zeros(n, dtype=bool)
    corrupted[g.choice(n, size=int(round(corruption * n)), replace=False)] = True
    # A shift in 1..C-1 modulo C: always a *different* class, uniformly.
    y_train[corrupted] = (y_train[corrupted]
                          + g.integers(1, n_classes, size=int(corrupted.sum()))) % n_classes
    labels["y_train"] = y_train
    arrays = {}
    for split in ("train", "val", "test"):
        if f"X_{split}" not in raw:
            continue
        X = raw[f"X_{split}"]
        arrays[f"X_{split}"] = np.hstack([X, np.ones((X.shape[0], 1))])
        arrays[f"y_{split}"] = labels[f"y_{split}"].astype(np.int64)
        arrays[f"Y_{split}"] = np.eye(n_classes)[labels[f"y_{split}"]]
    lam0_arr = broadcast_lam0(lam0, (n,), what="one logit weight per training example")
    X = arrays["X_train"]
    weighted_cov = (X.T * _sigmoid(lam0_arr)) @ X / n
    lipschitz = 0.5 * np.linalg.eigvalsh(weighted_cov)[-1] + reg
    D = X.shape[1]
    return ProblemData(arrays=arrays, static={"reg": reg}, lam0=lam0_arr,
                       w_shape=(D, n_classes), inner_lr=1.0 / lipschitz,
                       info={"source": source, "n_train": n, "n_features": D - 1,
                             "n_classes": n_classes, "corrupted": corrupted})


def _sigmoid(x):
    from scipy.special import expit

    return expit(x)


_cross_entropy = cross_entropy


def inner_loss(w, lam, arrays, static, ops):
    ce = _cross_entropy(arrays["X_train"], arrays["Y_train"], w, ops)
    return ops.mean(ops.sigmoid(lam) * ce) + 0.5 * static["reg"] * ops.sum(w * w)


def inner_grad(w, lam, arrays, static, ops):
    X, Y = arrays["X_train"], arrays["Y_train"]
    probs = ops.exp(ops.log_softmax(X @ w, axis=1))
    weighted = ops.sigmoid(lam)[:, None] * (probs - Y)
    # einsum contracts X's first axis without materializing X.T (slow in XLA loops).
    return ops.einsum("nd,nc->dc", X, weighted) / X.shape[0] + static["reg"] * w


def outer_loss(w, lam, arrays, static, ops):
    return ops.mean(_cross_entropy(arrays["X_val"], arrays["Y_val"], w, ops))


def inner_loss_batch(w, lam, arrays, static, ops, idx):
    X, Y = ops.take_rows(arrays["X_train"], idx), ops.take_rows(arrays["Y_train"], idx)
    ce = _cross_entropy(X, Y, w, ops)
    return (ops.mean(ops.sigmoid(ops.take_rows(lam, idx)) * ce)
            + 0.5 * static["reg"] * ops.sum(w * w))


def outer_loss_batch(w, lam, arrays, static, ops, idx):
    X, Y = ops.take_rows(arrays["X_val"], idx), ops.take_rows(arrays["Y_val"], idx)
    return ops.mean(_cross_entropy(X, Y, w, ops))


def _curvature(lam, arrays, static):
    """(per-row weights σ(λ_i)/n, penalty reg): what ∇²_w L_in is made of."""
    return _sigmoid(lam) / arrays["X_train"].shape[0], static["reg"]


def inner_hessian(w, lam, arrays, static):
    return multinomial_dense_hessian(arrays["X_train"], w, *_curvature(lam, arrays, static))


#: w*(λ) of the last few λ (never warm-started: a value does not depend on what was solved
#: before)
_SOLUTIONS = SolutionCache(("X_train", "Y_train"))


def exact_inner_solution(lam, arrays, static):
    """w*(λ): dense Newton for small instances, Newton–CG beyond
    ``helpers.DENSE_NEWTON_MAX_DIM`` inner variables (MNIST's 785 × 10)."""
    return multinomial_exact_solution(_SOLUTIONS, lam, arrays, static, loss=inner_loss,
                                      grad=inner_grad, curvature=_curvature,
                                      what="data_cleaning inner problem")


def exact_hypergradient(lam, arrays, static):
    w = exact_inner_solution(lam, arrays, static)
    adjoint = multinomial_val_adjoint(lam, arrays, static, w, curvature=_curvature,
                                      what="data_cleaning")
    X, Y = arrays["X_train"], arrays["Y_train"]
    s = _sigmoid(lam)
    residual = softmax_rows(X @ w) - Y
    return -(s * (1.0 - s) / X.shape[0]) * np.sum((X @ adjoint) * residual, axis=1)


def metrics(w, lam, arrays, static):
    return multinomial_metrics(w, arrays)
