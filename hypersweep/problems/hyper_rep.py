"""Hyper-representation: a linear representation P shared by T per-task ridge heads.

Parametrization: λ = P ∈ R^{d×p}, no transform. w has shape (T, p), one head per task;
X_train (T, n, d), y_train (T, n), likewise for val (m rows per task). Z_i = X_i P.

    L_in(w, P)  = (1/T) Σ_i [ (1/n) ‖X_i P w_i − y_i‖² + (μ/2)‖w_i‖² ]
    L_out(w, P) = (1/T) Σ_i (1/m) ‖X^val_i P w_i − y^val_i‖²

Closed form per task: w_i* = A_i⁻¹ (2/n) Z_iᵀy_i with A_i = (2/n)Z_iᵀZ_i + μI. P appears
in L_out directly, so with r_i = Z_i w_i* − y_i, r^val_i = X^val_i P w_i* − y^val_i and the
adjoint v_i = A_i⁻¹ (2/m) Pᵀ X^valᵀ_i r^val_i (so that H⁻¹∇_w L_out = v, H = blkdiag(A_i)/T):

    ∇F(P) = (1/T) Σ_i [ (2/m) X^valᵀ_i r^val_i w_i*ᵀ
                        − (2/n) (X_iᵀ r_i v_iᵀ + X_iᵀ X_i P v_i w_i*ᵀ) ]

(the second line is the vjp of ∇_w L_in with v w.r.t. P). Cost: T p×p solves plus
O(T n d p) products per call.

η (``inner_lr``) = 1/L with L = max_i λ_max(A_i(P₀))/T, exact at λ₀ (the Hessian depends
on P, so at other P Φ may need a smaller step); q = 1 − min λ_min(A_i)/max λ_max(A_i).

Synthetic data: a true representation P_true ~ N(0, I/d)^{d×p}, heads w_i ~ N(0, I_p),
x ~ N(0, I_d), y = xᵀP_true w_i + 0.1·ε. λ₀ = P₀ ~ N(0, I/d), seeded (not 0: P = 0 is a
stationary point of F, a saddle). ``data="file.npz|.parquet"``: task-major rows (rows
[i·n, (i+1)·n) are task i), ``n_tasks`` tasks of equal size.
"""
from __future__ import annotations

import numpy as np

from hypersweep.problems.base import ProblemData
from hypersweep.problems.data import rng
from hypersweep.problems.helpers import (check_positive, check_positive_int, task_arrays,
                                         tasks_lipschitz)

#: the optional functions this module defines (see hypersweep.problems.base)
HOOKS = frozenset({"inner_grad", "lipschitz"})

NOISE = 0.1


def build(seed: int, *, n_tasks=10, n_features=20, n_hidden=5, n_train=20, n_val=20,
          mu=1.0, data=None) -> ProblemData:
    n_tasks = check_positive_int("n_tasks", n_tasks)
    p = check_positive_int("n_hidden", n_hidden)
    mu = check_positive("mu", mu)

    def draw(d):
        g = rng(seed, "hyper_rep")
        rep_true = g.standard_normal((d, p)) / np.sqrt(d)
        heads = g.standard_normal((n_tasks, p))
        return g, lambda X: np.einsum("tnd,dp,tp->tn", X, rep_true, heads)

    arrays, source = task_arrays(data, n_tasks=n_tasks, n_features=n_features,
                                 n_train=n_train, n_val=n_val, draw=draw, noise=NOISE)
    T, n, d = arrays["X_train"].shape
    rep0 = rng(seed, "hyper_rep", "lam0").standard_normal((d, p)) / np.sqrt(d)
    lipschitz = tasks_lipschitz(_task_matrices(rep0, arrays, mu))
    return ProblemData(arrays=arrays, static={"mu": mu}, lam0=rep0, w_shape=(T, p),
                       inner_lr=1.0 / lipschitz,
                       info={"source": source, "n_tasks": T, "n_train": n, "n_features": d,
                             "n_hidden": p})


def _residuals(X, y, w, lam, ops):
    Z = ops.einsum("tnd,dp->tnp", X, lam)
    return ops.einsum("tnp,tp->tn", Z, w) - y


def inner_loss(w, lam, arrays, static, ops):
    r = _residuals(arrays["X_train"], arrays["y_train"], w, lam, ops)
    return ops.mean(r * r) + 0.5 * static["mu"] * ops.sum(w * w) / w.shape[0]


def inner_grad(w, lam, arrays, static, ops):
    X = arrays["X_train"]
    T, n = X.shape[0], X.shape[1]
    Z = ops.einsum("tnd,dp->tnp", X, lam)
    r = ops.einsum("tnp,tp->tn", Z, w) - arrays["y_train"]
    return (2.0 / (n * T)) * ops.einsum("tnp,tn->tp", Z, r) + (static["mu"] / T) * w


def outer_loss(w, lam, arrays, static, ops):
    r = _residuals(arrays["X_val"], arrays["y_val"], w, lam, ops)
    return ops.mean(r * r)


def _task_matrices(lam, arrays, mu):
    Z = np.einsum("tnd,dp->tnp", arrays["X_train"], lam)
    n, p = Z.shape[1], Z.shape[2]
    return (2.0 / n) * np.einsum("tnp,tnq->tpq", Z, Z) + mu * np.eye(p)


def inner_hessian(w, lam, arrays, static):
    from scipy.linalg import block_diag

    blocks = _task_matrices(lam, arrays, static["mu"])
    return block_diag(*blocks) / blocks.shape[0]


def exact_inner_solution(lam, arrays, static):
    Z = np.einsum("tnd,dp->tnp", arrays["X_train"], lam)
    rhs = (2.0 / Z.shape[1]) * np.einsum("tnp,tn->tp", Z, arrays["y_train"])
    return np.linalg.solve(_task_matrices(lam, arrays, static["mu"]), rhs[..., None])[..., 0]


def exact_hypergradient(lam, arrays, static):
    X, Xv = arrays["X_train"], arrays["X_val"]
    T, n, m = X.shape[0], X.shape[1], Xv.shape[1]
    w = exact_inner_solution(lam, arrays, static)
    r = _residuals(X, arrays["y_train"], w, lam, np)
    r_val = _residuals(Xv, arrays["y_val"], w, lam, np)
    Xv_r = np.einsum("tnd,tn->td", Xv, r_val)  # X^valᵀ r^val per task
    rhs = (2.0 / m) * Xv_r @ lam  # Pᵀ X^valᵀ r^val per task, (T, p)
    v = np.linalg.solve(_task_matrices(lam, arrays, static["mu"]), rhs[..., None])[..., 0]
    X_r = np.einsum("tnd,tn->td", X, r)
    XtX_Pv = np.einsum("tnd,tn->td", X, np.einsum("tnd,td->tn", X, v @ lam.T))
    explicit = (2.0 / m) * np.einsum("td,tp->dp", Xv_r, w)
    implicit = (2.0 / n) * (np.einsum("td,tp->dp", X_r, v) + np.einsum("td,tp->dp", XtX_Pv, w))
    return (explicit - implicit) / T


def metrics(w, lam, arrays, static):
    if "X_test" not in arrays:
        return {"test_loss": None, "test_accuracy": None}
    r = _residuals(arrays["X_test"], arrays["y_test"], w, lam, np)
    return {"test_loss": float(np.mean(r * r)), "test_accuracy": None}


def lipschitz(lam, arrays, static, cache):
    """L(P) = max_i λ_max(A_i(P))/T, exact (the heads' Hessian is block diagonal)."""
    return tasks_lipschitz(_task_matrices(np.asarray(lam, dtype=np.float64), arrays,
                                          static["mu"]))
