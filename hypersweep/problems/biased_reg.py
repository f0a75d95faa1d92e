"""Biased regularization across T tasks: each task's ridge is pulled towards a shared λ.

Parametrization: λ ∈ R^d, the shared bias, no transform. w has shape (T, d), one row
per task; X_train (T, n, d), y_train (T, n), likewise for val (m rows per task).

    L_in(w, λ)  = (1/T) Σ_i [ (1/n) Σ_j (x_ijᵀw_i − y_ij)² + (μ/2)‖w_i − λ‖² ]
    L_out(w, λ) = (1/T) Σ_i (1/m) Σ_j (x^val_ijᵀw_i − y^val_ij)²

Scaling: tasks are averaged (1/T) so that losses do not grow with T; within a task the
data term is a mean so μ is comparable across n. The Hessian is block diagonal with
blocks A_i/T, A_i = (2/n)X_iᵀX_i + μI.

Closed form per task: w_i* = A_i⁻¹((2/n)X_iᵀy_i + μλ), and since ∂w_i*/∂λ = μA_i⁻¹,
∇F(λ) = μ Σ_i A_i⁻¹ g_i with g_i = (2/(mT)) X^valᵀ_i (X^val_i w_i* − y^val_i).
Cost: T d×d solves, O(T(n d² + d³)) per call.

η (``inner_lr``) = 1/L with L = max_i λ_max(A_i)/T (exact; the Hessian does not depend on
λ or w), so q = 1 − min_i λ_min(A_i) / max_i λ_max(A_i) < 1 for every λ.

Synthetic data: a common mean m ~ N(0, I_d), task weights w_i = m + 0.3·N(0, I_d),
x ~ N(0, I_d), y = xᵀw_i + 0.5·ε. With n_train = d = 20 each task alone is ill-posed, so
a bias near m lowers the validation error. λ₀ = 0.
``data="file.npz|.parquet"``: task-major rows (rows [i·n, (i+1)·n) are task i), with
``n_tasks`` tasks of equal size.
"""
from __future__ import annotations

import numpy as np

from hypersweep.problems.base import ProblemData
from hypersweep.problems.data import rng
from hypersweep.problems.helpers import (check_positive, check_positive_int, task_arrays,
                                         tasks_lipschitz)

#: the optional functions this module defines (see hypersweep.problems.base)
HOOKS = frozenset({"inner_grad"})

TASK_SPREAD = 0.3
NOISE = 0.5


def build(seed: int, *, n_tasks=10, n_features=20, n_train=20, n_val=20, mu=1.0,
          data=None) -> ProblemData:
    n_tasks = check_positive_int("n_tasks", n_tasks)
    mu = check_positive("mu", mu)

    def draw(d):
        g = rng(seed, "biased_reg")
        task_weights = g.standard_normal(d) + TASK_SPREAD * g.standard_normal((n_tasks, d))
        return g, lambda X: np.einsum("tnd,td->tn", X, task_weights)

    arrays, source = task_arrays(data, n_tasks=n_tasks, n_features=n_features,
                                 n_train=n_train, n_val=n_val, draw=draw, noise=NOISE)
    T, n, d = arrays["X_train"].shape
    lipschitz = tasks_lipschitz(_task_matrices(arrays, mu))
    return ProblemData(arrays=arrays, static={"mu": mu}, lam0=np.zeros(d), w_shape=(T, d),
                       inner_lr=1.0 / lipschitz,
                       info={"source": source, "n_tasks": T, "n_train": n, "n_features": d})


def _residuals(X, y, w, ops):
    return ops.einsum("tnd,td->tn", X, w) - y


def inner_loss(w, lam, arrays, static, ops):
    r = _residuals(arrays["X_train"], arrays["y_train"], w, ops)
    diff = w - lam
    return ops.mean(r * r) + 0.5 * static["mu"] * ops.sum(diff * diff) / w.shape[0]


def inner_grad(w, lam, arrays, static, ops):
    X = arrays["X_train"]
    T, n = X.shape[0], X.shape[1]
    r = _residuals(X, arrays["y_train"], w, ops)
    return (2.0 / (n * T)) * ops.einsum("tnd,tn->td", X, r) + (static["mu"] / T) * (w - lam)


def outer_loss(w, lam, arrays, static, ops):
    r = _residuals(arrays["X_val"], arrays["y_val"], w, ops)
    return ops.mean(r * r)


def _task_matrices(arrays, mu):
    X = arrays["X_train"]
    n, d = X.shape[1], X.shape[2]
    return (2.0 / n) * np.einsum("tnd,tne->tde", X, X) + mu * np.eye(d)


def inner_hessian(w, lam, arrays, static):
    from scipy.linalg import block_diag

    blocks = _task_matrices(arrays, static["mu"])
    return block_diag(*blocks) / blocks.shape[0]


def exact_inner_solution(lam, arrays, static):
    X, y, mu = arrays["X_train"], arrays["y_train"], static["mu"]
    rhs = (2.0 / X.shape[1]) * np.einsum("tnd,tn->td", X, y) + mu * lam
    return np.linalg.solve(_task_matrices(arrays, mu), rhs[..., None])[..., 0]


def exact_hypergradient(lam, arrays, static):
    w = exact_inner_solution(lam, arrays, static)
    Xv = arrays["X_val"]
    T, m = Xv.shape[0], Xv.shape[1]
    grad_out = (2.0 / (m * T)) * np.einsum("tnd,tn->td", Xv, _residuals(
        Xv, arrays["y_val"], w, np))
    solved = np.linalg.solve(_task_matrices(arrays, static["mu"]), grad_out[..., None])
    return static["mu"] * solved[..., 0].sum(axis=0)


def metrics(w, lam, arrays, static):
    if "X_test" not in arrays:
        return {"test_loss": None, "test_accuracy": None}
    r = _residuals(arrays["X_test"], arrays["y_test"], w, np)
    return {"test_loss": float(np.mean(r * r)), "test_accuracy": None}
