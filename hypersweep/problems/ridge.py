"""Ridge regression (the tutorial hypersweep grew from).

Parametrization: h = log λ, with λ = exp(h) either scalar (``lam`` of shape (1,)) or one
per feature (``per_feature=True``, shape (d,)).

    L_in(w, h)  = mean_i (x_iᵀw − y_i)² + ½ Σ_j exp(h_j) w_j²
    L_out(w, h) = mean_i (x_iᵀw − y_i)²  over the validation set

Closed forms: H = (2/n) XᵀX + diag(exp(h)), w* = H⁻¹ (2/n) Xᵀy and
∇F(h) = −exp(h) ⊙ w* ⊙ H⁻¹ ∇_w L_out(w*)   (summed over features when λ is scalar).

Synthetic default (the tutorial's): d = 25, 100 train, 50 validation, true weights
N(0, 1/d), Gaussian features, train noise std 2, validation noise std 0.3.
"""
from __future__ import annotations

import numpy as np

from hypersweep.problems.base import ProblemData
from hypersweep.problems.data import load_user_data, rng

#: the optional functions this module defines (see hypersweep.problems.base)
HOOKS = frozenset({"inner_grad", "inner_loss_batch", "outer_loss_batch", "lipschitz"})


def build(seed: int, *, n_features=25, n_train=100, n_val=50, n_test=0, train_noise=2.0,
          val_noise=0.3, per_feature=False, lam0=0.0, data=None) -> ProblemData:
    if data is not None:
        arrays = load_user_data(data)
        arrays = {k: (v.astype(np.float64) if k.startswith("y") else v)
                  for k, v in arrays.items()}
    else:
        for key, val in (("n_features", n_features), ("n_train", n_train), ("n_val", n_val)):
            if int(val) < 1:
                raise ValueError(f"{key} must be >= 1; got {val!r}")
        g = rng(seed, "ridge")
        d = int(n_features)
        w_true = g.standard_normal(d) / np.sqrt(d)
        arrays = {}
        for split, n, noise in (("train", n_train, train_noise), ("val", n_val, val_noise),
                                ("test", n_test, val_noise)):
            if int(n) == 0:
                continue
            X = g.standard_normal((int(n), d))
            arrays[f"X_{split}"] = X
            arrays[f"y_{split}"] = X @ w_true + noise * g.standard_normal(int(n))
    d = arrays["X_train"].shape[1]
    lam_shape = (d,) if per_feature else (1,)
    lam0_arr = np.broadcast_to(np.asarray(lam0, dtype=np.float64), lam_shape).copy()
    n = arrays["X_train"].shape[0]
    # η = 1/L with L = λ_max((2/n)XᵀX) + max λ₀: Φ is a contraction at λ₀.
    L = 2.0 * np.linalg.eigvalsh(arrays["X_train"].T @ arrays["X_train"] / n)[-1]
    L += float(np.exp(lam0_arr).max())
    return ProblemData(arrays=arrays, static={}, lam0=lam0_arr, w_shape=(d,),
                       inner_lr=1.0 / L, info={"n_train": n, "n_features": d})


def inner_loss(w, lam, arrays, static, ops):
    r = arrays["X_train"] @ w - arrays["y_train"]
    return ops.mean(r * r) + 0.5 * ops.sum(ops.exp(lam) * w * w)


def inner_grad(w, lam, arrays, static, ops):
    X = arrays["X_train"]
    # (r @ X), not X.T @ r: no transpose of X inside compiled loops (5x faster in XLA).
    return (2.0 / X.shape[0]) * ((X @ w - arrays["y_train"]) @ X) + ops.exp(lam) * w


def outer_loss(w, lam, arrays, static, ops):
    r = arrays["X_val"] @ w - arrays["y_val"]
    return ops.mean(r * r)


def inner_loss_batch(w, lam, arrays, static, ops, idx):
    r = ops.take_rows(arrays["X_train"], idx) @ w - ops.take_rows(arrays["y_train"], idx)
    return ops.mean(r * r) + 0.5 * ops.sum(ops.exp(lam) * w * w)


def outer_loss_batch(w, lam, arrays, static, ops, idx):
    r = ops.take_rows(arrays["X_val"], idx) @ w - ops.take_rows(arrays["y_val"], idx)
    return ops.mean(r * r)


def inner_hessian(w, lam, arrays, static):
    X = arrays["X_train"]
    return (2.0 / X.shape[0]) * X.T @ X + np.diag(np.broadcast_to(np.exp(lam), w.shape))


def exact_inner_solution(lam, arrays, static):
    X, y = arrays["X_train"], arrays["y_train"]
    H = inner_hessian(np.zeros(X.shape[1]), lam, arrays, static)
    return np.linalg.solve(H, (2.0 / X.shape[0]) * X.T @ y)


def exact_hypergradient(lam, arrays, static):
    w = exact_inner_solution(lam, arrays, static)
    Xv, yv = arrays["X_val"], arrays["y_val"]
    g_out = (2.0 / Xv.shape[0]) * Xv.T @ (Xv @ w - yv)
    v = np.linalg.solve(inner_hessian(w, lam, arrays, static), g_out)
    per_feature = -np.exp(lam) * w * v
    return per_feature if lam.shape == w.shape else np.array([per_feature.sum()])


def metrics(w, lam, arrays, static):
    if "X_test" not in arrays:
        return {"test_loss": None, "test_accuracy": None}
    r = arrays["X_test"] @ w - arrays["y_test"]
    return {"test_loss": float(np.mean(r * r)), "test_accuracy": None}


def lipschitz(lam, arrays, static, cache):
    """L(λ) = λ_max((2/n)XᵀX) + max exp(h) ≥ λ_max(∇²_w L_in): η ≤ 1/L(λ) keeps Φ contracting."""
    if "data" not in cache:
        X = arrays["X_train"]
        cache["data"] = 2.0 * np.linalg.eigvalsh(X.T @ X / X.shape[0])[-1]
    return cache["data"] + float(np.exp(lam).max())
