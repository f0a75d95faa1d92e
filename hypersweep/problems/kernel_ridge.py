"""Kernel ridge regression with an RBF kernel; the inner variable is the dual vector α.

Parametrization: λ = [log γ, log μ] (bandwidth γ, penalty μ), K = exp(−γ·D) with
D = sqdist(X_train, X_train), K_val = exp(−γ·D_val), D_val = sqdist(X_val, X_train).

    L_in(α, λ)  = ½ αᵀ(K + μI)α − αᵀy
    L_out(α, λ) = mean_i ((K_val α)_i − y_val,i)²

L_out depends on λ directly (through K_val), so ∇F has an explicit term. With
A = K + μI, α* = A⁻¹y, r = K_val α* − y_val, g = (2/m) K_valᵀ r, v = A⁻¹g:

    ∂F/∂log γ = (2/m) rᵀ(−γ D_val ⊙ K_val) α* − vᵀ(−γ D ⊙ K) α*
    ∂F/∂log μ = −μ vᵀα*

(closed form; two n×n solves, O(n³) per call). The squared distances are computed once
in float64 numpy and stored in ``arrays`` (``D_train``, ``D_val``, ``D_test``), so every
backend and dtype uses the same distances and a loss evaluation costs O(n²), not O(n²d).

∇²_α L_in = K + μI does not depend on α; η (``inner_lr``) = 1/(λ_max(K₀) + μ₀), its exact
largest eigenvalue at λ₀, so q = 1 − 1/cond(K₀ + μ₀I).

Synthetic default: x ~ N(0, I_d) (d = ``n_features`` = 10), y = sin(2 xᵀa) + 0.1·ε with
a ~ N(0, I/d); 100 train / 100 val / 100 test. At λ₀ = (−2, −1) (γ ≈ 0.135, μ ≈ 0.37)
cond(K + μI) ≈ 35 (seeds 0-3: 33-37), so q ≈ 0.97: moderate, reachable in a few hundred
inner steps (smaller γ or μ worsen it: (−3, −2) gives cond ≈ 300).
``data="file.npz|.parquet"``: real-valued targets, used as given.
"""
from __future__ import annotations

import numpy as np

from hypersweep.problems import numpy_ops
from hypersweep.problems.base import ProblemData
from hypersweep.problems.data import load_user_data, rng
from hypersweep.problems.helpers import check_positive_int

#: the optional functions this module defines (see hypersweep.problems.base)
HOOKS = frozenset({"inner_grad", "lipschitz"})

TARGET_NOISE = 0.1


def build(seed: int, *, n_train=100, n_val=100, n_test=100, n_features=10,
          lam0=(-2.0, -1.0), data=None) -> ProblemData:
    if data is not None:
        raw = load_user_data(data)
        source = str(data)
    else:
        n_train = check_positive_int("n_train", n_train)
        n_val = check_positive_int("n_val", n_val)
        n_test = check_positive_int("n_test", n_test, minimum=0)
        d = check_positive_int("n_features", n_features)
        g = rng(seed, "kernel_ridge")
        direction = g.standard_normal(d) / np.sqrt(d)
        raw = {}
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            if n == 0:
                continue
            X = g.standard_normal((n, d))
            raw[f"X_{split}"] = X
            raw[f"y_{split}"] = np.sin(2.0 * X @ direction) + TARGET_NOISE * g.standard_normal(n)
        source = "synthetic"
    lam0_arr = np.asarray(lam0, dtype=np.float64)
    if lam0_arr.shape != (2,) or not np.all(np.isfinite(lam0_arr)):
        raise ValueError(f"lam0 must be 2 finite numbers [log gamma, log mu]; got {lam0!r}")
    X_train = raw["X_train"]
    arrays = {"y_train": raw["y_train"].astype(np.float64),
              "D_train": numpy_ops.sqdist(X_train, X_train)}
    for split in ("val", "test"):
        if f"X_{split}" in raw:
            arrays[f"y_{split}"] = raw[f"y_{split}"].astype(np.float64)
            arrays[f"D_{split}"] = numpy_ops.sqdist(raw[f"X_{split}"], X_train)
    n = X_train.shape[0]
    gamma, mu = np.exp(lam0_arr)
    largest = np.linalg.eigvalsh(np.exp(-gamma * arrays["D_train"]))[-1] + mu
    return ProblemData(arrays=arrays, static={}, lam0=lam0_arr, w_shape=(n,),
                       inner_lr=1.0 / largest,
                       info={"source": source, "n_train": n, "n_features": X_train.shape[1]})


def _kernel(D, lam, ops):
    return ops.exp(-ops.exp(lam[0]) * D)


def inner_loss(w, lam, arrays, static, ops):
    K = _kernel(arrays["D_train"], lam, ops)
    return 0.5 * ops.vdot(w, K @ w) + 0.5 * ops.exp(lam[1]) * ops.vdot(w, w) \
        - ops.vdot(w, arrays["y_train"])


def inner_grad(w, lam, arrays, static, ops):
    return _kernel(arrays["D_train"], lam, ops) @ w + ops.exp(lam[1]) * w - arrays["y_train"]


def outer_loss(w, lam, arrays, static, ops):
    r = _kernel(arrays["D_val"], lam, ops) @ w - arrays["y_val"]
    return ops.mean(r * r)


def inner_hessian(w, lam, arrays, static):
    K = np.exp(-np.exp(lam[0]) * arrays["D_train"])
    return K + np.exp(lam[1]) * np.eye(K.shape[0])


def exact_inner_solution(lam, arrays, static):
    return np.linalg.solve(inner_hessian(None, lam, arrays, static), arrays["y_train"])


def exact_hypergradient(lam, arrays, static):
    gamma, mu = np.exp(lam)
    D, D_val = arrays["D_train"], arrays["D_val"]
    K, K_val = np.exp(-gamma * D), np.exp(-gamma * D_val)
    A = K + mu * np.eye(K.shape[0])
    alpha = np.linalg.solve(A, arrays["y_train"])
    r = K_val @ alpha - arrays["y_val"]
    m = D_val.shape[0]
    adjoint = np.linalg.solve(A, (2.0 / m) * K_val.T @ r)
    d_log_gamma = ((2.0 / m) * r @ ((-gamma * D_val * K_val) @ alpha)
                   - adjoint @ ((-gamma * D * K) @ alpha))
    d_log_mu = -mu * adjoint @ alpha
    return np.array([d_log_gamma, d_log_mu])


def metrics(w, lam, arrays, static):
    if "D_test" not in arrays:
        return {"test_loss": None, "test_accuracy": None}
    r = np.exp(-np.exp(lam[0]) * arrays["D_test"]) @ w - arrays["y_test"]
    return {"test_loss": float(np.mean(r * r)), "test_accuracy": None}


def lipschitz(lam, arrays, static, cache):
    """L(λ) = λ_max(K(γ)) + μ, the exact largest eigenvalue of ∇²_α L_in = K + μI."""
    gamma, mu = np.exp(np.asarray(lam, dtype=np.float64))
    return float(np.linalg.eigvalsh(np.exp(-gamma * arrays["D_train"]))[-1] + mu)
