"""Template problem: Tikhonov denoising with one smoothing weight per neighbour pair.

Copy this file to ``hypersweep/problems/<name>.py`` (or to your own package), rename, and
register one ``ProblemSpec`` for it (``docs/extending.md``). It imports numpy only: the
losses are written once against an ``ops`` namespace, so numpy (the float64 oracle), JAX
and PyTorch evaluate the same formulas.

Parametrization: h ∈ R^{d−1}, smoothing weight exp(h_j) on the difference w_{j+1} − w_j.

    L_in(w, h)  = ½‖w − y‖² + ½ Σ_j exp(h_j) (Dw)_j²     (y: a noisy signal)
    L_out(w, h) = ½‖w − y_val‖²                           (y_val: a second noisy copy)

D is the (d−1, d) first-difference matrix. Closed forms: H = I + Dᵀ diag(e^h) D,
w* = H⁻¹y and ∇F(h) = −e^h ⊙ (Dw*) ⊙ (D H⁻¹(w* − y_val)). η = 1/L with L = 1 + 4 max e^{h₀}
(‖D‖² ≤ 4), so Φ contracts with q ≤ 1 − 1/L at λ₀ (0.8 at h₀ = 0).
"""
from __future__ import annotations

import numpy as np

from hypersweep.problems.base import ProblemData
from hypersweep.problems.data import rng

#: the optional functions this module defines (see hypersweep.problems.base)
HOOKS = frozenset({"inner_grad"})


def build(seed: int, *, dim=6, noise=0.5, lam0=0.0, data=None) -> ProblemData:
    if data is not None:
        raise ValueError(f"this problem is synthetic, so data must be None; got {data!r}")
    d = int(dim)
    if d < 2:
        raise ValueError(f"dim must be an integer >= 2; got {dim!r}")
    g = rng(seed, "template_denoising")
    signal = np.cumsum(g.standard_normal(d)) / np.sqrt(d)  # a random walk: smooth-ish
    arrays = {"D": np.diff(np.eye(d), axis=0), "x_true": signal,
              "y": signal + noise * g.standard_normal(d),
              "y_val": signal + noise * g.standard_normal(d)}
    lam0_arr = np.full(d - 1, float(lam0))
    lipschitz = 1.0 + 4.0 * float(np.exp(lam0_arr).max())
    return ProblemData(arrays=arrays, static={}, lam0=lam0_arr, w_shape=(d,),
                       inner_lr=1.0 / lipschitz, info={"source": "synthetic"})


def inner_loss(w, lam, arrays, static, ops):
    r, dw = w - arrays["y"], arrays["D"] @ w
    return 0.5 * ops.vdot(r, r) + 0.5 * ops.sum(ops.exp(lam) * dw * dw)


def inner_grad(w, lam, arrays, static, ops):
    return w - arrays["y"] + arrays["D"].T @ (ops.exp(lam) * (arrays["D"] @ w))


def outer_loss(w, lam, arrays, static, ops):
    r = w - arrays["y_val"]
    return 0.5 * ops.vdot(r, r)


def inner_hessian(w, lam, arrays, static):
    D = arrays["D"]
    return np.eye(D.shape[1]) + (D.T * np.exp(lam)) @ D


def exact_inner_solution(lam, arrays, static):
    return np.linalg.solve(inner_hessian(None, lam, arrays, static), arrays["y"])


def exact_hypergradient(lam, arrays, static):
    H, D = inner_hessian(None, lam, arrays, static), arrays["D"]
    w = np.linalg.solve(H, arrays["y"])
    v = np.linalg.solve(H, w - arrays["y_val"])
    return -np.exp(lam) * (D @ w) * (D @ v)


def metrics(w, lam, arrays, static):
    return {"test_loss": float(np.mean((np.asarray(w) - arrays["x_true"]) ** 2)),
            "test_accuracy": None}
