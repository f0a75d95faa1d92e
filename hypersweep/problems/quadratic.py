"""Strongly convex quadratic bilevel problem with a set condition number.

Parametrization: λ ∈ R^p (p = ``dim_outer``) enters the inner linear term, no transform.

    L_in(w, λ)  = ½ wᵀAw − wᵀ(Bλ + c)
    L_out(w, λ) = ½ ‖w − w_target‖² + (ρ/2)‖λ‖²

A = Q diag(a) Qᵀ with Q a random orthogonal basis and eigenvalues a log-spaced in
[mu, mu·cond]; B ~ N(0, 1/p) of shape (dim_inner, p); c, w_target ~ N(0, I). ρ (``rho``)
is small but non-zero so that ∇_λ L_out ≠ 0 (estimators must add the explicit term).

Closed form: w* = A⁻¹(Bλ + c), ∇F(λ) = BᵀA⁻¹(w* − w_target) + ρλ (two solves, O(n³)).

η (``inner_lr``) = 1/(mu·cond) = 1/λ_max(A), so Φ(w) = w − η∇_w L_in has contraction factor
exactly q = max_i |1 − η a_i| = 1 − 1/cond (attained on the eigenvector with a_i = mu), for
every λ. λ₀ = 0. The instance is synthetic: ``data=`` is not accepted.
"""
from __future__ import annotations

import numpy as np

from hypersweep.problems.base import ProblemData
from hypersweep.problems.data import rng
from hypersweep.problems.helpers import check_positive, check_positive_int

#: the optional functions this module defines (see hypersweep.problems.base)
HOOKS = frozenset({"inner_grad"})


def build(seed: int, *, dim_inner=20, dim_outer=5, cond=10.0, mu=1.0, rho=0.01,
          data=None) -> ProblemData:
    if data is not None:
        raise ValueError(f"problem 'quadratic' has no data set, so data must be None; got "
                         f"{data!r} (its instance is set by dim_inner, dim_outer, cond, mu, rho)")
    n = check_positive_int("dim_inner", dim_inner)
    p = check_positive_int("dim_outer", dim_outer)
    mu = check_positive("mu", mu)
    cond = check_positive("cond", cond)
    if cond < 1.0:
        raise ValueError(f"cond must be >= 1; got {cond!r}")
    rho = float(rho)
    if not (np.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho must be a finite number >= 0; got {rho!r}")
    g = rng(seed, "quadratic")
    basis, _ = np.linalg.qr(g.standard_normal((n, n)))
    eigenvalues = mu * np.logspace(0.0, np.log10(cond), n)
    A = (basis * eigenvalues) @ basis.T
    arrays = {"A": 0.5 * (A + A.T), "B": g.standard_normal((n, p)) / np.sqrt(p),
              "c": g.standard_normal(n), "w_target": g.standard_normal(n)}
    return ProblemData(arrays=arrays, static={"rho": rho}, lam0=np.zeros(p), w_shape=(n,),
                       inner_lr=1.0 / (mu * cond),
                       info={"source": "synthetic", "cond": cond, "mu": mu})


def inner_loss(w, lam, arrays, static, ops):
    return 0.5 * ops.vdot(w, arrays["A"] @ w) - ops.vdot(w, arrays["B"] @ lam + arrays["c"])


def inner_grad(w, lam, arrays, static, ops):
    return arrays["A"] @ w - (arrays["B"] @ lam + arrays["c"])


def outer_loss(w, lam, arrays, static, ops):
    diff = w - arrays["w_target"]
    return 0.5 * ops.vdot(diff, diff) + 0.5 * static["rho"] * ops.vdot(lam, lam)


def inner_hessian(w, lam, arrays, static):
    return np.array(arrays["A"], dtype=np.float64, copy=True)


def exact_inner_solution(lam, arrays, static):
    return np.linalg.solve(arrays["A"], arrays["B"] @ lam + arrays["c"])


def exact_hypergradient(lam, arrays, static):
    w = exact_inner_solution(lam, arrays, static)
    return arrays["B"].T @ np.linalg.solve(arrays["A"], w - arrays["w_target"]) \
        + static["rho"] * lam


def metrics(w, lam, arrays, static):
    return {"test_loss": None, "test_accuracy": None}
