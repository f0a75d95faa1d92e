"""ℓ2-regularized binary logistic regression with one penalty per feature, or one shared.

Parametrization: h = log λ ∈ R^d, penalty ½ Σ_j exp(h_j) w_j²; labels y ∈ {−1, +1}. With
``penalty="shared"``, h ∈ R^1 and the penalty is ½ exp(h) ‖w‖² (every formula below with
h_j = h, and ∇F(h) the sum over j of the per-feature expression).

Which to study: per-feature penalties often have no finite minimizer: a feature the
validation split does not reward has F decreasing as its h_j → −∞ (or +∞) without end,
so ‖∇F‖ only decays like 1/k under gradient descent (the small synthetic instances reach
‖∇F‖/‖∇F₀‖ ≈ 1.5e-3 in 5,000 exact steps). A shared penalty on noisy labels usually has an
interior optimum (20 train / 40 val rows, 10 features, seed 0: h* = −3.32, F''(h*) = 0.035;
tests/test_solvers_logreg.py), which is what a convergence test to a stationary point needs.

    L_in(w, h)  = mean_i softplus(−y_i x_iᵀw) + ½ Σ_j exp(h_j) w_j²
    L_out(w, h) = mean_i softplus(−y_i x_iᵀw)      over the validation set

With σ the logistic function and z_i = y_i x_iᵀw:
∇_w L_in = −(1/n) Xᵀ(y ⊙ σ(−z)) + exp(h) ⊙ w,
∇²_w L_in = (1/n) Xᵀ diag(σ(z)σ(−z)) X + diag(exp(h)),
∇F(h) = −exp(h) ⊙ w* ⊙ v  with  v = (∇²_w L_in)⁻¹ ∇_w L_out(w*)  (L_out does not depend
on h). Oracle: Newton in float64 to ‖∇_w L_in‖ ≤ 1e-12, then one direct solve; each call
costs O(n d² + d³) per Newton step (about ten steps).

η (``inner_lr``) = 1/L with L = ¼ λ_max(XᵀX/n) + max_j exp(h₀_j) ≥ λ_max(∇²_w L_in) for
every w, so Φ is a contraction at λ₀ with q = 1 − η min eig(∇²_w L_in(w*)) ≤ 1 − η e^{min h₀}.

Datasets (``dataset=``):

* ``"synthetic"``: x ~ N(0, diag(s²)) with s_j log-spaced from 1 to 10^-1.5 (the
  data part of the Hessian has condition number ~10³), labels sign(xᵀw_true) with
  w_true ~ N(0, I) and 5% of the labels flipped; ``n_features`` features.
* ``"breast_cancer"``: sklearn's bundled set (569 × 30, standardized by the training
  split); ``n_features`` is ignored (the set has 30).
* ``"twenty_newsgroups"``: sklearn's ``fetch_20newsgroups_vectorized`` (subset "all";
  never downloaded: it must already be in sklearn's data home), the ``n_features``
  columns with the most non-zeros kept dense and standardized; label +1 for the
  technical groups (``comp.*``, ``sci.*``), −1 for the others.
* ``data="file.npz|.parquet"``: any two-class labels (the smaller maps to −1), used as is.
"""
from __future__ import annotations

import numpy as np

from hypersweep.problems.base import ProblemData
from hypersweep.problems.data import load_user_data, rng, split_arrays, standardize
from hypersweep.problems.helpers import (broadcast_lam0, check_positive_int,
                                         newton_minimize)
from hypersweep.registry import check_choice

#: the optional functions this module defines (see hypersweep.problems.base)
HOOKS = frozenset({"inner_grad", "inner_loss_batch", "outer_loss_batch", "lipschitz"})

DATASETS = ("synthetic", "breast_cancer", "twenty_newsgroups")
PENALTIES = ("per_feature", "shared")
#: the params with a fixed set of values (checked at ``plan``, before any cell runs)
CHOICES = {"dataset": DATASETS, "penalty": PENALTIES}
LABEL_NOISE = 0.05  # fraction of flipped synthetic labels


def _synthetic(seed, n_train, n_val, n_test, n_features):
    g = rng(seed, "logreg", "synthetic")
    scales = np.logspace(0.0, -1.5, n_features)
    w_true = g.standard_normal(n_features)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        if n == 0:
            continue
        X = g.standard_normal((n, n_features)) * scales
        y = np.where(X @ w_true >= 0, 1.0, -1.0)
        y[g.random(n) < LABEL_NOISE] *= -1.0
        arrays[f"X_{split}"], arrays[f"y_{split}"] = X, y
    return arrays


def _breast_cancer(seed, n_train, n_val, n_test):
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    arrays = split_arrays(X, 2.0 * y - 1.0, n_train, n_val, n_test,
                          rng(seed, "logreg", "breast_cancer"), source="breast_cancer")
    return standardize(arrays)


def _twenty_newsgroups(seed, n_train, n_val, n_test, n_features):
    from sklearn.datasets import fetch_20newsgroups_vectorized

    try:
        bunch = fetch_20newsgroups_vectorized(subset="all", download_if_missing=False)
    except OSError as err:
        raise ValueError(
            "dataset 'twenty_newsgroups' is not available locally (hypersweep never "
            "downloads it): run sklearn.datasets.fetch_20newsgroups_vectorized(subset='all') "
            "once on a machine with internet access, or pass data='file.npz|.parquet'. "
            f"Valid choices for dataset: {', '.join(DATASETS)} ({err})") from None
    X = bunch.data.tocsc()
    if n_features > X.shape[1]:
        raise ValueError(f"n_features={n_features} exceeds the {X.shape[1]} features of "
                         "twenty_newsgroups")
    nnz_per_column = np.diff(X.indptr)
    keep = np.sort(np.argsort(-nnz_per_column, kind="stable")[:n_features])
    technical = np.array([name.startswith(("comp.", "sci.")) for name in bunch.target_names])
    y = np.where(technical[bunch.target], 1.0, -1.0)
    arrays = split_arrays(X[:, keep].toarray(), y, n_train, n_val, n_test,
                          rng(seed, "logreg", "twenty_newsgroups"),
                          source="twenty_newsgroups")
    return standardize(arrays)


def _user_labels(arrays, source):
    classes = np.unique(arrays["y_train"])
    if len(classes) != 2:
        raise ValueError(f"{source}: logreg needs exactly 2 classes in y_train; got "
                         f"{len(classes)} ({classes[:5].tolist()})")
    out = dict(arrays)
    for key in ("y_train", "y_val", "y_test"):
        if key in out:
            unknown = np.setdiff1d(out[key], classes)
            if unknown.size:
                raise ValueError(f"{source}: {key} has labels {unknown[:5].tolist()} not in "
                                 f"y_train's classes {classes.tolist()}")
            out[key] = np.where(out[key] == classes[1], 1.0, -1.0)
    return out


def build(seed: int, *, dataset="synthetic", n_train=200, n_val=150, n_test=150,
          n_features=20, lam0=-2.0, penalty="per_feature", data=None) -> ProblemData:
    check_choice("penalty", penalty, PENALTIES)
    if data is not None:
        arrays = _user_labels(load_user_data(data), source=str(data))
        source = str(data)
    else:
        check_choice("dataset", dataset, DATASETS)
        n_train = check_positive_int("n_train", n_train)
        n_val = check_positive_int("n_val", n_val)
        n_test = check_positive_int("n_test", n_test, minimum=0)
        n_features = check_positive_int("n_features", n_features)
        if dataset == "synthetic":
            arrays = _synthetic(seed, n_train, n_val, n_test, n_features)
        elif dataset == "breast_cancer":
            arrays = _breast_cancer(seed, n_train, n_val, n_test)
        else:
            arrays = _twenty_newsgroups(seed, n_train, n_val, n_test, n_features)
        source = dataset
    n, d = arrays["X_train"].shape
    lam0_arr = (broadcast_lam0(lam0, (d,), what="log penalty per feature")
                if penalty == "per_feature" else
                broadcast_lam0(lam0, (1,), what="one shared log penalty"))
    X = arrays["X_train"]
    lipschitz = 0.25 * np.linalg.eigvalsh(X.T @ X / n)[-1] + float(np.exp(lam0_arr).max())
    return ProblemData(arrays=arrays, static={}, lam0=lam0_arr, w_shape=(d,),
                       inner_lr=1.0 / lipschitz,
                       info={"source": source, "n_train": n, "n_features": d, "n_classes": 2,
                             "penalty": penalty})


def _mean_logistic(X, y, w, ops):
    return ops.mean(ops.softplus(-y * (X @ w)))


def inner_loss(w, lam, arrays, static, ops):
    return (_mean_logistic(arrays["X_train"], arrays["y_train"], w, ops)
            + 0.5 * ops.sum(ops.exp(lam) * w * w))


def inner_grad(w, lam, arrays, static, ops):
    X, y = arrays["X_train"], arrays["y_train"]
    # (r @ X), not X.T @ r: no transpose of X inside compiled loops (5x faster in XLA).
    return -((y * ops.sigmoid(-y * (X @ w))) @ X) / X.shape[0] + ops.exp(lam) * w


def outer_loss(w, lam, arrays, static, ops):
    return _mean_logistic(arrays["X_val"], arrays["y_val"], w, ops)


def inner_loss_batch(w, lam, arrays, static, ops, idx):
    X, y = ops.take_rows(arrays["X_train"], idx), ops.take_rows(arrays["y_train"], idx)
    return _mean_logistic(X, y, w, ops) + 0.5 * ops.sum(ops.exp(lam) * w * w)


def outer_loss_batch(w, lam, arrays, static, ops, idx):
    X, y = ops.take_rows(arrays["X_val"], idx), ops.take_rows(arrays["y_val"], idx)
    return _mean_logistic(X, y, w, ops)


def inner_hessian(w, lam, arrays, static):
    from scipy.special import expit

    X, y = arrays["X_train"], arrays["y_train"]
    z = y * (X @ w)
    curvature = expit(z) * expit(-z)
    return ((X.T * curvature) @ X / X.shape[0]
            + np.diag(np.broadcast_to(np.exp(lam), (X.shape[1],))))


def exact_inner_solution(lam, arrays, static):
    from hypersweep.problems import numpy_ops

    return newton_minimize(
        lambda w: inner_loss(w, lam, arrays, static, numpy_ops),
        lambda w: inner_grad(w, lam, arrays, static, numpy_ops),
        lambda w: inner_hessian(w, lam, arrays, static),
        np.zeros(arrays["X_train"].shape[1]), what="logreg inner problem")


def exact_hypergradient(lam, arrays, static):
    from scipy.special import expit

    w = exact_inner_solution(lam, arrays, static)
    Xv, yv = arrays["X_val"], arrays["y_val"]
    grad_out = -(Xv.T @ (yv * expit(-yv * (Xv @ w)))) / Xv.shape[0]
    adjoint = np.linalg.solve(inner_hessian(w, lam, arrays, static), grad_out)
    per_feature = -np.exp(lam) * w * adjoint
    return per_feature if np.shape(lam) == per_feature.shape else per_feature.sum(keepdims=True)


def metrics(w, lam, arrays, static):
    if "X_test" not in arrays:
        return {"test_loss": None, "test_accuracy": None}
    X, y = arrays["X_test"], arrays["y_test"]
    margin = X @ w
    return {"test_loss": float(np.mean(np.logaddexp(0.0, -y * margin))),
            "test_accuracy": float(np.mean(np.where(margin >= 0, 1.0, -1.0) == y))}


def lipschitz(lam, arrays, static, cache):
    """L(λ) = ¼ λ_max(XᵀX/n) + max exp(h) ≥ λ_max(∇²_w L_in(w, λ)) for every w."""
    if "data" not in cache:
        X = arrays["X_train"]
        cache["data"] = 0.25 * np.linalg.eigvalsh(X.T @ X / X.shape[0])[-1]
    return cache["data"] + float(np.exp(lam).max())
