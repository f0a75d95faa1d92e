"""Small numpy helpers shared by the problem modules (no torch, no jax).

``newton_minimize``: the float64 inner oracle of the problems without a closed form;
``newton_cg_minimize`` and ``pcg``: the matrix-free one (Hessian-vector products only) for
instances whose D×D Hessian is too large to form (sparse_logreg; the multinomial problems
beyond :data:`DENSE_NEWTON_MAX_DIM`).
``broadcast_lam0``: λ₀ from a scalar or an array, with a shape check.
``task_arrays``: the (T, n, d) task arrays of the multi-task problems, from a user file
(task-major rows) or drawn; ``tasks_lipschitz``: L of their block-diagonal Hessian.
``check_positive_int`` / ``check_positive``: parameter checks with one-line messages.
"""
from __future__ import annotations

import logging

from typing import Callable

import numpy as np

from hypersweep.problems.data import load_user_data

logger = logging.getLogger(__name__)


def check_positive_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def check_positive(name: str, value) -> float:
    value_f = float(value)
    if not (np.isfinite(value_f) and value_f > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return value_f


def broadcast_lam0(lam0, shape: tuple[int, ...], *, what: str) -> np.ndarray:
    """λ₀ as a float64 array of ``shape`` from a scalar or an array of that shape."""
    arr = np.asarray(lam0, dtype=np.float64)
    if arr.size != 1 and arr.shape != tuple(shape):
        raise ValueError(f"lam0 must be a scalar or have shape {tuple(shape)} ({what}); "
                         f"got shape {arr.shape}")
    out = np.broadcast_to(arr.reshape(()) if arr.size == 1 else arr, shape).copy()
    if not np.all(np.isfinite(out)):
        raise ValueError(f"lam0 must be finite; got {lam0!r}")
    return out


def task_arrays(data, *, n_tasks: int, n_features, n_train, n_val,
                draw: Callable[[int], tuple[np.random.Generator, Callable]],
                noise: float) -> tuple[dict[str, np.ndarray], str]:
    """The multi-task problems' arrays ``X_split`` (T, n, d), ``y_split`` (T, n) and their
    source (the path, or ``"synthetic"``).

    ``data`` given: the file's task-major rows (:func:`rows_to_tasks`). Otherwise, after
    the size checks, ``draw(d)`` returns ``(g, targets)``: a generator that has drawn the
    true model, and ``targets(X) -> (T, n)``; then train and val (n_train, n_val rows per
    task) are drawn from ``g`` in that order, x ~ N(0, I_d), y = targets(X) + noise·ε.
    """
    if data is not None:
        return rows_to_tasks(load_user_data(data), n_tasks, source=str(data)), str(data)
    d = check_positive_int("n_features", n_features)
    sizes = {"train": check_positive_int("n_train", n_train),
             "val": check_positive_int("n_val", n_val)}
    g, targets = draw(d)
    arrays = {}
    for split, n in sizes.items():
        X = g.standard_normal((n_tasks, n, d))
        arrays[f"X_{split}"] = X
        arrays[f"y_{split}"] = targets(X) + noise * g.standard_normal((n_tasks, n))
    return arrays, "synthetic"


def tasks_lipschitz(blocks: np.ndarray) -> float:
    """L = max_i λ_max(A_i)/T for the block-diagonal Hessian blkdiag(A_i)/T (exact)."""
    return max(np.linalg.eigvalsh(A)[-1] for A in blocks) / blocks.shape[0]


def rows_to_tasks(arrays: dict, n_tasks: int, *, source: str) -> dict[str, np.ndarray]:
    """Reshape task-major user data: rows [i·n, (i+1)·n) of ``X_split`` belong to task i.

    Returns ``X_split`` of shape (T, n, d) and ``y_split`` of shape (T, n) (float64).
    """
    out = {}
    for key in ("train", "val", "test"):
        if f"X_{key}" not in arrays:
            continue
        X = np.asarray(arrays[f"X_{key}"], dtype=np.float64)
        y = np.asarray(arrays[f"y_{key}"], dtype=np.float64)
        if X.shape[0] % n_tasks:
            raise ValueError(
                f"{source}: X_{key} has {X.shape[0]} rows, not a multiple of n_tasks="
                f"{n_tasks} (rows must be task-major, the same count per task)")
        n = X.shape[0] // n_tasks
        out[f"X_{key}"] = X.reshape(n_tasks, n, X.shape[1])
        out[f"y_{key}"] = y.reshape(n_tasks, n)
    return out


def newton_minimize(loss, grad, hessian, w0: np.ndarray, *, tol: float = 1e-12,
                    max_iter: int = 100, what: str = "inner problem") -> np.ndarray:
    """Minimize a smooth strongly convex function by Newton's method in float64.

    Stops when ‖∇‖₂ ≤ ``tol``. Steps are damped by Armijo backtracking on ``loss`` while
    the Newton decrement is large; once it is below 1e-10 the full step is taken (there
    the decrease in ``loss`` is below float64 resolution, so Armijo cannot judge it, and
    Newton converges quadratically). Cost per iteration: one ``hessian`` (dense, D×D)
    and one D×D Cholesky solve, O(D³).
    """
    from scipy.linalg import solve

    w = np.array(w0, dtype=np.float64, copy=True)
    shape = w.shape
    grad_norm = np.inf
    for _ in range(max_iter):
        g = np.asarray(grad(w), dtype=np.float64).reshape(-1)
        grad_norm = float(np.linalg.norm(g))
        if grad_norm <= tol:
            return w
        H = np.asarray(hessian(w), dtype=np.float64)
        step = solve(H, g, assume_a="pos").reshape(shape)
        decrement = float(g @ step.reshape(-1))
        if decrement < 1e-10:
            w = w - step
            continue
        f0 = float(loss(w))
        s = 1.0
        while s > 1e-12:
            if float(loss(w - s * step)) <= f0 - 1e-4 * s * decrement:
                break
            s *= 0.5
        w = w - s * step
    g = np.asarray(grad(w), dtype=np.float64).reshape(-1)
    grad_norm = float(np.linalg.norm(g))
    if grad_norm > tol:
        logger.warning("Newton on the %s stopped after %d iterations at ‖∇‖ = %.3g > %.1g",
                       what, max_iter, grad_norm, tol)
    return w


class SolutionCache:
    """The last few inner solutions w*(λ) of one problem module, keyed by a digest of the
    arrays w* depends on (plus ``static``) and λ's bytes: F(λ), ∇F(λ) and the metrics at
    one λ then solve once. A hit returns a copy. Cost of a lookup: one pass of blake2b over
    those arrays (~0.1 s for MNIST's 20,000 × 785 training matrix), small beside a solve."""

    def __init__(self, keys: tuple[str, ...], size: int = 8):
        from collections import OrderedDict

        self.keys, self.size = keys, size
        self._solutions: OrderedDict = OrderedDict()

    def _digest(self, arrays, static) -> bytes:
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        h.update(repr(sorted(dict(static).items())).encode())
        for key in self.keys:
            a = np.ascontiguousarray(arrays[key])
            h.update(key.encode())
            h.update(repr((a.dtype.str, a.shape)).encode())
            h.update(a.data)
        return h.digest()

    def clear(self) -> None:
        self._solutions.clear()

    def get(self, lam, arrays, static, solve) -> np.ndarray:
        """w*(λ) from the cache, else ``solve()`` (kept)."""
        key = (self._digest(arrays, static), np.asarray(lam, dtype=np.float64).tobytes())
        if key not in self._solutions:
            self._solutions[key] = solve()
        self._solutions.move_to_end(key)
        while len(self._solutions) > self.size:
            self._solutions.popitem(last=False)
        return self._solutions[key].copy()


#: Above this many inner variables the multinomial problems' oracles go matrix-free
#: (Newton–CG and CG on Hessian-vector products): forming the dense Hessian costs
#: O(n·(D·C)²), ~10¹² flops for MNIST's 785 × 10 at n = 20,000.
DENSE_NEWTON_MAX_DIM = 2000


def pcg(matvec, b: np.ndarray, diag: np.ndarray, *, rtol: float, max_iter: int | None = None
        ) -> tuple[np.ndarray, float]:
    """(x, ‖b − A x‖/‖b‖): Jacobi-preconditioned CG for an SPD operator from x = 0. Stops
    on the true residual ‖b − A x‖ ≤ rtol ‖b‖: the recursive one drifts from it by ~κ·ε,
    so at its stop the true one is recomputed and CG restarts from it if still above."""
    bnorm = float(np.linalg.norm(b))
    x = np.zeros_like(b)
    if bnorm == 0.0:
        return x, 0.0
    max_iter = max_iter or 10 * b.size + 100
    target = rtol * bnorm
    r = b - matvec(x)
    iters = 0
    for _restart in range(5):
        z = r / diag
        p = z.copy()
        rz = float(r @ z)
        while iters < max_iter and float(np.linalg.norm(r)) > target:
            Ap = matvec(p)
            pAp = float(p @ Ap)
            if not pAp > 0:
                break
            alpha = rz / pAp
            x += alpha * p
            r -= alpha * Ap
            z = r / diag
            rz_new = float(r @ z)
            p = z + (rz_new / rz) * p
            rz = rz_new
            iters += 1
        r = b - matvec(x)  # the true residual: restart from it if drift left it above
        if float(np.linalg.norm(r)) <= target or iters >= max_iter:
            break
    return x, float(np.linalg.norm(r)) / bnorm


def newton_cg_minimize(loss, grad, hessian_operator, w0: np.ndarray, *, tol: float,
                       max_iter: int = 100, what: str = "inner problem") -> np.ndarray:
    """Minimize a smooth strongly convex function by Newton–CG in float64, to ‖∇‖ ≤ ``tol``.

    ``hessian_operator(w)`` returns (v ↦ ∇²f(w) v, diag ∇²f(w)) on flat vectors. Newton
    directions by :func:`pcg` with the forcing term min(0.1, ‖∇‖/‖∇(w0)‖) (superlinear,
    quadratic at the end); Armijo backtracking while the Newton decrement is above float64's
    resolution of the loss. Cost per iteration: a few dozen Hessian-vector products."""
    w = np.array(w0, dtype=np.float64, copy=True)
    shape = w.shape
    g0 = None
    for _ in range(max_iter):
        g = np.asarray(grad(w), dtype=np.float64).reshape(-1)
        gnorm = float(np.linalg.norm(g))
        g0 = g0 or gnorm or 1.0
        if gnorm <= tol:
            return w
        matvec, diag = hessian_operator(w)
        step, _ = pcg(matvec, g, diag, rtol=min(0.1, gnorm / g0))
        step = step.reshape(shape)
        decrement = float(g @ step.reshape(-1))
        if decrement < 1e-10:
            w = w - step  # below the loss's float64 resolution: the full step
            continue
        f0, s = float(loss(w)), 1.0
        while s > 1e-12 and float(loss(w - s * step)) > f0 - 1e-4 * s * decrement:
            s *= 0.5
        w = w - s * step
    gnorm = float(np.linalg.norm(np.asarray(grad(w), dtype=np.float64)))
    if gnorm > tol:
        logger.warning("Newton-CG on the %s stopped after %d iterations at ‖∇‖ = %.3g > %.3g",
                       what, max_iter, gnorm, tol)
    return w


# -- multinomial logistic models (data_cleaning, multiclass_logreg) ----------------------------
def integer_labels(raw: dict, source: str, problem: str) -> tuple[np.ndarray, dict]:
    """(sorted classes, {y_<split>: labels mapped to 0..C−1}) of integer class labels;
    ``ValueError`` naming ``source`` for non-integer labels or fewer than 2 classes."""
    splits = [k for k in ("y_train", "y_val", "y_test") if k in raw]
    for key in splits:
        y = np.asarray(raw[key])
        if not (np.issubdtype(y.dtype, np.integer)
                or (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))):
            raise ValueError(f"{source}: {key} must hold integer class labels; got dtype "
                             f"{y.dtype}")
    classes = np.unique(np.concatenate([np.asarray(raw[k]).astype(np.int64) for k in splits]))
    if len(classes) < 2:
        raise ValueError(f"{source}: {problem} needs at least 2 classes; got "
                         f"{classes.tolist()}")
    return classes, {k: np.searchsorted(classes, np.asarray(raw[k]).astype(np.int64))
                     for k in splits}


def cross_entropy(X, Y, w, ops):
    """CE(x_iᵀW, y_i) = logsumexp(x_iᵀW) − (x_iᵀW)_{y_i} per row (one-hot Y)."""
    logits = X @ w
    return ops.logsumexp(logits, axis=1) - ops.sum(Y * logits, axis=1)


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    from scipy.special import softmax

    return softmax(logits, axis=1)


def multinomial_hessian(X: np.ndarray, w: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Σ_i weights_i (x_i x_iᵀ) ⊗ (diag(p_i) − p_i p_iᵀ), p_i = softmax(x_iᵀW), as a
    (D·C, D·C) matrix (W flattened row-major, index a·C + c); no (n, D, D) tensor."""
    n, D = X.shape
    C = w.shape[1]
    probs = softmax_rows(X @ w)
    # Σ_i s_i (x_i x_iᵀ) ⊗ diag(p_i): for each class c, Xᵀ diag(s ⊙ p_c) X  -> (D, C, D)
    diag_part = np.einsum("ia,ic,ib->acb", X * weights[:, None], probs, X, optimize=True)
    hess = np.zeros((D, C, D, C))
    classes = np.arange(C)
    hess[:, classes, :, classes] = diag_part.transpose(1, 0, 2)
    # Σ_i s_i (x_i ⊗ p_i)(x_i ⊗ p_i)ᵀ as one (n, DC)ᵀ(n, DC) product
    outer = (X[:, :, None] * probs[:, None, :]).reshape(n, D * C)
    return hess.reshape(D * C, D * C) - (outer * weights[:, None]).T @ outer


def multinomial_operator(X: np.ndarray, w: np.ndarray, weights: np.ndarray,
                         penalty: np.ndarray):
    """(v ↦ ∇²v, diag ∇²) of Σ_i weights_i CE(x_iᵀW, y_i) + ½ Σ penalty ⊙ W² at W = ``w``
    on flat (D·C,) vectors (``penalty`` broadcast to (D, C)), never forming the
    (D·C)² matrix of :func:`multinomial_hessian`: per product two passes over X,
    Xᵀ(weights ⊙ (P ⊙ Z − P ⊙ Σ_c P ⊙ Z)) with Z = X V."""
    D, C = w.shape
    probs = softmax_rows(X @ w)
    pen = np.broadcast_to(penalty, (D, C))

    def matvec(v):
        V = v.reshape(D, C)
        pz = probs * (X @ V)
        T = pz - probs * pz.sum(axis=1, keepdims=True)
        return (X.T @ (weights[:, None] * T) + pen * V).reshape(-1)

    diag = (X * X).T @ (weights[:, None] * probs * (1.0 - probs)) + pen
    return matvec, diag.reshape(-1)


def multinomial_dense_hessian(X: np.ndarray, w: np.ndarray, weights: np.ndarray,
                              penalty) -> np.ndarray:
    """The (D·C)² Hessian of Σ_i weights_i CE(x_iᵀW, y_i) + ½ Σ penalty ⊙ W² at W = ``w``
    (``penalty`` broadcast to (D, C)): :func:`multinomial_hessian` plus its diagonal."""
    diag = np.broadcast_to(penalty, w.shape).reshape(-1)
    return multinomial_hessian(X, w, weights) + np.diag(diag)


def multinomial_exact_solution(cache: "SolutionCache", lam, arrays, static, *, loss, grad,
                               curvature, what: str) -> np.ndarray:
    """w*(λ) of a multinomial inner problem (data_cleaning, multiclass_logreg), kept in
    ``cache``: dense Newton (to ‖∇‖ ≤ 1e-12) up to :data:`DENSE_NEWTON_MAX_DIM` variables,
    else Newton–CG on Hessian-vector products (to ‖∇‖ ≤ 1e-12·max(1, ‖∇(0)‖)). ``loss``
    and ``grad`` are the module's ``inner_loss``/``inner_grad``; ``curvature(lam, arrays,
    static)`` gives its (per-row weights, penalty) — what both Hessian forms are made of."""
    from hypersweep.problems import numpy_ops

    X = arrays["X_train"]
    weights, penalty = curvature(lam, arrays, static)
    w0 = np.zeros((X.shape[1], arrays["Y_train"].shape[1]))

    def solve():
        f = lambda w: loss(w, lam, arrays, static, numpy_ops)  # noqa: E731
        g = lambda w: grad(w, lam, arrays, static, numpy_ops)  # noqa: E731
        if w0.size <= DENSE_NEWTON_MAX_DIM:
            return newton_minimize(f, g, lambda w: multinomial_dense_hessian(
                X, w, weights, penalty), w0, what=what)
        g0 = float(np.linalg.norm(np.asarray(g(w0), dtype=np.float64)))
        return newton_cg_minimize(f, g, lambda w: multinomial_operator(X, w, weights,
                                                                       penalty),
                                  w0, tol=1e-12 * max(1.0, g0), what=what)

    return cache.get(lam, arrays, static, solve)


def multinomial_val_adjoint(lam, arrays, static, w: np.ndarray, *, curvature,
                            what: str) -> np.ndarray:
    """(∇²_w L_in)⁻¹ ∇_w L_out at w (shape of w), L_out the mean validation cross-entropy:
    a direct solve up to :data:`DENSE_NEWTON_MAX_DIM` variables, else CG to a true
    relative residual of 1e-12."""
    X, Xv, Yv = arrays["X_train"], arrays["X_val"], arrays["Y_val"]
    rhs = (Xv.T @ (softmax_rows(Xv @ w) - Yv) / Xv.shape[0]).reshape(-1)
    weights, penalty = curvature(lam, arrays, static)
    if w.size <= DENSE_NEWTON_MAX_DIM:
        return np.linalg.solve(multinomial_dense_hessian(X, w, weights, penalty),
                               rhs).reshape(w.shape)
    matvec, diag = multinomial_operator(X, w, weights, penalty)
    v, rel = pcg(matvec, rhs, diag, rtol=1e-12)
    if rel > 1e-12:
        logger.warning("%s adjoint CG stopped at relative residual %.3g", what, rel)
    return v.reshape(w.shape)


def multinomial_metrics(w: np.ndarray, arrays: dict) -> dict:
    """Test cross-entropy and accuracy (None without a test split)."""
    if "X_test" not in arrays:
        return {"test_loss": None, "test_accuracy": None}
    from hypersweep.problems import numpy_ops

    X, Y, y = arrays["X_test"], arrays["Y_test"], arrays["y_test"]
    return {"test_loss": float(np.mean(cross_entropy(X, Y, w, numpy_ops))),
            "test_accuracy": float(np.mean(np.argmax(X @ w, axis=1) == y))}
